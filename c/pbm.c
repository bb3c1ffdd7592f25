/*
 * The page directory: a descriptor per page in use, found through a hash
 * index, and the FIFO of PRESENT pages that evictors take victims from.
 * See struct mpu_desc and struct mpu_header in mpumap_core.h.
 *
 * What the directory costs follows the buffer, not the data: the segment is
 * sized for the largest buffer the server may have, but a memfd costs only
 * the pages written, and descriptors are handed out from the free list
 * before any new one is touched, so the memory in use is that of the most
 * pages the buffer held at once.  The index's buckets follow the limit.
 *
 * One lock guards the index, the free list, the FIFO, `used` (the buffer
 * pages taken: the descriptors in use, exactly) and the counts of PRESENT
 * pages; it is held for a few pointer moves, never across a system call
 * that waits.  Page states stay what they were, one 32-bit word each
 * with its owner's pid, and waiters sleep on that word, outside the lock.
 *
 * The lock is a robust, process-shared mutex: a worker killed while it held
 * it leaves the next taker EOWNERDEAD, and that taker rebuilds the index,
 * the free list, the FIFO and `used` from the descriptors, which are the
 * truth (a descriptor is in use exactly when its state is not FREE): no
 * buffer page is lost with a worker.  Pages the dead worker held FILLING or
 * LEAVING are the supervisor's to take back (mpu_pbm_recover), as before.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mpumap_core_internal.h"

#define MIN_BUCKETS 1024u
#define LOCK_WAIT_NS 200000000L  /* between heartbeats while waiting for the lock */
#define NONE 0u                  /* a descriptor link that ends */

static __thread int32_t beating = -1;

void mpu_pbm_set_worker(int32_t worker)
{
    beating = worker;
}

/* A sign of life from this process, if it is a worker: one that waits on
 * another (a lock, a page) is not the one found hung. */
static void beat_ours(struct mpu_header *h)
{
    if (beating >= 0)
        mpu_beat(h, (uint32_t)beating);
}

static uint32_t *buckets(struct mpu_header *h)
{
    return (uint32_t *)((char *)h + h->buckets_at);
}

static uint64_t align(uint64_t n, uint64_t to)
{
    return (n + to - 1) / to * to;
}

static uint32_t pow2_at_least(uint64_t n)
{
    uint64_t p = MIN_BUCKETS;
    while (p < n && p < (1ull << 31))
        p <<= 1;
    return (uint32_t)p;
}

/* The segment: the header, the regions' records, the descriptors, the
 * buckets; each part starts on a system page, so that one part's pages can
 * be given back without touching another's. */
static void layout(uint32_t capacity, uint32_t max_regions, uint64_t *regions_at,
                   uint64_t *descs_at, uint64_t *buckets_at, uint64_t *size)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    *regions_at = align(sizeof(struct mpu_header), page);
    *descs_at = align(*regions_at + (uint64_t)max_regions * sizeof(struct mpu_region_info), page);
    *buckets_at = align(*descs_at + (uint64_t)capacity * sizeof(struct mpu_desc), page);
    *size = align(*buckets_at + (uint64_t)pow2_at_least(capacity) * sizeof(uint32_t), page);
}

uint64_t mpu_pbm_size(uint32_t capacity, uint32_t max_regions)
{
    uint64_t a, b, c, size;
    layout(capacity, max_regions, &a, &b, &c, &size);
    return size;
}

