/*
 * The benchmark's writer in C: write one byte of every 4 KiB page of a file,
 * in sequential or random order, through mpumap (libmpumapclient) or through
 * the kernel's own shared mapping, then make it durable (client_uflush, or
 * msync(MS_SYNC)) and unmap.
 *
 *     bench_writer mpumap|mmap FILE seq|random SEED VALUE PRESENT
 *
 * Page p's byte 1 becomes (p * 31 + VALUE) & 0xff.  With PRESENT 1 every
 * page is read first (timed apart: read faults), so that the writes are
 * write faults on present pages.  Prints one JSON line: read_seconds,
 * write_seconds (the writes), sync_seconds (the flush or msync) and
 * unmap_seconds.  scripts/bench.py builds and drives it.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <umap/umap-client.h>

#include "bench_common.h"

#define TOUCH 4096

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s mpumap|mmap FILE seq|random SEED VALUE PRESENT\n", argv[0]);
        return 2;
    }
    int through_mpumap = strcmp(argv[1], "mpumap") == 0;
    const char *path = argv[2];
    int random_order = strcmp(argv[3], "random") == 0;
    uint64_t seed = strtoull(argv[4], NULL, 0) * 2 + 1;
    unsigned value = (unsigned)strtoul(argv[5], NULL, 0);
    int present = atoi(argv[6]);

    int fd = open(path, O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(path);
        return 1;
    }
    size_t size = (size_t)st.st_size, pages = size / TOUCH;
    volatile unsigned char *data;
    if (through_mpumap) {
        init_umap_client(NULL);
        data = client_umap(path, PROT_READ | PROT_WRITE, MAP_SHARED, NULL);
        if (!data)
            return 1;   /* the library said why on stderr */
    } else {
        data = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (data == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
    }
    size_t *order = page_order(pages, random_order, seed);
    if (!order)
        return 1;
    double t0 = now();
    unsigned sum = 0;
    for (size_t i = 0; present && i < pages; i++)
        sum += data[order[i] * TOUCH];
    double t1 = now();
    for (size_t i = 0; i < pages; i++)
        data[order[i] * TOUCH + 1] = (unsigned char)((order[i] * 31 + value) & 0xff);
    double t2 = now();
    int r = through_mpumap ? client_uflush(path) : msync((void *)data, size, MS_SYNC);
    double t3 = now();
    if (r < 0) {
        perror("flush");
        return 1;
    }
    r = through_mpumap ? client_uunmap(path) : munmap((void *)data, size);
    double t4 = now();
    printf("{\"read_seconds\": %.6f, \"write_seconds\": %.6f, \"sync_seconds\": %.6f, "
           "\"unmap_seconds\": %.6f, \"sum\": %u}\n", t1 - t0, t2 - t1, t3 - t2, t4 - t3, sum);
    if (through_mpumap)
        close_umap_client();
    return r < 0;
}
