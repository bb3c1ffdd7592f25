/* The preload's test program: mmap() files read-only with the plain C
 * library call, read every byte, check it against the file (pread), and say
 * what backs each mapping (the pathname /proc/self/maps gives its address).
 *
 *     mmap_reader [--private] [--wait] [--cut] FILE...
 * --cut: munmap the first page of each mapping before reading the rest.
 * Prints one line per file: "file=F bytes=N wrong=W backing=B", then
 * "mapped" (and, with --wait, waits for a line on stdin before unmapping),
 * then "done".  Exit 0 only if every byte was right. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

static void backing(uintptr_t addr, char *out, size_t cap)
{
    snprintf(out, cap, "?");
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4096];
    while (f && fgets(line, sizeof line, f)) {
        unsigned long start, end;
        int at = 0;
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &start, &end, &at) < 2)
            continue;
        if (addr >= start && addr < end) {
            line[strcspn(line, "\n")] = '\0';
            char *name = at ? line + at : line + strlen(line);
            for (char *c = name; *c; c++)
                if (*c == ' ')
                    *c = '_';
            snprintf(out, cap, "%s", *name ? name : "[anonymous]");
            break;
        }
    }
    if (f)
        fclose(f);
}

int main(int argc, char **argv)
{
    int flags = MAP_SHARED, wait = 0, cut = 0, first = 1, bad = 0;
    for (; first < argc && argv[first][0] == '-'; first++) {
        if (strcmp(argv[first], "--private") == 0)
            flags = MAP_PRIVATE;
        else if (strcmp(argv[first], "--wait") == 0)
            wait = 1;
        else if (strcmp(argv[first], "--cut") == 0)
            cut = 4096;
    }
    int n = argc - first;
    void **maps = calloc((size_t)n + 1, sizeof *maps);
    size_t *sizes = calloc((size_t)n + 1, sizeof *sizes);
    for (int i = 0; i < n; i++) {
        const char *path = argv[first + i];
        int fd = open(path, O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0) {
            printf("file=%s error=%d\n", path, errno);
            return 1;
        }
        sizes[i] = (size_t)st.st_size;
        maps[i] = mmap(NULL, sizes[i], PROT_READ, flags, fd, 0);
        if (maps[i] == MAP_FAILED) {
            printf("file=%s mmap_errno=%d\n", path, errno);
            return 1;
        }
        close(fd);  /* the mapping lives on without the descriptor */
        if (cut && munmap(maps[i], (size_t)cut) != 0) {
            printf("file=%s cut_errno=%d\n", path, errno);
            return 1;
        }
        int check = open(path, O_RDONLY);
        unsigned char *want = malloc(sizes[i]);
        size_t got = 0;
        while (got < sizes[i]) {
            ssize_t r = pread(check, want + got, sizes[i] - got, (off_t)got);
            if (r <= 0)
                return 1;
            got += (size_t)r;
        }
        close(check);
        const unsigned char *data = maps[i];
        size_t wrong = 0;
        for (size_t k = (size_t)cut; k < sizes[i]; k++)
            wrong += data[k] != want[k];
        free(want);
        char name[4096];
        backing((uintptr_t)maps[i] + (size_t)cut, name, sizeof name);
        printf("file=%s bytes=%zu wrong=%zu backing=%s\n", path, sizes[i], wrong, name);
        bad |= wrong != 0;
    }
    printf("mapped\n");
    fflush(stdout);
    if (wait) {
        char line[64];
        if (!fgets(line, sizeof line, stdin))
            return 1;
    }
    for (int i = 0; i < n; i++)
        if (munmap((char *)maps[i] + cut, sizes[i] - (size_t)cut) != 0) {
            printf("munmap_errno=%d\n", errno);
            bad = 1;
        }
    printf("done\n");
    return bad;
}
