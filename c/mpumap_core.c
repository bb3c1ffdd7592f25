/* See mpumap_core.h.  Atomics are sequentially consistent throughout: the
 * release of a region and the end of a fill race on purpose (each stores,
 * then loads the other's word), and only a total order makes that safe. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#include "mpumap_core_internal.h"

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#define STATE(word) ((word) & 3u)
#define OWNED(state, owner) ((state) | ((owner) << 2))

static int neg_errno(void) { return errno ? -errno : -EIO; }

/* ---- userfaultfd ------------------------------------------------------ */

int mpu_uffd_open(int flags, int *how)
{
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd >= 0) {
        *how = MPU_UFFD_SYSCALL;
        return fd;
    }
    int first = errno;
    if (first != EPERM && first != EACCES)
        return -first;

    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        close(dev);
        if (fd >= 0) {
            *how = MPU_UFFD_DEVICE;
            return fd;
        }
    }
    fd = (int)syscall(SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY);
    if (fd >= 0) {
        *how = MPU_UFFD_USER_ONLY;
        return fd;
    }
    return -first;
}

/* Asks for UFFD_FEATURE_POISON too where the kernel has it (6.6 on): the
 * server answers a fault past a truncated file's end with SIGBUS through it. */
int mpu_uffd_api(int fd, uint64_t features, uint64_t *features_out)
{
    struct uffdio_api api = { .api = UFFD_API,
                              .features = features | MPU_FEATURE_POISON };
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        if (errno != EINVAL)
            return neg_errno();
        api = (struct uffdio_api){ .api = UFFD_API, .features = features };
        if (ioctl(fd, UFFDIO_API, &api) < 0)
            return neg_errno();
    }
    *features_out = api.features;
    return 0;
}

int mpu_uffd_is_uffd(int fd)
{
    char path[64], target[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, target, sizeof target - 1);
    if (n < 0)
        return neg_errno();
    target[n] = '\0';
    return strcmp(target, "anon_inode:[userfaultfd]") == 0;
}

int mpu_uffd_register(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_register reg = {
        .range = { .start = start, .len = len },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return neg_errno();
    return 0;
}

/* EAGAIN means the client's mappings are changing under us: try again.  A
 * partial copy reports how far it got; go on from there. */
int mpu_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len)
{
    const char *from = src;
    for (int tries = 0; tries < 10000; tries++) {
        struct uffdio_copy copy = {
            .dst = dst, .src = (uint64_t)(uintptr_t)from, .len = len,
        };
        if (ioctl(fd, UFFDIO_COPY, &copy) == 0)
            return 0;
        int err = errno;
        if (copy.copy > 0) {
            dst += copy.copy;
            from += copy.copy;
            len -= copy.copy;
            if (len == 0)
                return 0;
        }
        if (err != EAGAIN)
            return -err;
        sched_yield();
    }
    return -EAGAIN;
}

/* Newer than the installed headers, maybe. */
struct mpu_uffdio_poison {
    struct uffdio_range range;
    uint64_t mode;
    int64_t updated;
};
#define MPU_UFFDIO_POISON _IOWR(UFFDIO, 0x08, struct mpu_uffdio_poison)

/* The client's next touch of the range raises SIGBUS, as a read past the
 * end of a mapped file does. */
int mpu_uffd_poison(int fd, uint64_t start, uint64_t len, int wake)
{
    struct mpu_uffdio_poison poison = { .range = { .start = start, .len = len },
                                        .mode = wake ? 0 : 1 /* DONTWAKE */ };
    for (int tries = 0; tries < 10000; tries++) {
        if (ioctl(fd, MPU_UFFDIO_POISON, &poison) == 0)
            return 0;
        if (errno != EAGAIN)
            return neg_errno();
        if (poison.updated > 0) {
            poison.range.start += (uint64_t)poison.updated;
            poison.range.len -= (uint64_t)poison.updated;
            if (poison.range.len == 0)
                return 0;
        }
        poison.updated = 0;
        sched_yield();
    }
    return -EAGAIN;
}

