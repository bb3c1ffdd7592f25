/*
 * Writes every 4 KiB page of a file through a read-write shared mapping,
 * makes it durable, and checks what it reads back:
 *     writer api  FILE STAMP   client_umap(PROT_READ | PROT_WRITE, MAP_SHARED),
 *                              client_uflush, client_uunmap ($MPUMAP_SOCKET)
 *     writer mmap FILE STAMP   mmap, msync(MS_SYNC), munmap: what an unmodified
 *                              program does (served under the preload library)
 * Page p holds, over and over, p (8 bytes, little-endian) then STAMP (8 bytes,
 * padded with dots), as tests/integration/writer.py writes it.  Prints
 * "flushed wrong=N" once durable, waits for a line on stdin, unmaps, and
 * prints "done".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <umap/umap-client.h>

#define PAGE 4096

static void fill(unsigned char *page, uint64_t p, const char *stamp)
{
    unsigned char unit[16];
    memcpy(unit, &p, 8);  /* (little-endian machines) */
    memset(unit + 8, '.', 8);
    memcpy(unit + 8, stamp, strlen(stamp) < 8 ? strlen(stamp) : 8);
    for (int k = 0; k < PAGE; k += 16)
        memcpy(page + k, unit, 16);
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    int api = strcmp(argv[1], "api") == 0;
    struct stat st;
    if (stat(argv[2], &st) < 0)
        return 2;
    size_t size = (size_t)st.st_size, pages = size / PAGE;
    unsigned char *m, want[PAGE];
    int fd = -1;
    if (api) {
        init_umap_client(NULL);
        m = client_umap(argv[2], PROT_READ | PROT_WRITE, MAP_SHARED, NULL);
    } else {
        fd = open(argv[2], O_RDWR);
        m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    if (!m || m == MAP_FAILED) {
        perror("map");
        return 1;
    }
    for (size_t p = 0; p < pages; p++)
        fill(m + p * PAGE, p, argv[3]);
    if ((api ? client_uflush(argv[2]) : msync(m, size, MS_SYNC)) < 0) {
        perror("flush");
        return 1;
    }
    size_t wrong = 0;
    for (size_t p = 0; p < pages; p++) {
        fill(want, p, argv[3]);
        wrong += memcmp(m + p * PAGE, want, PAGE) != 0;
    }
    printf("flushed wrong=%zu\n", wrong);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    if ((api ? client_uunmap(argv[2]) : munmap(m, size)) < 0) {
        perror("unmap");
        return 1;
    }
    if (api)
        close_umap_client();
    else
        close(fd);
    printf("done\n");
    return 0;
}
