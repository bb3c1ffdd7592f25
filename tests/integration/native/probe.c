/* The error paths of libmpumapclient, seen from a C program.  Prints
 * "key=value" lines; never exits because of the library (the last line is
 * "alive=1").
 *
 *     probe nosrv SOCKET FILE            no server: init fails, client_umap NULL
 *     probe files SOCKET MISSING GOOD    a missing file, then a good one, and misuse
 *     probe nobody SOCKET SECRET PUBLIC  as uid/gid 65534: EACCES, then a readable file
 *     probe stopped SOCKET FILE          connects, says "ready", waits for a line on stdin
 *                                        (the server is stopped meanwhile), then maps
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include <umap/umap-client.h>

/* 1 when the mapping holds exactly the file's bytes. */
static int same_as_file(const unsigned char *data, const char *path)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        return 0;
    unsigned char buf[65536];
    size_t off = 0;
    ssize_t n;
    while ((n = pread(fd, buf, sizeof buf, (off_t)off)) > 0) {
        if (memcmp(data + off, buf, (size_t)n) != 0) {
            close(fd);
            return 0;
        }
        off += (size_t)n;
    }
    close(fd);
    return off == (size_t)st.st_size;
}

static void settings(void)
{
    printf("system_page_size=%ld\n", umapcfg_get_system_page_size());
    printf("umap_page_size=%llu\n", (unsigned long long)umapcfg_get_umap_page_size());
    printf("buffer_pages=%llu\n", (unsigned long long)umapcfg_get_max_pages_in_buffer());
    printf("fillers=%llu\n", (unsigned long long)umapcfg_get_num_fillers());
    printf("evictors=%llu\n", (unsigned long long)umapcfg_get_num_evictors());
    printf("low_water=%d\n", umapcfg_get_evict_low_water_threshold());
    printf("high_water=%d\n", umapcfg_get_evict_high_water_threshold());
    printf("max_fault_events=%llu\n", (unsigned long long)umapcfg_get_max_fault_events());
}

static void try_map(const char *key, const char *path, void *addr)
{
    errno = 0;
    void *p = client_umap(path, PROT_READ, MAP_SHARED, addr);
    printf("%s_null=%d\n%s_errno=%d\n", key, p == NULL, key, p ? 0 : errno);
    if (p) {
        printf("%s_right=%d\n", key, same_as_file(p, path));
        if (addr)
            printf("%s_at_addr=%d\n", key, p == addr);
    }
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    const char *mode = argv[1], *sock = argv[2];

    if (strcmp(mode, "nobody") == 0) {
        if (setgroups(0, NULL) || setgid(65534) || setuid(65534)) {
            printf("setuid_errno=%d\n", errno);
            return 1;
        }
        printf("uid=%d\n", (int)getuid());
    }

    errno = 0;
    init_umap_client(sock);
    printf("init_errno=%d\n", errno);

    if (strcmp(mode, "nosrv") == 0) {
        try_map("map", argv[3], NULL);
        errno = 0;
        printf("page_size_zero=%d\n", umapcfg_get_umap_page_size() == 0);
        printf("page_size_errno=%d\n", errno);
        printf("uunmap=%d\n", client_uunmap(argv[3]));
        close_umap_client();
    } else if (strcmp(mode, "files") == 0 && argc == 5) {
        settings();
        try_map("missing", argv[3], NULL);
        try_map("good", argv[4], NULL);
        try_map("again", argv[4], NULL);                /* EEXIST */

        /* A forked child does not inherit the mapping, and connects anew. */
        const unsigned char *mapped = NULL;
        FILE *maps = fopen("/proc/self/maps", "r");
        char line[4096];
        while (maps && fgets(line, sizeof line, maps))
            if (strstr(line, "memfd:mpumap:") && !mapped)
                mapped = (const unsigned char *)strtoul(line, NULL, 16);
        if (maps)
            fclose(maps);
        fflush(stdout);
        pid_t child = fork();
        if (child == 0) {
            int inherited = 0;
            maps = fopen("/proc/self/maps", "r");
            while (maps && fgets(line, sizeof line, maps))
                /* (a PROT_NONE placeholder keeps the address: not the buffer) */
                inherited |= (const unsigned char *)strtoul(line, NULL, 16) == mapped
                             && strstr(line, "memfd:mpumap:");
            printf("child_inherited=%d\n", inherited);
            try_map("child_before_init", argv[4], NULL);    /* ENOTCONN */
            init_umap_client(sock);
            try_map("child", argv[4], NULL);
            close_umap_client();
            fflush(stdout);
            _exit(0);
        }
        int status = -1;
        waitpid(child, &status, 0);
        printf("child_status=%d\n", status);
        printf("parent_still_right=%d\n", mapped && same_as_file(mapped, argv[4]));
        errno = 0;
        void *w = client_umap(argv[4], PROT_READ | PROT_WRITE, MAP_PRIVATE, NULL);
        printf("write_null=%d\nwrite_errno=%d\n", w == NULL, errno);
        errno = 0;
        printf("uunmap=%d\n", client_uunmap(argv[4]));
        int r = client_uunmap(argv[4]);
        printf("uunmap_again=%d\nuunmap_again_errno=%d\n", r, errno);

        /* a chosen address: free, then taken */
        struct stat st;
        stat(argv[4], &st);
        size_t len = ((size_t)st.st_size + 4095) & ~(size_t)4095;
        void *hole = mmap(NULL, len + (1 << 20), PROT_NONE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        munmap(hole, len + (1 << 20));
        void *at = (char *)hole + (1 << 20);
        try_map("fixed", argv[4], at);
        client_uunmap(argv[4]);
        void *taken = mmap(at, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        try_map("taken", argv[4], taken);
        munmap(taken, 4096);
        close_umap_client();
        try_map("closed", argv[4], NULL);               /* ENOTCONN */
        init_umap_client(sock);                         /* and back */
        try_map("reconnected", argv[4], NULL);
        close_umap_client();
    } else if (strcmp(mode, "stopped") == 0) {
        printf("ready=1\n");
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof line, stdin))
            return 1;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        try_map("map", argv[3], NULL);                  /* ETIMEDOUT */
        clock_gettime(CLOCK_MONOTONIC, &t1);
        printf("map_ms=%ld\n", (long)((t1.tv_sec - t0.tv_sec) * 1000
                                      + (t1.tv_nsec - t0.tv_nsec) / 1000000));
        try_map("again", argv[3], NULL);                /* ENOTCONN: unfit */
        errno = 0;
        int r = client_uunmap(NULL);
        printf("uunmap_null=%d\nuunmap_null_errno=%d\n", r, errno);
        close_umap_client();
    } else if (strcmp(mode, "nobody") == 0 && argc == 5) {
        try_map("secret", argv[3], NULL);
        try_map("public", argv[4], NULL);
        close_umap_client();
    } else {
        return 2;
    }
    printf("alive=1\n");
    return 0;
}
