/* The guard's test program: map a file through libmpumapclient, read a
 * quarter of it, say "ready", wait for a line on stdin, then read every page
 * from THREADS threads (each in its own random order) and check every byte.
 * The test kills the server in between: every byte must still be right.
 *
 *     guard_reader FILE THREADS
 * Prints "ready" then "done pages=N wrong=W"; exit 0 only if all is right. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <umap/umap-client.h>

static const unsigned char *data;
static size_t size, page;
static int fd;

struct job {
    pthread_t thread;
    uint64_t seed;
    size_t pages, wrong;
};

static void *reader(void *arg)
{
    struct job *job = arg;
    size_t n = (size + page - 1) / page;
    size_t *order = malloc(n * sizeof *order);
    unsigned char *want = malloc(page);
    for (size_t i = 0; i < n; i++)
        order[i] = i;
    uint64_t x = job->seed;
    for (size_t i = n - 1; i > 0; i--) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        size_t j = (size_t)(x % (i + 1)), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    for (size_t i = 0; i < n; i++) {
        size_t off = order[i] * page, len = size - off < page ? size - off : page;
        if (pread(fd, want, len, (off_t)off) != (ssize_t)len)
            abort();
        if (memcmp(data + off, want, len) != 0)
            job->wrong++;
        job->pages++;
    }
    free(order);
    free(want);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    const char *path = argv[1];
    int threads = atoi(argv[2]);
    struct stat st;
    fd = open(path, O_RDONLY);
    if (fd < 0 || fstat(fd, &st) < 0)
        return 1;
    size = (size_t)st.st_size;
    page = (size_t)umapcfg_get_system_page_size();

    init_umap_client(NULL);
    data = client_umap(path, PROT_READ, MAP_SHARED, NULL);
    if (!data) {
        printf("error errno=%d\n", errno);
        return 1;
    }
    size_t wrong = 0, pages = 0;
    unsigned char *want = malloc(page);
    for (size_t off = 0; off < size / 4; off += page) {
        size_t len = size - off < page ? size - off : page;
        if (pread(fd, want, len, (off_t)off) != (ssize_t)len)
            return 1;
        wrong += memcmp(data + off, want, len) != 0;
        pages++;
    }
    free(want);
    printf("ready pages=%zu wrong=%zu\n", pages, wrong);
    fflush(stdout);

    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    struct job *jobs = calloc((size_t)threads, sizeof *jobs);
    for (int i = 0; i < threads; i++) {
        jobs[i].seed = 0x9E3779B97F4A7C15ULL * (uint64_t)(i + 1);
        pthread_create(&jobs[i].thread, NULL, reader, &jobs[i]);
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(jobs[i].thread, NULL);
        pages += jobs[i].pages;
        wrong += jobs[i].wrong;
    }
    free(jobs);
    printf("done pages=%zu wrong=%zu\n", pages, wrong);
    fflush(stdout);
    int r = client_uunmap(path);
    close_umap_client();
    return wrong == 0 && r == 0 ? 0 : 1;
}
