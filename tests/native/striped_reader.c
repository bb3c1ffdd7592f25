/* Threads that scan a stripe each of one mapping at once, as the ranks of an
 * OpenMP loop do: mmap() FILE read-only, start THREADS threads together, let
 * each read its stripe front to back, then check every byte against pread.
 *
 *     striped_reader THREADS FILE
 * Prints "bytes=N wrong=W"; exit 0 only if every byte was right. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

struct stripe {
    const volatile unsigned char *data;
    size_t length;
    pthread_barrier_t *start;
    unsigned sum;
};

static void *scan(void *arg)
{
    struct stripe *s = arg;
    pthread_barrier_wait(s->start);
    for (size_t i = 0; i < s->length; i += 4096)
        s->sum += s->data[i];
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: striped_reader THREADS FILE\n");
        return 2;
    }
    int threads = atoi(argv[1]);
    int fd = open(argv[2], O_RDONLY);
    struct stat st;
    if (threads < 1 || threads > 64 || fd < 0 || fstat(fd, &st) < 0) {
        perror(argv[2]);
        return 2;
    }
    size_t size = (size_t)st.st_size;
    unsigned char *map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, (unsigned)threads);
    pthread_t ids[64];
    struct stripe stripes[64];
    size_t each = size / (size_t)threads / 4096 * 4096;
    for (int t = 0; t < threads; t++) {
        size_t from = (size_t)t * each;
        stripes[t] = (struct stripe){ map + from, t == threads - 1 ? size - from : each,
                                      &start, 0 };
        pthread_create(&ids[t], NULL, scan, &stripes[t]);
    }
    for (int t = 0; t < threads; t++)
        pthread_join(ids[t], NULL);

    static unsigned char buf[1 << 20];
    size_t wrong = 0;
    for (size_t at = 0; at < size;) {
        ssize_t n = pread(fd, buf, sizeof buf, (off_t)at);
        if (n <= 0) {
            perror("pread");
            return 2;
        }
        for (ssize_t i = 0; i < n; i++)
            wrong += buf[i] != map[at + (size_t)i];
        at += (size_t)n;
    }
    printf("bytes=%zu wrong=%zu\n", size, wrong);
    return wrong != 0;
}