int mpu_pbm_init(struct mpu_header *h, uint32_t capacity, uint32_t max_regions)
{
    if (capacity == 0 || capacity >= (1u << 31) || max_regions == 0)
        return -EINVAL;
    uint64_t size;
    layout(capacity, max_regions, &h->regions_at, &h->descs_at, &h->buckets_at, &size);
    h->capacity = capacity;
    h->max_regions = max_regions;
    h->max_buckets = pow2_at_least(capacity);
    h->nbuckets = MIN_BUCKETS < h->max_buckets ? MIN_BUCKETS : h->max_buckets;
    _Static_assert(sizeof(pthread_mutex_t) <= sizeof h->lock, "room for the lock");
    pthread_mutexattr_t attr;
    int err = pthread_mutexattr_init(&attr);
    if (!err)
        err = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (!err)
        err = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (!err)
        err = pthread_mutex_init((pthread_mutex_t *)h->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    return -err;
}

/* ---- the index, the free list, the FIFO (under the lock) ---------------------- */

/* Neighbouring pages share a cache line of buckets (BUCKET_RUN of them):
 * a scan walks the index in order instead of missing the cache on every
 * page.  The runs themselves are spread by a hash, so that pages a stride
 * apart do not pile up in one bucket. */
#define BUCKET_RUN 16u

static uint32_t bucket_of(struct mpu_header *h, uint32_t region, uint32_t gen, uint64_t page)
{
    uint64_t x = page / BUCKET_RUN * 0x9E3779B97F4A7C15ull ^ ((uint64_t)region << 32 | gen);
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    return (uint32_t)(x * BUCKET_RUN + page % BUCKET_RUN) & (h->nbuckets - 1);
}

static uint32_t lookup(struct mpu_header *h, uint32_t region, uint32_t gen, uint64_t page)
{
    struct mpu_desc *d = mpu_descs(h);
    for (uint32_t i = buckets(h)[bucket_of(h, region, gen, page)]; i != NONE; i = d[i - 1].chain)
        if (d[i - 1].page == page && d[i - 1].region == region && d[i - 1].gen == gen)
            return i;
    return NONE;
}

static void link_index(struct mpu_header *h, uint32_t i)
{
    struct mpu_desc *d = &mpu_descs(h)[i - 1];
    uint32_t *b = &buckets(h)[bucket_of(h, d->region, d->gen, d->page)];
    d->chain = *b;
    *b = i;
}

static void unlink_index(struct mpu_header *h, uint32_t i)
{
    struct mpu_desc *descs = mpu_descs(h), *d = &descs[i - 1];
    uint32_t *at = &buckets(h)[bucket_of(h, d->region, d->gen, d->page)];
    while (*at != NONE && *at != i)
        at = &descs[*at - 1].chain;
    if (*at == i)
        *at = d->chain;
}

static uint32_t take_free(struct mpu_header *h)
{
    uint32_t i = h->free_head;
    if (i != NONE) {
        h->free_head = mpu_descs(h)[i - 1].chain;
        return i;
    }
    if (h->top >= h->capacity)
        return NONE;
    return ++h->top;
}

/* The descriptor leaves the index (where it must be) and is FREE; its
 * buffer page is given back (see wake_room). */
static void put_free(struct mpu_header *h, uint32_t i)
{
    struct mpu_desc *d = &mpu_descs(h)[i - 1];
    unlink_index(h, i);
    __atomic_store_n(&d->state, MPU_FREE, __ATOMIC_SEQ_CST);
    d->chain = h->free_head;
    h->free_head = i;
    __atomic_sub_fetch(&h->used, 1, __ATOMIC_SEQ_CST);
}

/* After a page's state moved, outside the lock: whoever sleeps on it
 * looks again.  Most moves have no one waiting, and a wake of a shared
 * futex costs a page-table walk: waiters count themselves first (see
 * mpu_page_claim), so that a move either is seen by their futex wait or
 * sees their count. */
static void wake_page(struct mpu_header *h, struct mpu_desc *d)
{
    if (__atomic_load_n(&h->page_waiters, __ATOMIC_SEQ_CST))
        mpu_futex_wake(&d->state, INT_MAX);
}

/* Outside the lock: sleeps while a page's state (or dirty) word still reads
 * `seen`, for timeout_ms at most, counted among the page waiters so that
 * whoever moves the word wakes it (wake_page, wake_dirty).  0 or -errno. */
static int sleep_on(struct mpu_header *h, uint32_t *word, uint32_t seen, int timeout_ms)
{
    __atomic_add_fetch(&h->page_waiters, 1, __ATOMIC_SEQ_CST);
    int err = mpu_futex_wait(word, seen, timeout_ms);
    __atomic_sub_fetch(&h->page_waiters, 1, __ATOMIC_SEQ_CST);
    return err;
}

/* After pages were freed, outside the lock: fillers waiting for room
 * look again. */
static void wake_room(struct mpu_header *h)
{
    if (__atomic_load_n(&h->waiters, __ATOMIC_SEQ_CST))
        mpu_futex_wake(&h->used, INT_MAX);
}

static void fifo_push(struct mpu_header *h, uint32_t i)
{
    struct mpu_desc *descs = mpu_descs(h), *d = &descs[i - 1];
    d->newer = NONE;
    d->older = h->fifo_tail;
    if (h->fifo_tail != NONE)
        descs[h->fifo_tail - 1].newer = i;
    else
        h->fifo_head = i;
    h->fifo_tail = i;
}

static void fifo_remove(struct mpu_header *h, uint32_t i)
{
    struct mpu_desc *descs = mpu_descs(h), *d = &descs[i - 1];
    if (d->older != NONE)
        descs[d->older - 1].newer = d->newer;
    else
        h->fifo_head = d->newer;
    if (d->newer != NONE)
        descs[d->newer - 1].older = d->older;
    else
        h->fifo_tail = d->older;
    d->older = d->newer = NONE;
}

static void count_present(struct mpu_header *h, uint32_t region, int64_t n)
{
    mpu_add64(&h->present, n);
    if (region < h->max_regions)
        mpu_add64(&mpu_regions(h)[region].present, n);
}

/* ---- rebuilding from the descriptors --------------------------------------- */

/* Links every descriptor in use into the buckets anew.  Buckets from
 * `written` on hold nothing (never written, or given back), so only those
 * before are cleared: a large index costs memory as it is used. */
static void rebuild_index(struct mpu_header *h, uint32_t written)
{
    struct mpu_desc *d = mpu_descs(h);
    if (written > h->nbuckets)
        written = h->nbuckets;
    memset(buckets(h), 0, (size_t)written * sizeof(uint32_t));
    for (uint32_t i = 1; i <= h->top; i++)
        if (MPU_STATE(__atomic_load_n(&d[i - 1].state, __ATOMIC_SEQ_CST)) != MPU_FREE)
            link_index(h, i);
}

/* qsort has no argument for its comparison: only the lock's holder sorts,
 * one at a time across every process, so a static will do. */
static struct mpu_desc *sorting;

static int by_stamp(const void *a, const void *b)
{
    uint64_t x = sorting[*(const uint32_t *)a - 1].stamp;
    uint64_t y = sorting[*(const uint32_t *)b - 1].stamp;
    return x < y ? -1 : x > y;
}

/* Under the lock: every change of a page's dirty word goes through here,
 * which keeps the count of pages not CLEAN exact for the status. */
static void set_dirty(struct mpu_header *h, struct mpu_desc *d, uint32_t word)
{
    int was = d->dirty != MPU_CLEAN, is = word != MPU_CLEAN;
    if (was != is)
        mpu_add64(&h->dirty, is ? 1 : -1);
    d->dirty = word;
}

/* In the FIFO: PRESENT, and not being written back. */
static int in_fifo(const struct mpu_desc *d)
{
    return MPU_STATE(d->state) == MPU_PRESENT && MPU_STATE(d->dirty) != MPU_WRITING;
}

/* The lock's owner died holding it: whatever it was changing may be half
 * done.  The descriptors say what is in use; everything else follows. */
static void rebuild(struct mpu_header *h)
{
    struct mpu_desc *d = mpu_descs(h);
    rebuild_index(h, h->nbuckets);
    h->free_head = NONE;
    for (uint32_t i = h->top; i >= 1; i--)
        if (MPU_STATE(__atomic_load_n(&d[i - 1].state, __ATOMIC_SEQ_CST)) == MPU_FREE) {
            d[i - 1].chain = h->free_head;
            h->free_head = i;
        }
    /* The FIFO: PRESENT pages in fill order; their counts anew. */
    h->fifo_head = h->fifo_tail = NONE;
    uint32_t *present = malloc(((size_t)h->top + 1) * sizeof *present);
    uint32_t n = 0;
    for (uint32_t i = 1; i <= h->top; i++) {
        if (d[i - 1].region < h->max_regions)
            mpu_regions(h)[d[i - 1].region].present = 0;
        if (in_fifo(&d[i - 1])) {
            if (present)
                present[n] = i;
            n++;
        }
    }
    if (present) {
        sorting = d;
        qsort(present, n, sizeof *present, by_stamp);
        for (uint32_t k = 0; k < n; k++)
            fifo_push(h, present[k]);
        free(present);
    } else {  /* no memory to sort: in descriptor order, then */
        for (uint32_t i = 1; i <= h->top; i++)
            if (in_fifo(&d[i - 1]))
                fifo_push(h, i);
    }
    h->present = 0;
    uint32_t in_use = 0;
    uint64_t dirty = 0;
    for (uint32_t i = 1; i <= h->top; i++) {
        uint32_t state = MPU_STATE(d[i - 1].state);
        in_use += state != MPU_FREE;
        dirty += state != MPU_FREE && d[i - 1].dirty != MPU_CLEAN;
        if (state == MPU_PRESENT)
            count_present(h, d[i - 1].region, 1);
    }
    __atomic_store_n(&h->used, in_use, __ATOMIC_SEQ_CST);
    __atomic_store_n(&h->dirty, dirty, __ATOMIC_SEQ_CST);
}

/* ---- the lock ---------------------------------------------------------------- */

static void lock(struct mpu_header *h)
{
    pthread_mutex_t *m = (pthread_mutex_t *)h->lock;
    int err = pthread_mutex_trylock(m);
    while (err == EBUSY || err == ETIMEDOUT) {
        /* Held long: a worker stopped or dying with it.  Ours goes on
         * beating, so that only the one that holds it is found hung. */
        beat_ours(h);
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += LOCK_WAIT_NS;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        err = pthread_mutex_timedlock(m, &until);
    }
    if (err == EOWNERDEAD) {
        rebuild(h);
        pthread_mutex_consistent(m);
    }
    /* Any other error would be a bug in this file (EDEADLK): there is no
     * way on without the lock, and none that keeps the data safe. */
    else if (err)
        abort();
}

static void unlock(struct mpu_header *h)
{
    pthread_mutex_unlock((pthread_mutex_t *)h->lock);
}

/* ---- the index follows the limit ---------------------------------------------- */

/* Whether the memfd holds every byte of a page that clients map. */
static int whole_in(const struct mpu_region_slot *r, uint64_t page, uint64_t page_size)
{
    uint64_t start = page * page_size;
    if (start >= r->map_length)
        return 0;
    uint64_t end = r->map_length - start < page_size ? r->map_length : start + page_size;
    off_t hole = lseek(r->memfd, (off_t)start, SEEK_HOLE);  /* start itself, in a hole */
    return hole >= 0 && (uint64_t)hole >= end;
}

int mpu_pbm_fit_index(struct mpu_header *h, uint32_t limit)
{
    uint32_t want = pow2_at_least(limit);
    if (want > h->max_buckets)
        want = h->max_buckets;
    int err = 0;
    lock(h);
    uint32_t had = h->nbuckets;
    /* A factor of four of slack each way: a limit that wobbles does not
     * rebuild the index each time. */
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    if (want > had || (uint64_t)want * 4 < had) {
        /* A shrink gave back the system pages past the buckets it kept,
         * but not the rest of the page the last one is in: old heads wait
         * there for a growth, which clears them. */
        uint64_t written = align((uint64_t)had * sizeof(uint32_t), page) / sizeof(uint32_t);
        h->nbuckets = want;
        rebuild_index(h, written < want ? (uint32_t)written : want);
    }
    if ((uint64_t)want * 4 < had) {  /* the buckets no longer used go back */
        char *from = (char *)(buckets(h) + want), *to = (char *)(buckets(h) + had);
        char *start = (char *)(uintptr_t)align((uint64_t)(uintptr_t)from, page);
        if (to > start && madvise(start, (size_t)(to - start), MADV_REMOVE) < 0) {
            err = -errno;
            memset(start, 0, (size_t)(to - start));  /* kept, but holding nothing */
        }
    }
    unlock(h);
    return err;
}

/* ---- regions ---------------------------------------------------------------------- */

int mpu_region_open(struct mpu_header *h, uint32_t slot, uint32_t gen, uint64_t npages)
{
    if (slot >= h->max_regions || gen == 0)
        return -EINVAL;
    struct mpu_region_info *r = &mpu_regions(h)[slot];
    lock(h);
    r->gen = gen;
    r->dead = 0;
    r->npages = npages;
    r->present = 0;
    r->covered = npages;
    r->write_errors = 0;
    r->write_error = 0;
    r->stalled = 0;
    r->sealed = 0;
    unlock(h);
    return 0;
}

/* The word: slot + 1, and the generation in the high half (0: none). */
void mpu_set_in_store(struct mpu_header *h, int32_t worker, uint32_t slot, uint32_t gen)
{
    if (worker < 0 || worker >= MPU_WORKER_SLOTS)
        return;
    uint64_t word = gen ? (uint64_t)gen << 32 | (slot + 1) : 0;
    __atomic_store_n(&h->in_store[worker], word, __ATOMIC_RELEASE);
}

int mpu_worker_in_store(struct mpu_header *h, uint32_t worker, uint32_t *slot, uint32_t *gen)
{
    if (worker >= MPU_WORKER_SLOTS)
        return 0;
    uint64_t word = __atomic_load_n(&h->in_store[worker], __ATOMIC_ACQUIRE);
    *slot = (uint32_t)word - 1;
    *gen = (uint32_t)(word >> 32);
    return word != 0;
}

/* Sets one of a live region's flags (stalled, sealed) under the lock:
 * a page claimed or opened under it sees the flag as it was then. */
static int set_region_flag(struct mpu_header *h, uint32_t slot, uint32_t gen, size_t offset,
                           int on)
{
    if (slot >= h->max_regions)
        return -ENOENT;
    struct mpu_region_info *r = &mpu_regions(h)[slot];
    lock(h);
    int found = r->gen == gen && !r->dead;
    if (found)
        __atomic_store_n((uint32_t *)((char *)r + offset), on ? 1u : 0u, __ATOMIC_SEQ_CST);
    unlock(h);
    return found ? 0 : -ENOENT;
}

static int region_flag(struct mpu_header *h, uint32_t slot, uint32_t gen, size_t offset)
{
    if (slot >= h->max_regions)
        return 0;
    struct mpu_region_info *r = &mpu_regions(h)[slot];
    return r->gen == gen && __atomic_load_n((uint32_t *)((char *)r + offset), __ATOMIC_SEQ_CST);
}

int mpu_region_stall(struct mpu_header *h, uint32_t slot, uint32_t gen, int stalled)
{
    return set_region_flag(h, slot, gen, offsetof(struct mpu_region_info, stalled), stalled);
}

int mpu_region_stalled(struct mpu_header *h, uint32_t slot, uint32_t gen)
{
    return region_flag(h, slot, gen, offsetof(struct mpu_region_info, stalled));
}

int mpu_region_seal(struct mpu_header *h, uint32_t slot, uint32_t gen, int sealed)
{
    return set_region_flag(h, slot, gen, offsetof(struct mpu_region_info, sealed), sealed);
}

int mpu_region_sealed(struct mpu_header *h, uint32_t slot, uint32_t gen)
{
    return region_flag(h, slot, gen, offsetof(struct mpu_region_info, sealed));
}

uint32_t mpu_region_write_errors(struct mpu_header *h, uint32_t slot, uint32_t gen, int *last)
{
    *last = 0;
    if (slot >= h->max_regions)
        return 0;
    struct mpu_region_info *r = &mpu_regions(h)[slot];
    lock(h);
    uint32_t count = r->gen == gen ? r->write_errors : 0;
    if (count)
        *last = r->write_error;
    unlock(h);
    return count;
}

int mpu_lost_write(int err)
{
    switch (-err) {
    case ENOSPC: case EDQUOT: case EFBIG: case EROFS: case EIO: case EPERM: case EACCES:
    case EBADF:
        return 1;
    default:
        return 0;  /* (EAGAIN: a message on its way; ENOMEM: memory may come) */
    }
}

static int region_live(struct mpu_header *h, uint32_t slot, uint32_t gen)
{
    return slot < h->max_regions && mpu_regions(h)[slot].gen == gen
        && !mpu_regions(h)[slot].dead;
}

uint64_t mpu_region_present(struct mpu_header *h, uint32_t slot)
{
    return slot < h->max_regions ? mpu_load64(&mpu_regions(h)[slot].present) : 0;
}

int64_t mpu_region_release(struct mpu_header *h, uint32_t slot, uint32_t gen)
{
    if (slot >= h->max_regions)
        return -EINVAL;
    lock(h);
    if (mpu_regions(h)[slot].gen == gen)
        mpu_regions(h)[slot].dead = 1;
    uint32_t top = h->top;
    unlock(h);
    /* Once dead, no page of it is claimed again: one walk over the
     * descriptors finds every PRESENT one.  FILLING and LEAVING ones come
     * back as their fills and evictions end (mpu_page_filled, evict). */
    struct mpu_desc *d = mpu_descs(h);
    uint32_t freed = 0;
    for (uint32_t i = 1; i <= top; i++) {
        if (d[i - 1].region != slot || d[i - 1].gen != gen)
            continue;
        lock(h);
        /* (A page being written back is out of the FIFO: its writer frees
         * it when done.) */
        if (d[i - 1].region == slot && d[i - 1].gen == gen && in_fifo(&d[i - 1])) {
            set_dirty(h, &d[i - 1], MPU_CLEAN);
            fifo_remove(h, i);
            count_present(h, slot, -1);
            put_free(h, i);
            freed++;
        }
        unlock(h);
    }
    wake_room(h);
    return freed;
}

/* ---- room in the buffer ---------------------------------------------------------- */

static void signal_evictors(const int *fds, int nfds)
{
    uint64_t one = 1;
    for (int i = 0; i < nfds; i++)
        if (write(fds[i], &one, sizeof one) < 0) {
            /* a full eventfd counter already says "run" */
        }
}

/* The buffer was full at `used`: the evictors are called, and we sleep
 * until pages are given back (wake_room) or the limit moves, for up to
 * timeout_ms.  0, or -EAGAIN when the time ran out. */
static int sleep_for_room(struct mpu_header *h, uint32_t used, int timeout_ms,
                          const int *evict_fds, int nevict)
{
    __atomic_store_n(&h->evict_wanted, 1, __ATOMIC_SEQ_CST);
    signal_evictors(evict_fds, nevict);
    /* Counted before sleeping, so that wake_room knows to wake us; a page
     * given back before the wait changes `used`, and the wait returns at
     * once. */
    __atomic_add_fetch(&h->waiters, 1, __ATOMIC_SEQ_CST);
    int err = mpu_futex_wait(&h->used, used, timeout_ms);
    __atomic_sub_fetch(&h->waiters, 1, __ATOMIC_SEQ_CST);
    return err == -ETIMEDOUT ? -EAGAIN : 0;
}

static void raise_peak(struct mpu_header *h, uint64_t value)
{
    uint64_t peak = __atomic_load_n(&h->peak_used, __ATOMIC_SEQ_CST);
    while (value > peak
           && !__atomic_compare_exchange_n(&h->peak_used, &peak, value, 0,
                                           __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        ;
}

/* Under the lock: takes a buffer page for a new descriptor if `how` allows
 * one now.  1: taken; 0: no room (*used says what it saw).  *call: the
 * evictors should run (past the high watermark, the first to get there
 * calls them). */
static int take_room(struct mpu_header *h, int how, uint32_t *used, int *call)
{
    uint32_t high = __atomic_load_n(&h->high, __ATOMIC_SEQ_CST);
    uint32_t limit = __atomic_load_n(&h->limit, __ATOMIC_SEQ_CST);
    if (how == MPU_CLAIM_PREFETCH && high < limit)
        limit = high;  /* (high passes limit for a moment while it grows) */
    *used = __atomic_load_n(&h->used, __ATOMIC_SEQ_CST);
    if (*used >= limit)
        return 0;
    __atomic_store_n(&h->used, *used + 1, __ATOMIC_SEQ_CST);
    raise_peak(h, *used + 1);
    *call = how != MPU_CLAIM_PREFETCH && *used + 1 >= high
        && __atomic_exchange_n(&h->evict_wanted, 1, __ATOMIC_SEQ_CST) == 0;
    return 1;
}

/* ---- pages ------------------------------------------------------------------------ */

int mpu_page_claim(struct mpu_header *h, uint32_t region, uint32_t gen, uint64_t page,
                   uint32_t owner, int how, int timeout_ms, const int *evict_fds,
                   int nevict, uint32_t *desc, uint32_t *flags)
{
    struct mpu_desc *descs = mpu_descs(h);
    int waited_for_room = 0;
    for (;;) {
        lock(h);
        if (!region_live(h, region, gen)) {
            unlock(h);
            return -ESTALE;
        }
        uint32_t i = lookup(h, region, gen, page);
        if (i == NONE) {
            uint32_t used;
            int call = 0;
            if (!take_room(h, how, &used, &call)) {
                unlock(h);
                if (how != MPU_CLAIM_FAULT)
                    return -EAGAIN;
                /* Full: we sleep until pages are given back or the limit
                 * moves (sleep_for_room). */
                if (!waited_for_room++)
                    mpu_add64(&h->full_waits, 1);
                if (sleep_for_room(h, used, timeout_ms, evict_fds, nevict) < 0)
                    return -EAGAIN;
                continue;
            }
            i = take_free(h);
            if (i == NONE) {
                __atomic_sub_fetch(&h->used, 1, __ATOMIC_SEQ_CST);
                unlock(h);
                return -ENOSPC;
            }
            struct mpu_desc *d = &descs[i - 1];
            d->region = region;
            d->gen = gen;
            d->page = page;
            d->flags = 0;
            set_dirty(h, d, MPU_CLEAN);
            d->stamp = 0;
            d->older = d->newer = NONE;
            __atomic_store_n(&d->state, MPU_OWNED(MPU_FILLING, owner), __ATOMIC_SEQ_CST);
            link_index(h, i);
            unlock(h);
            if (call)
                signal_evictors(evict_fds, nevict);
            *desc = i;
            return MPU_FREE;
        }
        struct mpu_desc *d = &descs[i - 1];
        uint32_t word = __atomic_load_n(&d->state, __ATOMIC_SEQ_CST);
        if (MPU_STATE(word) == MPU_PRESENT) {
            uint32_t taken = __atomic_exchange_n(&d->flags, 0, __ATOMIC_SEQ_CST);
            unlock(h);
            if (flags)
                *flags = taken;
            *desc = i;
            return MPU_PRESENT;
        }
        unlock(h);
        if (timeout_ms == 0)
            return (int)MPU_STATE(word);
        /* Woken, the descriptor may be another page's by now: look again. */
        if (sleep_on(h, &d->state, word, timeout_ms) == -ETIMEDOUT)
            return (int)MPU_STATE(word);
    }
}

int mpu_pbm_wait_room(struct mpu_header *h, int timeout_ms, const int *evict_fds, int nevict)
{
    uint32_t used = __atomic_load_n(&h->used, __ATOMIC_SEQ_CST);
    if (used < __atomic_load_n(&h->limit, __ATOMIC_SEQ_CST))
        return 0;
    return sleep_for_room(h, used, timeout_ms, evict_fds, nevict);
}

void mpu_page_filled(struct mpu_header *h, uint32_t desc, int present, uint32_t flags)
{
    struct mpu_desc *d = &mpu_descs(h)[desc - 1];
    lock(h);
    if (present && region_live(h, d->region, d->gen)) {
        d->stamp = mpu_add64(&h->clock, 1);
        d->flags = flags & ~MPU_FILL_DIRTY;
        set_dirty(h, d, flags & MPU_FILL_DIRTY ? MPU_DIRTY : MPU_CLEAN);
        __atomic_store_n(&d->state, MPU_PRESENT, __ATOMIC_SEQ_CST);
        /* At the FIFO's tail only now, after the fault it was filled for
         * was answered: no evictor takes it before its reader had it. */
        fifo_push(h, desc);
        count_present(h, d->region, 1);
    } else {
        put_free(h, desc);  /* (or its region went while we filled it) */
    }
    unlock(h);
    if (present)
        mpu_add64(&h->fills, 1);  /* (whether its region is still there or not) */
    if (present && (flags & MPU_FILL_DIRTY))
        mpu_add64(&h->writes, 1);
    wake_page(h, d);
    wake_room(h);
}

int mpu_page_state(struct mpu_header *h, uint32_t region, uint32_t gen, uint64_t page)
{
    lock(h);
    uint32_t i = lookup(h, region, gen, page);
    int state = i == NONE ? MPU_FREE
                          : (int)MPU_STATE(__atomic_load_n(&mpu_descs(h)[i - 1].state,
                                                           __ATOMIC_SEQ_CST));
    unlock(h);
    return state;
}

/* The page is PRESENT and ours to take out: LEAVING, out of the FIFO. */
static void mark_leaving(struct mpu_header *h, struct mpu_desc *d, uint32_t owner)
{
    __atomic_store_n(&d->state, MPU_OWNED(MPU_LEAVING, owner), __ATOMIC_SEQ_CST);
    count_present(h, d->region, -1);
}

static void take_leaving(struct mpu_header *h, uint32_t i, uint32_t owner)
{
    mark_leaving(h, &mpu_descs(h)[i - 1], owner);
    fifo_remove(h, i);
}

/* Punches `n` LEAVING pages, consecutive pages of one region, out of its
 * memfd in one go and frees them; a punch that fails puts them back,
 * PRESENT, at the FIFO's tail.  0 or -errno. */
static int punch_out(struct mpu_header *h, const uint32_t *run, uint32_t n, int memfd,
                     uint64_t page_size)
{
    struct mpu_desc *descs = mpu_descs(h);
    int err = memfd >= 0 ? mpu_punch(memfd, descs[run[0] - 1].page * page_size,
                                     n * page_size) : 0;
    lock(h);
    for (uint32_t k = 0; k < n; k++) {
        struct mpu_desc *d = &descs[run[k] - 1];
        if (err) {
            __atomic_store_n(&d->state, MPU_PRESENT, __ATOMIC_SEQ_CST);
            fifo_push(h, run[k]);
            count_present(h, d->region, 1);
        } else {
            put_free(h, run[k]);
        }
    }
    unlock(h);
    for (uint32_t k = 0; k < n; k++)
        wake_page(h, &descs[run[k] - 1]);
    return err;
}

/* ---- writing pages back -------------------------------------------------------- */

/* After a page's dirty word moved, outside the lock. */
static void wake_dirty(struct mpu_header *h, struct mpu_desc *d)
{
    if (__atomic_load_n(&h->page_waiters, __ATOMIC_SEQ_CST))
        mpu_futex_wake(&d->dirty, INT_MAX);
}

/* Under the lock: a DIRTY page is ours to write back, out of the FIFO. */
static void take_writing(struct mpu_header *h, uint32_t i, uint32_t owner)
{
    struct mpu_desc *d = &mpu_descs(h)[i - 1];
    set_dirty(h, d, MPU_OWNED(MPU_WRITING, owner));
    fifo_remove(h, i);
}

/* Under the lock: the end of a write-back, of a page that stays: CLEAN, or
 * DIRTY again when it failed (or was not tried), back in the FIFO at its
 * tail.  A page whose region was released meanwhile is freed. */
static void end_writing(struct mpu_header *h, uint32_t i, int clean)
{
    struct mpu_desc *d = &mpu_descs(h)[i - 1];
    set_dirty(h, d, clean ? MPU_CLEAN : MPU_DIRTY);
    if (!region_live(h, d->region, d->gen)) {
        set_dirty(h, d, MPU_CLEAN);
        count_present(h, d->region, -1);
        put_free(h, i);
        return;
    }
    d->stamp = mpu_add64(&h->clock, 1);  /* the FIFO stays in stamp order */
    fifo_push(h, i);
}

/* Descriptors a flush looks at under one hold of the lock. */
#define SCAN_HOLD 2048u

/* A write-back moves the memfd's pages to the file through a pipe (splice:
 * one copy, into the file's page cache), or where the file will not take
 * that, reads them into this much memory at a time and writes them (two).
 * Both are the process's own: workers write back one run at a time. */
#define WRITE_CHUNK (4u << 20)
#define WRITE_PIPE (1u << 20)   /* fs.pipe-max-size's default: no privilege needed */
static char *write_chunk;
static int write_pipe[2] = { -1, -1 };
static int write_pipe_size;     /* 0: not made yet; -1: splice is not for us */

static void close_write_pipe(void)
{
    close(write_pipe[0]);
    close(write_pipe[1]);
    write_pipe[0] = write_pipe[1] = -1;
    write_pipe_size = 0;
}

/* [at, at + len) of memfd to the same place in fd by splice: 0, or -errno
 * (then the caller copies the span itself; a pipe left with bytes in it is
 * closed, and made anew next time). */
static int splice_out(int memfd, int fd, uint64_t at, uint64_t len)
{
    if (write_pipe_size < 0)
        return -EINVAL;
    if (write_pipe_size == 0) {
        if (pipe2(write_pipe, O_CLOEXEC) < 0) {
            write_pipe_size = -1;
            return -EINVAL;
        }
        int size = fcntl(write_pipe[1], F_SETPIPE_SZ, WRITE_PIPE);
        write_pipe_size = size > 0 ? size : (int)fcntl(write_pipe[1], F_GETPIPE_SZ);
    }
    while (len) {
        loff_t in = (loff_t)at, out = (loff_t)at;
        size_t want = len < (uint64_t)write_pipe_size ? (size_t)len : (size_t)write_pipe_size;
        ssize_t n = splice(memfd, &in, write_pipe[1], NULL, want, 0);
        if (n <= 0) {
            int err = n < 0 ? errno : EIO;
            if (err == EINTR)
                continue;
            close_write_pipe();
            return -err;
        }
        for (ssize_t left = n; left > 0;) {
            ssize_t m = splice(write_pipe[0], NULL, fd, &out, (size_t)left, 0);
            if (m < 0 && errno == EINTR)
                continue;
            if (m <= 0) {
                int err = m < 0 ? errno : EIO;
                close_write_pipe();
                if (err == EINVAL)
                    write_pipe_size = -1;  /* this file takes no splice: copy from now on */
                return -err;
            }
            left -= m;
        }
        at += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

/* [at, at + len) of memfd to the same place in fd, opened O_DIRECT: no copy
 * by the CPU and none left in the page cache (the disk reads the memfd's
 * pages where they are, through a mapping of our own), and the flush's
 * fdatasync finds nothing left to write.  But each write waits for the
 * disk: a span shorter than DIRECT_MIN (random writes evict single pages)
 * goes through the page cache, whose write-back batches them (1 GiB of
 * random 64 KiB pages went from 0.055 to 0.022 GB/s written directly).
 * Whole system pages only; 0, or -errno (then the caller writes the span
 * through the page cache: a file system that wants larger blocks says
 * EINVAL). */
#define DIRECT_MIN (1u << 20)
static int write_direct(int memfd, int fd, uint64_t at, uint64_t len)
{
    char *from = mmap(NULL, len, PROT_READ, MAP_SHARED, memfd, (off_t)at);
    if (from == MAP_FAILED)
        return -errno;
    int err = 0;
    for (uint64_t done = 0; done < len && !err;) {
        ssize_t n = pwrite(fd, from + done, len - done, (off_t)(at + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            err = n < 0 ? -errno : -EIO;
        else
            done += (uint64_t)n;
    }
    munmap(from, len);
    return err;
}

/* A client's guard copies the buffer to the file under a write lock on
 * the whole memfd (fcntl, see guard.c) when its connection to the server
 * drops, and the server may live on; a write-back holds a read lock on
 * its span, so that the two take turns.  Else a page the guard read
 * before a client wrote it, written by the guard after an evictor wrote
 * the newer page and marked it clean, would leave the file older than the
 * buffer.  Waited for beating: a guard copies whole mappings. */
static void lock_span(struct mpu_header *h, int memfd, uint64_t at, uint64_t len, short how)
{
    struct flock l = { .l_type = how, .l_whence = SEEK_SET, .l_start = (off_t)at,
                       .l_len = (off_t)len };
    while (fcntl(memfd, F_SETLK, &l) < 0 && how != F_UNLCK
           && (errno == EACCES || errno == EAGAIN || errno == EINTR)) {
        beat_ours(h);
        usleep(1000);
    }
}

/* Writes pages [first, first + n) of region r, which the caller holds
 * WRITING, to its file: protected first in every writable mapping, so that
 * a write that comes meanwhile faults (and waits) instead of going
 * unseen.  0 or -errno; -EAGAIN: a writer's client is not known here yet. */
static int write_pages(struct mpu_header *h, uint32_t slot, const struct mpu_region_slot *r,
                       const struct mpu_client_slot *clients, uint32_t nclients,
                       uint64_t first, uint64_t n, uint64_t page_size)
{
    if (r->write_fd < 0)
        return -EAGAIN;  /* the message with the file is on its way */
    uint64_t start = first * page_size, end = (first + n) * page_size;
    lock(h);
    int err = 0;
    for (uint32_t k = 0; k < MPU_MAX_WRITERS && !err; k++) {
        const struct mpu_writer *w = &h->writers[k];
        if (!w->gen || w->region != slot || w->gen != r->gen || start >= w->length)
            continue;
        const struct mpu_client_slot *c = w->client < nclients ? &clients[w->client] : NULL;
        if (!c || c->uffd < 0 || c->gen != w->client_gen) {
            err = -EAGAIN;
            break;
        }
        uint64_t len = (end < w->length ? end : w->length) - start;
        int e = mpu_uffd_writeprotect(c->uffd, w->address + start, len, 1);
        /* A client that died or unmapped writes nothing more. */
        if (e && e != -ENOENT && e != -EINVAL && e != -ESRCH && e != -EFAULT)
            err = e;
    }
    unlock(h);
    if (err)
        return err;
    if (mpu_region_stalled(h, slot, r->gen))
        return -EIO;  /* its store hung a worker: no other is sent in */
    if (end > r->size)
        end = r->size;  /* the file's last page ends where the file does */
    mpu_set_in_store(h, beating, slot, r->gen);
    lock_span(h, r->memfd, start, end - start, F_RDLCK);
    uint64_t at = start;  /* what is left goes through the page cache */
    if (r->direct_fd >= 0 && end - start >= DIRECT_MIN) {
        /* Whole system pages: a direct write of the file's partial last
         * page would make the file longer.  That goes through the cache. */
        uint64_t system_page = (uint64_t)sysconf(_SC_PAGESIZE);
        uint64_t whole = (end - start) / system_page * system_page;
        if (write_direct(r->memfd, r->direct_fd, start, whole) == 0)
            at += whole;
    }
    if (end > at && splice_out(r->memfd, r->write_fd, at, end - at) < 0) {
        if (!write_chunk && !(write_chunk = malloc(WRITE_CHUNK)))
            err = -ENOMEM;
        else
            err = mpu_copy_range(r->memfd, r->write_fd, at, end - at, write_chunk,
                                 WRITE_CHUNK);
    }
    lock_span(h, r->memfd, start, end - start, F_UNLCK);
    mpu_set_in_store(h, beating, 0, 0);
    if (err)
        return err;
    mpu_add64(&h->written, (int64_t)n);
    beat_ours(h);  /* a long write-back is no hang */
    return 0;
}

/* Pages one punch takes out at most: a scan fills, and so evicts, runs of
 * consecutive pages, and a punch (which zaps every client's mapping of
 * the range) costs about the same for one page as for many. */
#define EVICT_RUN 256
#define WRITTEN 1           /* how a dirty page of an eviction run ended */
#define DROPPED 2

int64_t mpu_pbm_evict(struct mpu_header *h, uint32_t max, uint32_t owner,
                      const struct mpu_region_slot *regions, uint32_t nregions,
                      const struct mpu_client_slot *clients, uint32_t nclients,
                      uint64_t page_size)
{
    struct mpu_desc *descs = mpu_descs(h);
    uint32_t evicted = 0, run[EVICT_RUN];
    int err = 0, more = 1;
    while (more && evicted < max) {
        /* The oldest pages, as long as each is the page after the last of
         * the same region.  Dirty ones are taken WRITING, the rest LEAVING. */
        uint32_t n = 0, dirty = 0, slot = 0, rotated = 0;
        const struct mpu_region_slot *r = NULL;
        int memfd = -1;
        lock(h);
        while (n < EVICT_RUN && evicted + n < max) {
            uint32_t i = h->fifo_head;
            if (i == NONE) {
                more = 0;
                break;
            }
            struct mpu_desc *d = &descs[i - 1];
            if (n) {
                const struct mpu_desc *last = &descs[run[n - 1] - 1];
                if (d->region != last->region || d->gen != last->gen
                    || d->page != last->page + 1)
                    break;
            } else {
                r = d->region < nregions ? &regions[d->region] : NULL;
                int known = r && r->live && r->gen == d->gen;
                if (!known && region_live(h, d->region, d->gen)) {
                    more = 0;  /* a region we have not heard of yet: its message waits */
                    break;
                }
                /* (A region that is gone needs no punch: its memfd goes with it.) */
                memfd = known ? r->memfd : -1;
                slot = d->region;
                if (!known)
                    r = NULL;
            }
            if (d->dirty != MPU_CLEAN && (d->dirty != MPU_DIRTY || !r)) {
                /* Being opened for a writer this moment (or dirty in a
                 * region that is gone, whose file nobody writes now): it
                 * goes to the tail, and the run ends here. */
                if (n || rotated++ > EVICT_RUN)
                    break;
                fifo_remove(h, i);
                d->stamp = mpu_add64(&h->clock, 1);
                fifo_push(h, i);
                continue;
            }
            if (d->dirty == MPU_DIRTY) {
                take_writing(h, i, owner);
                dirty++;
            } else {
                take_leaving(h, i, owner);
            }
            run[n++] = i;
        }
        unlock(h);
        if (!n)
            break;
        if (dirty) {
            /* The dirty pages' spans written (never a clean page: the file
             * may have been written since it was read), then LEAVING like
             * the others.  (The WRITING pages are ours: read unlocked.)
             * A span the file will never take (a full disk, say) would stay
             * in the buffer for ever, and every client of every region
             * wait for room: its pages are tried one by one, and those
             * refused dropped, as the kernel drops them. */
            uint8_t how[EVICT_RUN] = { 0 };  /* WRITTEN, DROPPED, 0: dirty again */
            int wrote = 0, dropped = 0;
            for (uint32_t k = 0; k < n && !wrote;) {
                uint32_t j = k;
                while (j < n && MPU_STATE(descs[run[j] - 1].dirty) == MPU_WRITING)
                    j++;
                if (j > k)
                    wrote = write_pages(h, slot, r, clients, nclients, descs[run[k] - 1].page,
                                        j - k, page_size);
                if (wrote < 0 && mpu_lost_write(wrote)) {
                    /* Which of them the file refuses: one at a time. */
                    wrote = 0;
                    for (uint32_t m = k; m < j && !wrote; m++) {
                        int e = write_pages(h, slot, r, clients, nclients,
                                            descs[run[m] - 1].page, 1, page_size);
                        if (e < 0 && !mpu_lost_write(e)) {
                            wrote = e;  /* for now: this page and the rest stay dirty */
                        } else {
                            how[m] = e ? DROPPED : WRITTEN;
                            dropped = e ? e : dropped;
                        }
                    }
                } else if (!wrote) {
                    for (uint32_t m = k; m < j; m++)
                        how[m] = WRITTEN;
                }
                k = j > k ? j : k + 1;
            }
            uint32_t kept = 0;
            lock(h);
            if (dropped) {
                struct mpu_region_info *info = &mpu_regions(h)[slot];
                if (info->gen == descs[run[0] - 1].gen) {
                    info->write_errors++;
                    info->write_error = -dropped;
                }
            }
            for (uint32_t k = 0; k < n; k++) {
                struct mpu_desc *d = &descs[run[k] - 1];
                if (MPU_STATE(d->dirty) != MPU_WRITING)
                    continue;
                if (how[k]) {
                    set_dirty(h, d, MPU_CLEAN);
                    mark_leaving(h, d, owner);  /* (out of the FIFO already) */
                    if (how[k] == DROPPED)
                        mpu_add64(&h->lost_writes, 1);
                } else {
                    end_writing(h, run[k], 0);
                }
            }
            if (wrote) {
                /* Only the pages of the run that are clean now go. */
                for (uint32_t k = 0; k < n; k++)
                    if (MPU_STATE(descs[run[k] - 1].state) == MPU_LEAVING)
                        run[kept++] = run[k];
            }
            unlock(h);
            for (uint32_t k = 0; k < n; k++)
                wake_dirty(h, &descs[run[k] - 1]);
            if (wrote) {
                for (uint32_t k = 0; k < kept; k++)
                    punch_out(h, &run[k], 1, memfd, page_size);
                evicted += kept;
                err = wrote;
                wake_room(h);
                break;
            }
        }
        err = punch_out(h, run, n, memfd, page_size);
        if (err)
            break;
        /* Given back at once: a filler waiting for room goes on. */
        wake_room(h);
        evicted += n;
    }
    mpu_add64(&h->evictions, evicted);
    return evicted ? (int64_t)evicted : err;
}

/* Waits until no page of region slot (generation gen) in [first, end) is
 * being filled.  A page filled for a write is a hole of the memfd until
 * its copy, which a write-back's walk over the memfd's data passes over.
 * Whether it waited for any (what they made dirty is then to be written
 * too). */
static int wait_fills(struct mpu_header *h, uint32_t slot, uint32_t gen, uint64_t first,
                      uint64_t end)
{
    struct mpu_desc *descs = mpu_descs(h);
    uint32_t top = __atomic_load_n(&h->top, __ATOMIC_SEQ_CST);
    int waited = 0;
    for (uint32_t i = 1; i <= top; i++) {
        struct mpu_desc *d = &descs[i - 1];
        for (;;) {
            lock(h);
            uint32_t seen = d->state;
            int filling = MPU_STATE(seen) == MPU_FILLING && d->region == slot && d->gen == gen
                && d->page >= first && d->page < end;
            unlock(h);
            if (!filling || mpu_region_stalled(h, slot, gen))
                break;  /* (a filler caught in a stalled store never ends its fill) */
            sleep_on(h, &d->state, seen, 200);
            beat_ours(h);
            waited = 1;
        }
    }
    return waited;
}

/* One walk of mpu_region_write_back over [first, end): the dirty pages the
 * memfd holds there to the file, in runs; *written counts them.  0, or
 * -errno. */
static int write_dirty(struct mpu_header *h, uint32_t slot, const struct mpu_region_slot *r,
                       const struct mpu_client_slot *clients, uint32_t nclients,
                       uint64_t first, uint64_t end, uint32_t owner, uint64_t page_size,
                       uint64_t *written)
{
    struct mpu_desc *descs = mpu_descs(h);
    uint32_t run[EVICT_RUN];
    /* Only where the memfd holds pages: a hole has nothing to write. */
    for (uint64_t page = first; page < end;) {
        off_t data = lseek(r->memfd, (off_t)(page * page_size), SEEK_DATA);
        if (data < 0)
            break;  /* (ENXIO: no data past it) */
        page = (uint64_t)data / page_size;
        if (page >= end)
            break;
        uint32_t n = 0;
        uint64_t run_first = page;
        int waited = 0;
        if (mpu_region_stalled(h, slot, r->gen))
            return -EIO;  /* its store hangs: nothing written, no sync */
        lock(h);
        if (!region_live(h, slot, r->gen)) {
            unlock(h);
            return -ESTALE;
        }
        /* Clean pages before a run are passed over under one hold of the
         * lock (SCAN_HOLD at most: others wait for it). */
        for (uint32_t scanned = 0; page < end && n < EVICT_RUN && scanned < SCAN_HOLD;
             page++, scanned++) {
            uint32_t i = lookup(h, slot, r->gen, page);
            struct mpu_desc *d = i == NONE ? NULL : &descs[i - 1];
            uint32_t state = d ? MPU_STATE(d->state) : MPU_FREE;
            uint32_t word = d ? d->dirty : MPU_CLEAN;
            /* A page filled for a write is the writer's before it is
             * PRESENT (and DIRTY); one being opened, or written back by an
             * evictor, is DIRTY (then written by us) or in the file once
             * that is over: either is waited for. */
            uint32_t *busy = state == MPU_FILLING ? &d->state
                : state == MPU_PRESENT && word != MPU_CLEAN && word != MPU_DIRTY ? &d->dirty
                : NULL;
            if (busy) {
                if (n)
                    break;
                uint32_t seen = *busy;
                unlock(h);
                sleep_on(h, busy, seen, 200);
                beat_ours(h);  /* (a worker caught in a store is the one that hangs) */
                waited = 1;
                break;
            }
            if (state != MPU_PRESENT || word == MPU_CLEAN) {
                if (n)
                    break;
                run_first = page + 1;
                continue;
            }
            take_writing(h, i, owner);
            run[n++] = i;
        }
        if (!waited)
            unlock(h);
        if (waited || !n)
            continue;  /* the same page again, or on from where the scan got */
        int err = write_pages(h, slot, r, clients, nclients, run_first, n, page_size);
        lock(h);
        for (uint32_t k = 0; k < n; k++)
            end_writing(h, run[k], !err);
        unlock(h);
        for (uint32_t k = 0; k < n; k++)
            wake_dirty(h, &descs[run[k] - 1]);
        if (err)
            return err;
        *written += n;
    }
    return 0;
}

int64_t mpu_region_write_back(struct mpu_header *h, uint32_t slot,
                              const struct mpu_region_slot *r,
                              const struct mpu_client_slot *clients, uint32_t nclients,
                              uint64_t first, uint64_t count, uint32_t owner,
                              uint64_t page_size)
{
    if (first > r->npages)
        first = r->npages;
    if (count > r->npages - first)
        count = r->npages - first;
    uint64_t end = first + count, written = 0;
    int err;
    /* The last write-back (the region sealed: nobody maps it) must have
     * what fills for writes, claimed before the seal, make dirty too. */
    do {
        err = write_dirty(h, slot, r, clients, nclients, first, end, owner, page_size,
                          &written);
        if (err)
            return err;
    } while (mpu_region_sealed(h, slot, r->gen) && wait_fills(h, slot, r->gen, first, end));
    if (mpu_region_stalled(h, slot, r->gen))
        return -EIO;
    mpu_set_in_store(h, beating, slot, r->gen);
    err = r->write_fd >= 0 && fdatasync(r->write_fd) < 0 ? -errno : 0;
    mpu_set_in_store(h, beating, 0, 0);
    return err ? err : (int64_t)written;
}

/* ---- writers ------------------------------------------------------------------------ */

int mpu_writer_add(struct mpu_header *h, uint32_t region, uint32_t gen, uint32_t client,
                   uint32_t client_gen, uint64_t address, uint64_t length)
{
    int err = -ENOSPC;
    lock(h);
    for (uint32_t k = 0; k < MPU_MAX_WRITERS; k++)
        if (!h->writers[k].gen) {
            h->writers[k] = (struct mpu_writer){ region, gen, client, client_gen,
                                                 address, length };
            err = 0;
            break;
        }
    unlock(h);
    return err;
}

int mpu_writer_remove(struct mpu_header *h, uint32_t client, uint32_t client_gen,
                      uint32_t region, uint32_t gen, uint64_t address)
{
    int removed = 0;
    lock(h);
    for (uint32_t k = 0; k < MPU_MAX_WRITERS; k++) {
        struct mpu_writer *w = &h->writers[k];
        if (!w->gen || w->client != client || w->client_gen != client_gen)
            continue;
        if (address && (w->address != address || w->region != region || w->gen != gen))
            continue;
        w->gen = 0;
        removed++;
        if (address)
            break;  /* one mapping's: another of the same range keeps its own */
    }
    unlock(h);
    return removed;
}

/* ---- writing -------------------------------------------------------------------- */

/* Under the lock: a page that may be opened for writing now. */
static int openable(const struct mpu_desc *d)
{
    return MPU_STATE(d->state) == MPU_PRESENT
        && (d->dirty == MPU_CLEAN || d->dirty == MPU_DIRTY);
}

static void open_page(struct mpu_header *h, struct mpu_desc *d, uint32_t owner)
{
    if (d->dirty == MPU_CLEAN)
        mpu_add64(&h->writes, 1);
    set_dirty(h, d, MPU_OWNED(MPU_OPENING, owner));
}

int mpu_page_open_write(struct mpu_header *h, uint32_t region, uint32_t gen, uint64_t page,
                        uint32_t owner, int timeout_ms, uint32_t ahead, uint32_t *descs,
                        uint32_t *count)
{
    struct mpu_desc *all = mpu_descs(h);
    for (;;) {
        lock(h);
        if (!region_live(h, region, gen) || mpu_regions(h)[region].sealed) {
            unlock(h);
            return -ESTALE;
        }
        uint32_t i = lookup(h, region, gen, page);
        if (i == NONE) {
            unlock(h);
            return MPU_FREE;
        }
        struct mpu_desc *d = &all[i - 1];
        uint32_t *word = &d->state, seen = d->state;
        if (MPU_STATE(seen) == MPU_PRESENT) {
            if (openable(d)) {
                open_page(h, d, owner);
                descs[0] = i;
                uint32_t n = 1;
                uint32_t before = page ? lookup(h, region, gen, page - 1) : NONE;
                if (before != NONE && MPU_STATE(all[before - 1].state) == MPU_PRESENT
                    && all[before - 1].dirty != MPU_CLEAN) {
                    for (; n <= ahead; n++) {
                        uint32_t next = lookup(h, region, gen, page + n);
                        if (next == NONE || !openable(&all[next - 1]))
                            break;
                        open_page(h, &all[next - 1], owner);
                        descs[n] = next;
                    }
                }
                unlock(h);
                *count = n;
                return MPU_PRESENT;
            }
            word = &d->dirty;  /* written back, or opened, by another */
            seen = d->dirty;
        }
        unlock(h);
        if (timeout_ms == 0)
            return (int)MPU_STATE(seen);
        if (sleep_on(h, word, seen, timeout_ms) == -ETIMEDOUT)
            return word == &d->dirty ? -EBUSY : (int)MPU_STATE(seen);
    }
}

void mpu_page_opened(struct mpu_header *h, const uint32_t *descs, uint32_t count,
                     uint32_t owner)
{
    struct mpu_desc *all = mpu_descs(h);
    lock(h);
    for (uint32_t k = 0; k < count; k++)
        if (all[descs[k] - 1].dirty == MPU_OWNED(MPU_OPENING, owner))
            set_dirty(h, &all[descs[k] - 1], MPU_DIRTY);
    unlock(h);
    for (uint32_t k = 0; k < count; k++)
        wake_dirty(h, &all[descs[k] - 1]);
}

uint64_t mpu_region_evict_from(struct mpu_header *h, uint32_t slot, uint32_t gen,
                               uint64_t first, uint32_t owner, int memfd, uint64_t page_size)
{
    struct mpu_desc *d = mpu_descs(h);
    uint32_t top = __atomic_load_n(&h->top, __ATOMIC_SEQ_CST);
    uint32_t dropped = 0;
    for (uint32_t i = 1; i <= top; i++) {
        if (d[i - 1].region != slot || d[i - 1].gen != gen || d[i - 1].page < first)
            continue;
        lock(h);
        /* Clean ones only: what a client wrote is the file's to keep (it
         * is written back as any dirty page), and a page being written
         * back is not in the FIFO. */
        int mine = d[i - 1].region == slot && d[i - 1].gen == gen && d[i - 1].page >= first
            && in_fifo(&d[i - 1]) && d[i - 1].dirty == MPU_CLEAN;
        if (mine)
            take_leaving(h, i, owner);
        unlock(h);
        if (mine && punch_out(h, &i, 1, memfd, page_size) == 0)
            dropped++;
    }
    wake_room(h);
    mpu_add64(&h->evictions, dropped);
    return dropped;
}

uint64_t mpu_pbm_recover(struct mpu_header *h, uint32_t owner,
                         const struct mpu_region_slot *regions, uint32_t nregions,
                         uint64_t page_size)
{
    struct mpu_desc *descs = mpu_descs(h);
    uint32_t top = __atomic_load_n(&h->top, __ATOMIC_SEQ_CST);
    uint32_t freed = 0;
    for (uint32_t i = 1; i <= top; i++) {
        struct mpu_desc *d = &descs[i - 1];
        uint32_t dirty = __atomic_load_n(&d->dirty, __ATOMIC_SEQ_CST);
        if ((MPU_STATE(dirty) == MPU_WRITING || MPU_STATE(dirty) == MPU_OPENING)
            && dirty >> 2 == owner) {
            /* Written back or opened half-way: DIRTY, and written (again)
             * later.  A page being written back is out of the FIFO. */
            lock(h);
            if (__atomic_load_n(&d->dirty, __ATOMIC_SEQ_CST) == dirty) {
                if (MPU_STATE(dirty) == MPU_WRITING)
                    end_writing(h, i, 0);
                else
                    set_dirty(h, d, MPU_DIRTY);
            }
            unlock(h);
            wake_dirty(h, d);
            continue;
        }
        uint32_t word = __atomic_load_n(&d->state, __ATOMIC_SEQ_CST);
        uint32_t state = MPU_STATE(word);
        if ((state != MPU_FILLING && state != MPU_LEAVING) || word >> 2 != owner)
            continue;
        const struct mpu_region_slot *r = d->region < nregions ? &regions[d->region] : NULL;
        int known = r && r->live && r->gen == d->gen;
        if (state == MPU_FILLING && known && r->write_fd >= 0 && whole_in(r, d->page, page_size)) {
            /* Copied in before the filler died: in a region mapped for
             * writing, a client may have written it since.  PRESENT and
             * DIRTY, to be written back, rather than dropped.  (Not a page
             * copied in part: its holes would go to the file as zeros.) */
            lock(h);
            if (__atomic_load_n(&d->state, __ATOMIC_SEQ_CST) == word
                && region_live(h, d->region, d->gen)) {
                d->stamp = mpu_add64(&h->clock, 1);
                d->flags = 0;
                set_dirty(h, d, MPU_DIRTY);
                __atomic_store_n(&d->state, MPU_PRESENT, __ATOMIC_SEQ_CST);
                fifo_push(h, i);
                count_present(h, d->region, 1);
            }
            unlock(h);
            wake_page(h, d);
            continue;
        }
        /* A LEAVING page may be half punched: punched again.  (Its memfd may
         * be gone with its region: nothing to punch then.) */
        if (state == MPU_LEAVING && known)
            mpu_punch(r->memfd, d->page * page_size, page_size);
        lock(h);
        int ours = __atomic_load_n(&d->state, __ATOMIC_SEQ_CST) == word;
        if (ours)
            put_free(h, i);
        unlock(h);
        if (ours) {
            wake_page(h, d);
            freed++;
        }
    }
    wake_room(h);
    return freed;
}

/* ---- checking ----------------------------------------------------------------- */

int mpu_pbm_check(struct mpu_header *h)
{
    struct mpu_desc *d = mpu_descs(h);
    int bad = 0;
    lock(h);
    uint32_t in_use = 0, present = 0, free_count = 0, queued = 0, fifo = 0, dirty = 0;
    for (uint32_t i = 1; i <= h->top && !bad; i++) {
        uint32_t state = MPU_STATE(d[i - 1].state);
        if (state == MPU_FREE)
            continue;
        in_use++;
        present += state == MPU_PRESENT;
        fifo += in_fifo(&d[i - 1]);
        dirty += d[i - 1].dirty != MPU_CLEAN;
        if (lookup(h, d[i - 1].region, d[i - 1].gen, d[i - 1].page) != i)
            bad = 1;  /* a page in use that the index does not find */
    }
    for (uint32_t i = h->free_head; i != NONE && !bad; i = d[i - 1].chain)
        if (++free_count > h->top || MPU_STATE(d[i - 1].state) != MPU_FREE)
            bad = 2;  /* the free list loops, or holds a page in use */
    if (!bad && in_use + free_count != h->top)
        bad = 3;  /* a descriptor neither in use nor free */
    uint64_t stamp = 0;
    for (uint32_t i = h->fifo_head; i != NONE && !bad; i = d[i - 1].newer) {
        if (++queued > fifo || !in_fifo(&d[i - 1]) || d[i - 1].stamp < stamp)
            bad = 4;  /* the FIFO loops, holds what is not PRESENT (or is being
                         written back), or is out of order */
        stamp = d[i - 1].stamp;
    }
    if (!bad && queued != fifo)
        bad = 5;  /* a PRESENT page no evictor would find */
    if (!bad && h->present != present)
        bad = 6;
    if (!bad && h->used != in_use)
        bad = 7;  /* a buffer page taken with no page, or a page without one */
    if (!bad && h->dirty != dirty)
        bad = 8;  /* the status counts dirty pages that are not (or misses some) */
    for (uint32_t b = 0; b < h->nbuckets && !bad; b++) {
        uint32_t steps = 0;
        for (uint32_t i = buckets(h)[b]; i != NONE && !bad; i = d[i - 1].chain)
            if (i > h->top || ++steps > in_use || MPU_STATE(d[i - 1].state) == MPU_FREE
                || bucket_of(h, d[i - 1].region, d[i - 1].gen, d[i - 1].page) != b)
                bad = 9;  /* a chain loops, or holds a free page or one of another bucket */
    }
    unlock(h);
    return bad ? -(1000 + bad) : (int)in_use;
}
