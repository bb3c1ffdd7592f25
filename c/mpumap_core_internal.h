/*
 * What the C side of mpumap shares beyond mpumap_core.h: the calls that
 * only C code makes (the fillers' loop, the client library, the guard).
 * cffi does not read this file.
 */
#ifndef MPUMAP_CORE_INTERNAL_H
#define MPUMAP_CORE_INTERNAL_H

#include <stdint.h>

#include "mpumap_core.h"

/* Page flags (struct mpu_page). */
#define MPU_READ_AHEAD 1u

#define MPU_FEATURE_POISON (1ull << 14)  /* UFFD_FEATURE_POISON */

#define MPU_ANSWER_COPY 1
#define MPU_ANSWER_WAKE 2

int mpu_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len);
int mpu_uffd_poison(int fd, uint64_t start, uint64_t len, int wake);
int mpu_uffd_read_faults(int fd, uint64_t *addrs, int max);

int mpu_futex_wait(uint32_t *word, uint32_t expected, int timeout_ms);

uint32_t mpu_page_take_flags(struct mpu_page *page);

/* Up to count pages of room without waiting; see mpumap_core.c. */
int mpu_try_reserve(struct mpu_header *h, uint32_t count, const int *evict_fds, int nfds);

int mpu_punch(int fd, uint64_t offset, uint64_t len);

uint64_t mpu_now_ns(void);
void mpu_account(struct mpu_header *h, uint32_t slot, uint64_t since_ns,
                 uint64_t bytes, int answer);

/* The pages [*first, end) whose table entries hold data, a run at a time:
 * returns the end of the next run at or after *first (moving *first to its
 * start), or end when there is none.  fd -1: all of it, at once. */
uint64_t mpu_table_next_run(int fd, uint64_t *first, uint64_t end);

#endif