int mpu_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { .start = start, .len = len };
    if (ioctl(fd, UFFDIO_WAKE, &range) < 0)
        return neg_errno();
    return 0;
}

/* Reads what the (non-blocking) uffd has, up to max messages, and keeps the
 * page-fault addresses.  0 means nothing to read. */
int mpu_uffd_read_faults(int fd, uint64_t *addrs, int max)
{
    struct uffd_msg msgs[64];
    if (max > 64)
        max = 64;
    ssize_t n = read(fd, msgs, sizeof msgs[0] * (size_t)max);
    if (n < 0)
        return errno == EAGAIN ? 0 : neg_errno();
    int count = 0;
    for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++)
        if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
            addrs[count++] = msgs[i].arg.pagefault.address;
    return count;
}

/* ---- futexes and atomics --------------------------------------------- */

int mpu_futex_wait(uint32_t *word, uint32_t expected, int timeout_ms)
{
    struct timespec ts = {
        .tv_sec = timeout_ms / 1000,
        .tv_nsec = (long)(timeout_ms % 1000) * 1000000L,
    };
    /* Not FUTEX_PRIVATE: the word lives in memory shared between processes. */
    if (syscall(SYS_futex, word, FUTEX_WAIT, expected,
                timeout_ms < 0 ? NULL : &ts, NULL, 0) < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        return neg_errno();
    }
    return 0;
}

int mpu_futex_wake(uint32_t *word, int count)
{
    long n = syscall(SYS_futex, word, FUTEX_WAKE, count, NULL, NULL, 0);
    return n < 0 ? neg_errno() : (int)n;
}

uint32_t mpu_load32(uint32_t *word)
{
    return __atomic_load_n(word, __ATOMIC_SEQ_CST);
}

uint64_t mpu_load64(uint64_t *word)
{
    return __atomic_load_n(word, __ATOMIC_SEQ_CST);
}

uint64_t mpu_add64(uint64_t *word, int64_t delta)
{
    return __atomic_add_fetch(word, (uint64_t)delta, __ATOMIC_SEQ_CST);
}

static int cas32(uint32_t *word, uint32_t expected, uint32_t desired)
{
    return __atomic_compare_exchange_n(word, &expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* ---- page states ------------------------------------------------------- */

/* Returns MPU_FREE when the caller now owns the page as FILLING, MPU_PRESENT
 * when it is already there, or the state it kept (FILLING, LEAVING) when
 * the wait timed out. */
int mpu_page_begin_fill(struct mpu_page *page, uint32_t owner, int timeout_ms)
{
    for (;;) {
        uint32_t word = mpu_load32(&page->state);
        switch (STATE(word)) {
        case MPU_FREE:
            if (cas32(&page->state, word, OWNED(MPU_FILLING, owner)))
                return MPU_FREE;
            continue;
        case MPU_PRESENT:
            return MPU_PRESENT;
        default:
            if (mpu_futex_wait(&page->state, word, timeout_ms) == -ETIMEDOUT)
                return (int)STATE(word);
        }
    }
}

void mpu_page_end_fill(struct mpu_header *h, struct mpu_table *t,
                       struct mpu_page *page, int present, uint32_t flags)
{
    if (present) {
        page->stamp = mpu_add64(&h->clock, 1);
        __atomic_store_n(&page->flags, flags, __ATOMIC_SEQ_CST);
        mpu_add64(&t->present, 1);
        __atomic_store_n(&page->state, MPU_PRESENT, __ATOMIC_SEQ_CST);
        mpu_add64(&h->fills, 1);
        /* The region may have been released while we filled: whoever of
         * us and mpu_table_release sees the other takes the page back. */
        if (__atomic_load_n(&t->dead, __ATOMIC_SEQ_CST)
            && cas32(&page->state, MPU_PRESENT, MPU_FREE)) {
            mpu_add64(&t->present, -1);
            mpu_release(h, 1);
        }
    } else {
        __atomic_store_n(&page->state, MPU_FREE, __ATOMIC_SEQ_CST);
    }
    mpu_futex_wake(&page->state, INT_MAX);
}

uint32_t mpu_page_take_flags(struct mpu_page *page)
{
    return __atomic_exchange_n(&page->flags, 0, __ATOMIC_SEQ_CST);
}

int mpu_punch(int fd, uint64_t offset, uint64_t len)
{
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)offset, (off_t)len) < 0)
        return neg_errno();
    return 0;
}

