/* Threads that scan a stripe each of one mapping at once, as the ranks of an
 * OpenMP loop do: mmap() FILE read-only, start THREADS threads together, let
 * each read its stripe front to back, then check every byte against pread.
 * With "same", every thread reads the whole mapping in one random page
 * order instead, so that they fault on the same pages at once.  With
 * "pause", it prints "scanned" once the threads are done and waits for a
 * line on stdin before it checks (the check reads the file: the page cache
 * is for the caller to look at first).
 *
 *     striped_reader THREADS FILE [same|pause]
 * Prints "bytes=N wrong=W"; exit 0 only if every byte was right. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

struct stripe {
    const volatile unsigned char *data;
    size_t length;
    const size_t *order;  /* pages in this order, if not NULL */
    pthread_barrier_t *start;
    unsigned sum;
};

static void *scan(void *arg)
{
    struct stripe *s = arg;
    pthread_barrier_wait(s->start);
    for (size_t i = 0; i < s->length; i += 4096)
        s->sum += s->data[s->order ? s->order[i / 4096] * 4096 : i];
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: striped_reader THREADS FILE [same|pause]\n");
        return 2;
    }
    int same = argc == 4 && strcmp(argv[3], "same") == 0;
    int hold = argc == 4 && strcmp(argv[3], "pause") == 0;
    if (argc == 4 && !same && !hold) {
        fprintf(stderr, "striped_reader: %s: neither same nor pause\n", argv[3]);
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
    size_t pages = (size + 4095) / 4096;
    size_t *order = NULL;
    if (same) {
        order = malloc(pages * sizeof *order);
        for (size_t i = 0; i < pages; i++)
            order[i] = i;
        uint64_t x = 88172645463325252u;
        for (size_t i = pages - 1; i > 0; i--) {  /* Fisher-Yates, xorshift */
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            size_t j = (size_t)(x % (i + 1)), k = order[i];
            order[i] = order[j], order[j] = k;
        }
    }
    size_t each = same ? pages * 4096 : size / (size_t)threads / 4096 * 4096;
    for (int t = 0; t < threads; t++) {
        size_t from = same ? 0 : (size_t)t * each;
        size_t length = same ? size : t == threads - 1 ? size - from : each;
        stripes[t] = (struct stripe){ map + from, length, order, &start, 0 };
        pthread_create(&ids[t], NULL, scan, &stripes[t]);
    }
    for (int t = 0; t < threads; t++)
        pthread_join(ids[t], NULL);
    if (hold) {
        char line[16];
        printf("scanned\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin))
            return 2;
    }

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
