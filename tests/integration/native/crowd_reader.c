/* One of many clients at once: map FILE through the server (MP-UMap's client
 * API), say "ready", wait until GO exists, then read PAGES pages at random
 * offsets (seeded by SEED) and check each against pread of the file.
 *
 *     crowd_reader FILE GO PAGES SEED
 * Prints "ready" once mapped, then "pages=N wrong=W us_per_page=U"; exit 0
 * only if every byte was right. */
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

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: crowd_reader FILE GO PAGES SEED\n");
        return 2;
    }
    const char *path = argv[1], *go = argv[2];
    long count = atol(argv[3]);
    uint64_t x = strtoull(argv[4], NULL, 0) * 2654435761u + 1;
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(path);
        return 2;
    }
    init_umap_client(NULL);
    const volatile unsigned char *data = client_umap(path, PROT_READ, MAP_SHARED, NULL);
    if (!data) {
        fprintf(stderr, "client_umap: %s\n", strerror(errno));
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (double until = now() + 120; access(go, F_OK) != 0; usleep(2000))
        if (now() > until) {
            fprintf(stderr, "no go\n");
            return 1;
        }
    size_t page = (size_t)umapcfg_get_system_page_size();
    size_t pages = ((size_t)st.st_size + page - 1) / page;
    unsigned char *want = malloc(page), *got = malloc(page);
    long wrong = 0;
    double started = now();
    for (long i = 0; i < count; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        size_t offset = (size_t)(x % pages) * page;
        size_t n = (size_t)st.st_size - offset < page ? (size_t)st.st_size - offset : page;
        for (size_t k = 0; k < n; k++)
            got[k] = data[offset + k];
        if (pread(fd, want, n, (off_t)offset) != (ssize_t)n) {
            perror("pread");
            return 1;
        }
        wrong += memcmp(got, want, n) != 0;
    }
    double seconds = now() - started;
    printf("pages=%ld wrong=%ld us_per_page=%.1f\n", count, wrong,
           count ? seconds * 1e6 / (double)count : 0.0);
    client_uunmap(path);
    close_umap_client();
    return wrong ? 1 : 0;
}