/* 1: evicted, 0: the page was not PRESENT, <0: the punch failed (the page
 * stays PRESENT). */
int mpu_page_evict(struct mpu_table *t, struct mpu_page *page, uint32_t owner,
                   int memfd, uint64_t offset, uint64_t len)
{
    if (!cas32(&page->state, MPU_PRESENT, OWNED(MPU_LEAVING, owner)))
        return 0;
    mpu_add64(&t->present, -1);
    int err = mpu_punch(memfd, offset, len);
    if (err)
        mpu_add64(&t->present, 1);
    __atomic_store_n(&page->state, err ? MPU_PRESENT : MPU_FREE,
                     __ATOMIC_SEQ_CST);
    mpu_futex_wake(&page->state, INT_MAX);
    return err ? err : 1;
}

/* ---- walking a page table ----------------------------------------------- */

uint64_t mpu_table_next_run(int fd, uint64_t *first, uint64_t end)
{
    if (fd < 0 || *first >= end)
        return end;
    const uint64_t head = offsetof(struct mpu_table, pages);
    const uint64_t size = sizeof(struct mpu_page);
    off_t data = lseek(fd, (off_t)(head + *first * size), SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO)
            *first = end;  /* nothing but holes from there on */
        return end;        /* (or no SEEK_DATA: all of it) */
    }
    off_t hole = lseek(fd, data, SEEK_HOLE);
    uint64_t from = ((uint64_t)data - head) / size;
    if (from > *first)
        *first = from;
    if (hole < 0)
        return end;
    uint64_t to = ((uint64_t)hole - head + size - 1) / size;
    return to < end ? to : end;
}

uint64_t mpu_table_release(struct mpu_header *h, struct mpu_table *t, int fd)
{
    __atomic_store_n(&t->dead, 1, __ATOMIC_SEQ_CST);
    uint64_t freed = 0;
    for (uint64_t i = 0; i < t->npages;) {
        for (uint64_t stop = mpu_table_next_run(fd, &i, t->npages); i < stop; i++)
            if (cas32(&t->pages[i].state, MPU_PRESENT, MPU_FREE))
                freed++;
    }
    if (freed) {
        mpu_add64(&t->present, -(int64_t)freed);
        mpu_release(h, (uint32_t)freed);
    }
    return freed;
}

/* A worker died: the pages it held FILLING go back to FREE, those it held
 * LEAVING are punched out (again) and FREE.  Each held a buffer page. */
uint64_t mpu_table_recover(struct mpu_header *h, struct mpu_table *t, int fd,
                           uint32_t owner, int memfd, uint64_t page_size)
{
    uint64_t freed = 0;
    for (uint64_t i = 0; i < t->npages;) {
        for (uint64_t stop = mpu_table_next_run(fd, &i, t->npages); i < stop; i++) {
            uint32_t word = mpu_load32(&t->pages[i].state);
            uint32_t state = STATE(word);
            if ((state != MPU_FILLING && state != MPU_LEAVING) || word >> 2 != owner)
                continue;
            if (state == MPU_LEAVING)
                mpu_punch(memfd, i * page_size, page_size);
            if (cas32(&t->pages[i].state, word, MPU_FREE)) {
                mpu_futex_wake(&t->pages[i].state, INT_MAX);
                freed++;
            }
        }
    }
    if (freed)
        mpu_release(h, (uint32_t)freed);
    return freed;
}

/* The max oldest PRESENT pages among those with i % stride == phase, kept in
 * a max-heap on the stamp so that each page costs O(log max). */
