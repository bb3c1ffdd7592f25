/*
 * The C core of mpumap: userfaultfd, futexes and atomics on the shared page
 * buffer manager (PBM): the buffer segment and the regions' page tables.
 * Everything here is small and does one system call or one atomic step;
 * policy lives in Python.
 *
 * This header is what Python sees (c/build_core.py reads it for cffi); what
 * only the C side calls is in mpumap_core_internal.h.  Functions return 0
 * (or a count) on success and a negative errno on failure, so that the
 * Python wrappers can raise OSError with the right code.
 */
#ifndef MPUMAP_CORE_H
#define MPUMAP_CORE_H

#include <stdint.h>

/* Page states.  FREE -> FILLING -> PRESENT -> LEAVING -> FREE. */
#define MPU_FREE 0
#define MPU_FILLING 1
#define MPU_PRESENT 2
#define MPU_LEAVING 3

/* How a userfaultfd was obtained (mpu_uffd_open's *how). */
#define MPU_UFFD_SYSCALL 0
#define MPU_UFFD_DEVICE 1
#define MPU_UFFD_USER_ONLY 2

/* One umap page's entry in a region's page table. */
struct mpu_page {
    uint32_t state;     /* futex word: the state, and the pid that moved it there */
    uint32_t flags;     /* MPU_READ_AHEAD (internal): filled without a fault */
    uint64_t stamp;     /* fill order, for oldest-first eviction */
};

/* The head of a region's page table segment; pages follow it. */
struct mpu_table {
    uint32_t magic;
    uint32_t dead;      /* set once the region is released */
    uint64_t npages;
    uint64_t present;   /* pages PRESENT now */
    uint64_t covered;   /* pages the file covers, as far as the fillers know:
                           npages, until one finds it shorter */
    uint64_t reserved[4];
    struct mpu_page pages[];
};

/* Fault-service latency histogram: 0..7 us exactly, then 8 buckets an
 * octave up to about 16 s. */
#define MPU_LATENCY_BUCKETS 192
/* Per-client counters live in slots; a client holds one while connected. */
#define MPU_CLIENT_SLOTS 4096
/* Fillers, and evictors, a server may run. */
#define MPU_MAX_WORKERS 64
/* Heartbeat words: fillers' first, then evictors' (MPU_MAX_WORKERS on). */
#define MPU_WORKER_SLOTS 128

struct mpu_client_stats {
    uint64_t faults;        /* read by the monitor */
    uint64_t copies;        /* answered by UFFDIO_COPY */
    uint64_t wakes;         /* answered by UFFDIO_WAKE */
    uint64_t bytes;         /* copied into it */
    uint64_t wait_ns;       /* from its fault being read to its answer */
    uint64_t pad[3];
};

/* The buffer segment: accounting, counters, heartbeats. */
struct mpu_header {
    uint32_t magic;
    uint32_t version;
    uint32_t used;          /* futex word: pages FILLING, PRESENT or LEAVING */
    uint32_t limit;         /* the buffer's size in umap pages, right now */
    uint32_t high;          /* evict when used reaches this many pages */
    uint32_t low;           /* ... down to this many */
    uint32_t evict_wanted;  /* a filler asked the evictors to run */
    uint32_t waiters;       /* fillers asleep on `used`, waiting for room */
    uint64_t clock;         /* fill stamps */
    uint64_t peak_used;
    uint64_t faults;        /* fault messages read by the monitor */
    uint64_t fills;         /* pages read from the store and copied in */
    uint64_t copies;        /* UFFDIO_COPY that succeeded */
    uint64_t wakes;         /* faults answered with UFFDIO_WAKE */
    uint64_t evictions;
    uint64_t bytes_read;    /* from the store */
    uint64_t fill_errors;   /* fills abandoned: client gone, store error */
    uint64_t full_waits;    /* fillers that waited for the evictors */
    uint64_t restarts;      /* workers restarted by the supervisor */
    uint64_t readahead_fills;  /* pages filled ahead of a fault */
    uint64_t readahead_hits;   /* faults that found their page read ahead */
    uint64_t prefetch_fills;   /* pages filled on a client's prefetch */
    /* Where a fault's time goes, summed over faults (ns). */
    uint64_t monitor_ns;    /* reading userfaultfds and dispatching to fillers */
    uint64_t queue_ns;      /* from dispatch to a filler taking the fault up */
    uint64_t read_ns;       /* reading the store */
    uint64_t copy_ns;       /* UFFDIO_COPY */
    uint64_t wake_ns;       /* UFFDIO_WAKE */
    uint64_t cache_bytes;   /* of bytes_read: found in the kernel's page cache */
    uint64_t queued_faults; /* faults that waited for room in a filler's socket */
    uint64_t stale_faults;  /* faults for a client or region that had gone */
    uint64_t events_lost;   /* fillers' events past what their log queue holds */
    uint64_t hangs;         /* workers killed for giving no sign of life */
    uint64_t spare[4];
    uint64_t latency[MPU_LATENCY_BUCKETS];
    /* CLOCK_MONOTONIC ns of each worker's last sign of life. */
    uint64_t heartbeat[MPU_WORKER_SLOTS];
    struct mpu_client_stats clients[MPU_CLIENT_SLOTS];
};

int mpu_uffd_open(int flags, int *how);
int mpu_uffd_api(int fd, uint64_t features, uint64_t *features_out);
int mpu_uffd_is_uffd(int fd);
int mpu_uffd_register(int fd, uint64_t start, uint64_t len);
int mpu_uffd_wake(int fd, uint64_t start, uint64_t len);

int mpu_futex_wake(uint32_t *word, int count);
uint32_t mpu_load32(uint32_t *word);
uint64_t mpu_load64(uint64_t *word);
uint64_t mpu_add64(uint64_t *word, int64_t delta);

/* A worker's sign of life: its heartbeat word is now. */
void mpu_beat(struct mpu_header *h, uint32_t worker);

int mpu_page_begin_fill(struct mpu_page *page, uint32_t owner, int timeout_ms);
void mpu_page_end_fill(struct mpu_header *h, struct mpu_table *t,
                       struct mpu_page *page, int present, uint32_t flags);
int mpu_page_evict(struct mpu_table *t, struct mpu_page *page, uint32_t owner,
                   int memfd, uint64_t offset, uint64_t len);

/* The table functions that visit many pages take the table's descriptor
 * (or -1): they skip the holes of a sparse table, which hold FREE pages
 * only, so that a large file costs what it holds, not what it is. */
uint64_t mpu_table_release(struct mpu_header *h, struct mpu_table *t, int fd);
uint64_t mpu_table_recover(struct mpu_header *h, struct mpu_table *t, int fd,
                           uint32_t owner, int memfd, uint64_t page_size);
uint64_t mpu_table_oldest(struct mpu_table *t, int fd, uint64_t stride,
                          uint64_t phase, uint64_t max, uint64_t *idx_out,
                          uint64_t *stamp_out);

int mpu_reserve(struct mpu_header *h, const int *evict_fds, int nfds,
                int timeout_ms);
void mpu_release(struct mpu_header *h, uint32_t count);

/* Sizes in system pages, whatever the system page is (4 KiB, 64 KiB). */
uint64_t mpu_round_up(uint64_t n, uint64_t multiple);
uint64_t mpu_system_pages(uint64_t bytes, uint64_t system_page);

int mpu_die_with_parent(int sig, int parent);
int mpu_set_name(const char *name);

#endif
