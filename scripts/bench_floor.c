/*
 * The floor under a fault that goes to the disk through a full buffer: what
 * this machine gives for that work alone, with no server, no page fault and
 * no message between processes.  THREADS threads each read COUNT pages of
 * PAGE_SIZE bytes of FILE at random (O_DIRECT, one page a read) and copy
 * each into a memfd mapping registered with userfaultfd (UFFDIO_COPY), in
 * place of the oldest page of the thread's share of a 2,048-page buffer,
 * which is punched out first: the reads, copies and evictions of a random
 * row through a buffer smaller than the file.
 *
 *     bench_floor FILE PAGE_SIZE THREADS COUNT
 *
 * Prints {"threads": T, "us_per_page": U, "read_gbps": G}: U is each
 * thread's time a page, G what they read a second, all together.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include "bench_common.h"

#define SLOTS 2048
#define THREADS_MAX 16

static int file, memfd, uffd;
static char *buffer;
static size_t page, file_pages, count, share;

static void fail(const char *what)
{
    perror(what);
    exit(1);
}

static void *work(void *arg)
{
    size_t index = (size_t)(uintptr_t)arg, first = index * share;
    uint64_t seed = 0x9E3779B97F4A7C15ull * (index + 1);
    char *chunk = aligned_alloc(4096, page);
    if (!chunk)
        fail("aligned_alloc");
    for (size_t i = 0; i < count; i++) {
        off_t from = (off_t)(next_random(&seed) % file_pages * page);
        if (pread(file, chunk, page, from) != (ssize_t)page)
            fail("pread");
        size_t slot = (first + i % share) * page;
        if (i >= share && fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                    (off_t)slot, (off_t)page) < 0)
            fail("fallocate");
        struct uffdio_copy copy = { .dst = (uint64_t)(uintptr_t)(buffer + slot),
                                    .src = (uint64_t)(uintptr_t)chunk, .len = page };
        if (ioctl(uffd, UFFDIO_COPY, &copy) < 0)
            fail("UFFDIO_COPY");
    }
    free(chunk);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s FILE PAGE_SIZE THREADS COUNT\n", argv[0]);
        return 2;
    }
    page = strtoull(argv[2], NULL, 0);
    size_t threads = strtoull(argv[3], NULL, 0);
    count = strtoull(argv[4], NULL, 0);
    if (page < 4096 || page % 4096 || threads < 1 || threads > THREADS_MAX || !count) {
        fprintf(stderr, "%s: PAGE_SIZE a multiple of 4096, THREADS 1 to %d, COUNT > 0\n",
                argv[0], THREADS_MAX);
        return 2;
    }
    file = open(argv[1], O_RDONLY | O_DIRECT);
    if (file < 0)
        fail(argv[1]);
    file_pages = (size_t)lseek(file, 0, SEEK_END) / page;
    if (!file_pages) {
        fprintf(stderr, "%s: smaller than a page\n", argv[1]);
        return 2;
    }
    share = SLOTS / threads;
    memfd = memfd_create("bench_floor", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)(SLOTS * page)) < 0)
        fail("memfd");
    buffer = mmap(NULL, SLOTS * page, PROT_READ, MAP_SHARED, memfd, 0);
    if (buffer == MAP_FAILED)
        fail("mmap");
    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
    if (uffd < 0)
        fail("userfaultfd");
    struct uffdio_api api = { .api = UFFD_API };
    struct uffdio_register reg = {
        .range = { .start = (uint64_t)(uintptr_t)buffer, .len = SLOTS * page },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_API, &api) < 0 || ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        fail("UFFDIO_REGISTER");

    pthread_t ids[THREADS_MAX];
    double started = now();
    for (size_t t = 0; t < threads; t++)
        if (pthread_create(&ids[t], NULL, work, (void *)(uintptr_t)t))
            fail("pthread_create");
    for (size_t t = 0; t < threads; t++)
        pthread_join(ids[t], NULL);
    double seconds = now() - started;
    printf("{\"threads\": %zu, \"us_per_page\": %.1f, \"read_gbps\": %.3f}\n", threads,
           seconds * 1e6 / (double)count, (double)(threads * count * page) / seconds / 1e9);
    return 0;
}