static void sift_down(uint64_t *idx, uint64_t *stamp, uint64_t n, uint64_t i)
{
    for (;;) {
        uint64_t l = 2 * i + 1, r = l + 1, top = i;
        if (l < n && stamp[l] > stamp[top]) top = l;
        if (r < n && stamp[r] > stamp[top]) top = r;
        if (top == i)
            return;
        uint64_t s = stamp[i], x = idx[i];
        stamp[i] = stamp[top]; idx[i] = idx[top];
        stamp[top] = s; idx[top] = x;
        i = top;
    }
}

static void sift_up(uint64_t *idx, uint64_t *stamp, uint64_t i)
{
    while (i > 0) {
        uint64_t parent = (i - 1) / 2;
        if (stamp[parent] >= stamp[i])
            return;
        uint64_t s = stamp[i], x = idx[i];
        stamp[i] = stamp[parent]; idx[i] = idx[parent];
        stamp[parent] = s; idx[parent] = x;
        i = parent;
    }
}

uint64_t mpu_table_oldest(struct mpu_table *t, int fd, uint64_t stride,
                          uint64_t phase, uint64_t max, uint64_t *idx_out,
                          uint64_t *stamp_out)
{
    uint64_t n = 0;
    if (max == 0 || stride == 0)
        return 0;
    for (uint64_t i = 0; i < t->npages;) {
        uint64_t stop = mpu_table_next_run(fd, &i, t->npages);
        /* the first page of this run that is ours: i % stride == phase */
        for (i += (phase + stride - i % stride) % stride; i < stop; i += stride) {
            if (mpu_load32(&t->pages[i].state) != MPU_PRESENT)
                continue;
            uint64_t stamp = t->pages[i].stamp;
            if (n < max) {
                idx_out[n] = i;
                stamp_out[n] = stamp;
                sift_up(idx_out, stamp_out, n++);
            } else if (stamp < stamp_out[0]) {
                idx_out[0] = i;
                stamp_out[0] = stamp;
                sift_down(idx_out, stamp_out, n, 0);
            }
        }
    }
    return n;
}

/* ---- buffer accounting ------------------------------------------------- */

static void signal_evictors(const int *fds, int nfds)
{
    uint64_t one = 1;
    for (int i = 0; i < nfds; i++)
        if (write(fds[i], &one, sizeof one) < 0) {
            /* a full eventfd counter already says "run" */
        }
}

/* Past the high watermark, the first to get there calls the evictors. */
static void evict_past_high(struct mpu_header *h, uint32_t used, const int *evict_fds, int nfds)
{
    if (used >= mpu_load32(&h->high) && cas32(&h->evict_wanted, 0, 1))
        signal_evictors(evict_fds, nfds);
}

