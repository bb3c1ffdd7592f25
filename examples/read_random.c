/*
 * read_random: map a file through an mpumap server, read every page in a
 * random order, and check every byte against the file.
 *
 *     cc -O2 -o read_random read_random.c $(mpumap-client config --cflags --libs)
 *     ./read_random FILE [SEED]        # the server: $MPUMAP_SOCKET, else /tmp/mpumap.sock
 *
 * Prints one line:  read_random: FILE: PAGES pages, BYTES bytes, MISMATCHES wrong, SECONDS s
 * and exits 0 only if every byte was right.
 */
#define _GNU_SOURCE
#include <errno.h>
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

static uint64_t next_random(uint64_t *state)    /* xorshift64* */
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 2685821657736338717ULL;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s FILE [SEED]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    uint64_t seed = argc > 2 ? strtoull(argv[2], NULL, 0) : 1;

    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        fprintf(stderr, "read_random: %s: %s\n", path, strerror(errno));
        return 1;
    }
    size_t size = (size_t)st.st_size;

    init_umap_client(NULL);         /* says why on stderr if it fails */
    const unsigned char *data = client_umap(path, PROT_READ, MAP_SHARED, NULL);
    if (!data) {
        fprintf(stderr, "read_random: client_umap: %s\n", strerror(errno));
        return 1;
    }

    size_t page = (size_t)umapcfg_get_system_page_size();
    size_t pages = (size_t)((size + page - 1) / page);
    size_t *order = malloc(pages * sizeof *order);
    unsigned char *want = malloc(page);
    if (!order || !want) {
        fprintf(stderr, "read_random: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < pages; i++)
        order[i] = i;
    uint64_t state = seed ? seed : 1;
    for (size_t i = pages - 1; i > 0; i--) {    /* Fisher-Yates */
        size_t j = (size_t)(next_random(&state) % (i + 1));
        size_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    size_t wrong = 0, bytes = 0;
    for (size_t i = 0; i < pages; i++) {
        size_t offset = order[i] * page;
        size_t n = size - offset < page ? size - offset : page;
        ssize_t got = pread(fd, want, n, (off_t)offset);
        if (got != (ssize_t)n) {
            fprintf(stderr, "read_random: pread at %zu: %s\n", offset,
                    got < 0 ? strerror(errno) : "short read");
            return 1;
        }
        if (memcmp(data + offset, want, n) != 0)
            for (size_t k = 0; k < n; k++)
                wrong += data[offset + k] != want[k];
        bytes += n;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;

    printf("read_random: %s: %zu pages, %zu bytes, %zu wrong, %.3f s\n",
           path, pages, bytes, wrong, seconds);
    fflush(stdout);

    client_uunmap(path);
    close_umap_client();
    free(order);
    free(want);
    close(fd);
    return wrong == 0 && bytes == size ? 0 : 1;
}
