/*
 * The benchmark's client in C: touch one byte of every 4 KiB page of a file,
 * in sequential or random order, through mpumap (libmpumapclient) or through
 * the kernel's own mmap, then check every byte against the file.
 *
 *     bench_client mpumap|mmap FILE seq|random SEED GOFILE
 *
 * Prints "ready" once mapped, waits for GOFILE, touches, prints
 * {"seconds": S}, waits for GOFILE-check, checks, prints {"ok": true|false},
 * and disconnects once GOFILE-done exists.  It connects to $MPUMAP_SOCKET
 * (else the library's default).  scripts/bench.py builds and drives it, also
 * against MP-UMap's client library (--mp-umap).
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

#define TOUCH 4096

static void wait_for(const char *path)
{
    while (access(path, F_OK) != 0)
        usleep(200);
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s mpumap|mmap FILE seq|random SEED GOFILE\n", argv[0]);
        return 2;
    }
    int through_mpumap = strcmp(argv[1], "mpumap") == 0;
    const char *path = argv[2];
    int random_order = strcmp(argv[3], "random") == 0;
    uint64_t seed = strtoull(argv[4], NULL, 0) * 2 + 1;
    const char *go = argv[5];

    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(path);
        return 1;
    }
    size_t size = (size_t)st.st_size, pages = (size + TOUCH - 1) / TOUCH;
    const volatile unsigned char *data;
    if (through_mpumap) {
        /* (MP-UMap's library takes no NULL.) */
        const char *sock = getenv("MPUMAP_SOCKET");
        init_umap_client(sock && *sock ? sock : NULL);
        data = client_umap(path, PROT_READ, MAP_SHARED, NULL);
        if (!data)
            return 1;   /* the library said why on stderr */
    } else {
        data = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
        if (data == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
    }
    size_t *order = page_order(pages, random_order, seed);
    unsigned char *touched = malloc(pages);
    if (!order || !touched)
        return 1;
    printf("ready\n");
    fflush(stdout);
    wait_for(go);

    double started = now();
    for (size_t i = 0; i < pages; i++)
        touched[i] = data[order[i] * TOUCH];
    double seconds = now() - started;
    printf("{\"seconds\": %.6f}\n", seconds);
    fflush(stdout);

    char check[strlen(go) + 8];
    snprintf(check, sizeof check, "%s-check", go);
    wait_for(check);
    int ok = 1;
    unsigned char *want = malloc(1 << 20);
    for (size_t off = 0; ok && off < size; off += 1 << 20) {
        size_t n = size - off < (1 << 20) ? size - off : (1 << 20);
        if (pread(fd, want, n, (off_t)off) != (ssize_t)n || memcmp(want, (const void *)(data + off), n))
            ok = 0;
    }
    for (size_t i = 0; ok && i < pages; i++)
        ok = touched[i] == data[order[i] * TOUCH];
    printf("{\"ok\": %s}\n", ok ? "true" : "false");
    fflush(stdout);
    if (through_mpumap) {
        /* Connected until every client is done: MP-UMap's server dies when
         * a client leaves while another is connected. */
        char done[strlen(go) + 8];
        snprintf(done, sizeof done, "%s-done", go);
        wait_for(done);
        close_umap_client();
    }
    return ok ? 0 : 1;
}