static void raise_peak(struct mpu_header *h, uint64_t value)
{
    uint64_t peak = __atomic_load_n(&h->peak_used, __ATOMIC_SEQ_CST);
    while (value > peak
           && !__atomic_compare_exchange_n(&h->peak_used, &peak, value, 0,
                                           __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        ;
}

/* Takes one page of the buffer for a fill.  When the buffer is full it wakes
 * the evictors and sleeps until pages are released (or the timeout). */
int mpu_reserve(struct mpu_header *h, const int *evict_fds, int nfds,
                int timeout_ms)
{
    int waited = 0;
    for (;;) {
        uint32_t used = mpu_load32(&h->used);
        if (used < mpu_load32(&h->limit)) {
            if (!cas32(&h->used, used, used + 1))
                continue;
            raise_peak(h, used + 1);
            evict_past_high(h, used + 1, evict_fds, nfds);
            return 0;
        }
        if (!waited++)
            mpu_add64(&h->full_waits, 1);
        __atomic_store_n(&h->evict_wanted, 1, __ATOMIC_SEQ_CST);
        signal_evictors(evict_fds, nfds);
        /* Counted before sleeping, so that mpu_release knows to wake us; a
         * release before the wait changes `used`, and the wait returns. */
        __atomic_add_fetch(&h->waiters, 1, __ATOMIC_SEQ_CST);
        int err = mpu_futex_wait(&h->used, used, timeout_ms);
        __atomic_sub_fetch(&h->waiters, 1, __ATOMIC_SEQ_CST);
        if (err == -ETIMEDOUT)
            return -ETIMEDOUT;
    }
}

/* Takes up to count pages without waiting: read-ahead and prefetch never
 * wait for room.  With evictors to call (read-ahead: a scan goes on, and
 * what it read first is evicted first), up to the limit, calling them as a
 * fault would; without (prefetch: what fits), below the high watermark only,
 * so that it never pushes out what is there.  Returns how many it took. */
int mpu_try_reserve(struct mpu_header *h, uint32_t count, const int *evict_fds, int nfds)
{
    for (;;) {
        uint32_t used = mpu_load32(&h->used);
        uint32_t high = mpu_load32(&h->high);
        uint32_t limit = mpu_load32(&h->limit);
        if (!evict_fds && high < limit)
            limit = high;  /* (high passes limit for a moment while it grows) */
        if (used >= limit)
            return 0;
        uint32_t take = limit - used < count ? limit - used : count;
        if (!cas32(&h->used, used, used + take))
            continue;
        raise_peak(h, used + take);
        if (evict_fds)
            evict_past_high(h, used + take, evict_fds, nfds);
        return (int)take;
    }
}

void mpu_release(struct mpu_header *h, uint32_t count)
{
    __atomic_sub_fetch(&h->used, count, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&h->waiters, __ATOMIC_SEQ_CST))
        mpu_futex_wake(&h->used, INT_MAX);
}

/* ---- accounting -------------------------------------------------------- */

uint64_t mpu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int latency_bucket(uint64_t ns)
{
    uint64_t us = ns / 1000;
    if (us < 8)
        return (int)us;
    int octave = 63 - __builtin_clzll(us);
    int bucket = 8 + (octave - 3) * 8 + (int)((us >> (octave - 3)) & 7);
    return bucket < MPU_LATENCY_BUCKETS ? bucket : MPU_LATENCY_BUCKETS - 1;
}

/* A fault of the client in `slot`, read at since_ns, was just answered. */
void mpu_account(struct mpu_header *h, uint32_t slot, uint64_t since_ns,
                 uint64_t bytes, int answer)
{
    uint64_t now = mpu_now_ns();
    uint64_t waited = now > since_ns ? now - since_ns : 0;
    mpu_add64(&h->latency[latency_bucket(waited)], 1);
    mpu_add64(answer == MPU_ANSWER_COPY ? &h->copies : &h->wakes, 1);
    if (slot >= MPU_CLIENT_SLOTS)
        return;
    struct mpu_client_stats *c = &h->clients[slot];
    mpu_add64(answer == MPU_ANSWER_COPY ? &c->copies : &c->wakes, 1);
    mpu_add64(&c->bytes, bytes);
    mpu_add64(&c->wait_ns, waited);
}

void mpu_beat(struct mpu_header *h, uint32_t worker)
{
    if (worker < MPU_WORKER_SLOTS)
        __atomic_store_n(&h->heartbeat[worker], mpu_now_ns(), __ATOMIC_RELAXED);
}

uint64_t mpu_round_up(uint64_t n, uint64_t multiple)
{
    return (n + multiple - 1) / multiple * multiple;
}

uint64_t mpu_system_pages(uint64_t bytes, uint64_t system_page)
{
    return (bytes + system_page - 1) / system_page;
}

/* ---- worker processes ------------------------------------------------- */

/* A worker must not outlive the server, even one killed with SIGKILL.  The
 * parent may have died before the prctl took effect: check that too. */
int mpu_die_with_parent(int sig, int parent)
{
    if (prctl(PR_SET_PDEATHSIG, sig) < 0)
        return neg_errno();
    if (getppid() != parent)
        return -ESRCH;
    return 0;
}

int mpu_set_name(const char *name)
{
    if (prctl(PR_SET_NAME, name) < 0)
        return neg_errno();
    return 0;
}
