/*
 * What the benchmarks' C programs (bench_client.c, bench_writer.c,
 * scale_client.c) share: their random numbers, their clock, and the order
 * in which they touch pages, so that each program touches the same pages
 * in the same order for the same seed.
 */
#ifndef MPUMAP_BENCH_COMMON_H
#define MPUMAP_BENCH_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static inline uint64_t next_random(uint64_t *state)    /* xorshift64* */
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 2685821657736338717ULL;
}

static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Pages 0 .. pages - 1 in sequence, or shuffled (Fisher-Yates, seeded);
 * NULL when out of memory. */
static inline size_t *page_order(size_t pages, int random_order, uint64_t seed)
{
    size_t *order = malloc(pages * sizeof *order);
    if (!order)
        return NULL;
    for (size_t i = 0; i < pages; i++)
        order[i] = i;
    for (size_t i = pages - 1; random_order && i > 0; i--) {
        size_t j = next_random(&seed) % (i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    return order;
}

#endif
