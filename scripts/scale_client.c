/*
 * scripts/scale.py's client: map FILE through mpumap (libmpumapclient),
 * touch COUNT pages at random offsets, one byte each, timed; then check
 * every page it touched, and the pages at the offsets CHECK names, against
 * pread of the file.
 *
 *     scale_client FILE COUNT SEED [CHECK,CHECK,...]
 *
 * Prints "ready" once mapped and waits for a line on its standard input;
 * prints {"seconds": S, "faults": N} after the touches, {"ok": true|false}
 * after the checks, then waits for another line before it unmaps (so that
 * the status can be timed while the region is mapped).  Waiting is a
 * blocking read: hundreds of clients that wait cost no CPU.
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

#include "bench_common.h"

static int wait_for_line(void)
{
    char line[64];
    return fgets(line, sizeof line, stdin) ? 0 : -1;
}

/* The page at offset: the mapping's bytes against the file's. */
static int same(int fd, const volatile unsigned char *data, uint64_t offset, uint64_t size,
                size_t page, unsigned char *want)
{
    size_t n = size - offset < page ? (size_t)(size - offset) : page;
    if (pread(fd, want, n, (off_t)offset) != (ssize_t)n)
        return 0;
    for (size_t k = 0; k < n; k++)
        if (data[offset + k] != want[k])
            return 0;
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: scale_client FILE COUNT SEED [CHECK,...]\n");
        return 2;
    }
    const char *path = argv[1];
    long count = atol(argv[2]);
    uint64_t state = strtoull(argv[3], NULL, 0) * 2654435761u + 1;
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        fprintf(stderr, "scale_client: %s: %s\n", path, strerror(errno));
        return 2;
    }
    uint64_t size = (uint64_t)st.st_size;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uint64_t pages = (size + page - 1) / page;
    uint64_t *touched = malloc((size_t)(count > 0 ? count : 1) * sizeof *touched);
    unsigned char *want = malloc(page);
    if (!touched || !want) {
        fprintf(stderr, "scale_client: out of memory\n");
        return 2;
    }
    init_umap_client(NULL);
    const volatile unsigned char *data = client_umap(path, PROT_READ, MAP_SHARED, NULL);
    if (!data) {
        fprintf(stderr, "scale_client: client_umap: %s\n", strerror(errno));
        return 1;
    }
    for (long i = 0; i < count; i++)
        touched[i] = next_random(&state) % pages * page;
    printf("ready\n");
    fflush(stdout);
    if (wait_for_line() < 0)
        return 1;

    unsigned sum = 0;
    double started = now();
    for (long i = 0; i < count; i++)
        sum += data[touched[i]];
    double seconds = now() - started;
    printf("{\"seconds\": %.6f, \"faults\": %ld, \"sum\": %u}\n", seconds, count, sum);
    fflush(stdout);

    int ok = 1;
    for (long i = 0; i < count && ok; i++)
        ok = same(fd, data, touched[i], size, page, want);
    if (argc == 5)
        for (char *item = strtok(argv[4], ","); item && ok; item = strtok(NULL, ","))
            ok = same(fd, data, strtoull(item, NULL, 0), size, page, want);
    printf("{\"ok\": %s}\n", ok ? "true" : "false");
    fflush(stdout);
    if (wait_for_line() < 0)
        return 1;
    client_uunmap(path);
    close_umap_client();
    return ok ? 0 : 1;
}
