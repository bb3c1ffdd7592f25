/*
 * What the C side of mpumap shares beyond mpumap_core.h: the calls that
 * only C code makes (the fillers' loop, the client library, the guard).
 * cffi does not read this file.
 */
#ifndef MPUMAP_CORE_INTERNAL_H
#define MPUMAP_CORE_INTERNAL_H

#include <stdint.h>

#include "mpumap_core.h"

/* A page's state word: the state, and the pid that moved it there. */
#define MPU_STATE(word) ((word) & 3u)
#define MPU_OWNED(state, owner) ((state) | ((owner) << 2))

/* Page flags (struct mpu_desc). */
#define MPU_READ_AHEAD 1u

#define MPU_FEATURE_POISON (1ull << 14)  /* UFFD_FEATURE_POISON */
#define MPU_FEATURE_WP_SHMEM (1ull << 12)  /* UFFD_FEATURE_WP_HUGETLBFS_SHMEM */

/* What mpu_uffd_read_faults keeps of a fault beside its address, in the
 * address's low bits (the kernel gives page-aligned addresses). */
#define MPU_PF_WRITE 1u             /* a write */
#define MPU_PF_WP 2u                /* ... to a write-protected page */

#define MPU_ANSWER_COPY 1
#define MPU_ANSWER_WAKE 2

/* wp: the page lands write-protected (a region mapped for writing, read).
 * *copied (unless NULL): the bytes copied, all of len on success, those
 * before the failure else. */
/* 1 when fd is of that kind (readlink of /proc/self/fd/N: e.g.
 * "anon_inode:[pidfd]"), 0 when not, -errno when that cannot be read. */
int mpu_fd_is(int fd, const char *kind);
int mpu_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, int wp,
                  uint64_t *copied);
int mpu_uffd_poison(int fd, uint64_t start, uint64_t len, int wake);
int mpu_uffd_read_faults(int fd, uint64_t *addrs, int max);

int mpu_futex_wait(uint32_t *word, uint32_t expected, int timeout_ms);

int mpu_punch(int fd, uint64_t offset, uint64_t len);
/* [at, at + len) of `from` to the same place in `to`, through buf (size
 * bytes): what a memfd holds, to its file.  0 or -errno. */
int mpu_copy_range(int from, int to, uint64_t at, uint64_t len, char *buf, size_t size);

uint64_t mpu_now_ns(void);
void mpu_account(struct mpu_header *h, uint32_t slot, uint64_t since_ns,
                 uint64_t bytes, int answer);

/* Pages of a region from `first` on that are PRESENT: punched out and FREE
 * (a file that shrank).  Returns how many. */
uint64_t mpu_region_evict_from(struct mpu_header *h, uint32_t slot, uint32_t gen,
                               uint64_t first, uint32_t owner, int memfd, uint64_t page_size);

/* Where the directory's parts are in the segment. */
static inline struct mpu_desc *mpu_descs(struct mpu_header *h)
{
    return (struct mpu_desc *)((char *)h + h->descs_at);
}

static inline struct mpu_region_info *mpu_regions(struct mpu_header *h)
{
    return (struct mpu_region_info *)((char *)h + h->regions_at);
}

#endif
