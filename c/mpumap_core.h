/*
 * The C core of mpumap: userfaultfd, futexes and atomics on the shared page
 * buffer manager (PBM): the buffer segment and its page directory.
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

/* A PRESENT page of a region mapped for writing is also clean or dirty, in
 * its descriptor's `dirty` word (a futex word too; the owned states carry
 * the pid that holds them, as the state word does):
 *   CLEAN -> OPENING -> DIRTY -> WRITING -> CLEAN.
 * CLEAN: write-protected in every writable mapping.  OPENING: a filler
 * lifts the protection for the client that wrote.  WRITING: a worker
 * protects it again everywhere and writes it to the file; the page is out
 * of the FIFO meanwhile.  Only a CLEAN page leaves the buffer. */
#define MPU_CLEAN 0
#define MPU_DIRTY 1
#define MPU_WRITING 2
#define MPU_OPENING 3

/* How a userfaultfd was obtained (mpu_uffd_open's *how). */
#define MPU_UFFD_SYSCALL 0
#define MPU_UFFD_DEVICE 1
#define MPU_UFFD_USER_ONLY 2

/* The page buffer manager (PBM) keeps a descriptor for each page in use
 * (FILLING, PRESENT or LEAVING), not one for each page of the data: a page
 * with no descriptor is FREE.  Descriptors live in the buffer segment, after
 * the header and the regions' records, found from (region, page) through a
 * hash index; PRESENT ones also sit in a FIFO, oldest fill first, from which
 * evictors take their victims.  See c/pbm.c. */
struct mpu_desc {
    uint32_t state;     /* futex word: the state, and the pid that moved it there */
    uint32_t flags;     /* MPU_READ_AHEAD (internal): filled without a fault */
    uint32_t region;    /* slot */
    uint32_t gen;       /* the region's generation */
    uint64_t page;      /* umap page in the region */
    uint64_t stamp;     /* fill order */
    uint32_t chain;     /* the next in its index bucket, or on the free list
                           (descriptor + 1; 0 ends) */
    uint32_t older;     /* the FIFO of PRESENT pages: towards its head ... */
    uint32_t newer;     /* ... and towards its tail (descriptor + 1) */
    uint32_t dirty;     /* MPU_CLEAN, _DIRTY, or owned _WRITING or _OPENING */
};

/* A region as the PBM knows it, by slot. */
struct mpu_region_info {
    uint32_t gen;       /* whose slot it is: 0, nobody's */
    uint32_t dead;      /* released: its pages go back as they come free */
    uint64_t npages;
    uint64_t present;   /* pages PRESENT now */
    uint64_t covered;   /* pages the file covers, as far as the fillers know:
                           npages, until one finds it shorter */
    uint32_t write_errors;  /* write-backs whose pages were dropped (see
                               mpu_pbm_evict): each mapping reports those
                               since it last looked, once */
    int32_t write_error;    /* ... the errno of the last */
    uint32_t stalled;       /* a read or write of its store outlasted
                               --worker-timeout (a file system that hangs):
                               what the buffer does not hold is refused
                               (SIGBUS) and write-backs fail (EIO) until the
                               supervisor says otherwise, so that no other
                               worker is caught in that store */
    uint32_t sealed;        /* nobody maps it: its last write-back is under
                               way, and no page of it may become dirty after
                               that has looked at it (mpu_region_seal) */
};

/* What a process knows of a region to work on its pages: filled in by
 * Python from the server's messages, read by the C loops. */
struct mpu_region_slot {
    uint32_t live;             /* 0: no region in this slot */
    uint32_t gen;
    int memfd;
    int store_fd;
    int store_mode;            /* MPU_STORE_* (fastpath.h) */
    int cache_fd;              /* a buffered reader beside a direct store, opened
                                  by the filler when the page cache first holds
                                  what it reads (-1: none yet); whoever clears
                                  the slot closes it */
    uint32_t no_cache;         /* the page cache is not asked: cachestat or
                                  the reopen was refused */
    int scan_fd;               /* beside a direct store, a buffered reader for
                                  scans (the kernel's read-ahead keeps the disk
                                  busy; what it read is dropped behind), opened
                                  by the filler at the first scan (-1: none yet,
                                  -2: refused); whoever clears the slot closes it */
    uint32_t sweeps;           /* times left to drop what the kernel read past
                                  a scan that stopped (its reads may land late) */
    uint64_t scan_end;         /* where the scan reader last read up to ... */
    uint64_t scan_ns;          /* ... and when (0: what it read past is dropped) */
    uint64_t npages;
    uint64_t size;             /* of the file when the region was made */
    uint64_t map_length;       /* what clients map: size in whole system pages */
    int write_fd;              /* the file, opened for writing by a client that
                                  mapped it so (-1: nobody did yet) */
    int direct_fd;             /* an evictor's: write_fd reopened O_DIRECT, for
                                  a direct store (-1: none, or refused); whoever
                                  clears the slot closes it */
    uint64_t fill_map;         /* a filler's: its own mapping of the memfd,
                                  registered with its own userfaultfd (0: none);
                                  see mpu_filler_region_added */
    uint64_t fill_copied;      /* ... bytes copied through it since it was made */
};

/* A client's userfaultfd, as a worker holds it. */
struct mpu_client_slot {
    int uffd;                  /* -1: no client in this slot */
    uint32_t gen;
};

/* A mapping that may write a region: a worker that writes a page back must
 * protect it there first.  The server keeps the table in the buffer segment,
 * so every worker sees a writer before its client can write. */
#define MPU_MAX_WRITERS 1024
struct mpu_writer {
    uint32_t region;           /* slot */
    uint32_t gen;              /* the region's generation; 0: a free entry */
    uint32_t client;           /* slot */
    uint32_t client_gen;
    uint64_t address;          /* where the client maps the region */
    uint64_t length;
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

/* What the fillers asked of the stores that C does not read itself (remote
 * objects, stores users write), per store in the order the server lists
 * them (mpumap/stores: `Stores.names`). */
#define MPU_STORE_KINDS 8
struct mpu_store_stats {
    uint64_t requests;      /* reads that succeeded */
    uint64_t bytes;         /* what they gave */
    uint64_t errors;        /* reads that failed for good: SIGBUS */
    uint64_t retries;       /* reads tried again */
    uint64_t latency[MPU_LATENCY_BUCKETS];  /* of each request */
};

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
    uint32_t page_waiters;  /* threads asleep on some page's state word */
    uint32_t pad0;
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
    uint64_t present;       /* pages PRESENT now, in every region */
    uint64_t readaround_fills;  /* pages filled around a fault while there was room */
    uint64_t writes;        /* write faults that made a page dirty */
    uint64_t written;       /* pages written back to their files */
    uint64_t dirty;         /* pages not CLEAN now (DIRTY, OPENING, WRITING) */
    uint64_t lost_writes;   /* dirty pages dropped: their file would not take them */
    uint64_t latency[MPU_LATENCY_BUCKETS];
    struct mpu_store_stats stores[MPU_STORE_KINDS];
    /* CLOCK_MONOTONIC ns of each worker's last sign of life. */
    uint64_t heartbeat[MPU_WORKER_SLOTS];
    /* The store each worker reads or writes now, by its region (see
     * mpu_worker_in_store): told of a worker that hangs, the supervisor
     * knows whose store hung it. */
    uint64_t in_store[MPU_WORKER_SLOTS];
    /* Faults each filler has taken up, and whether it reads the store for
     * one now: set beside what the monitor sent it, they tell the monitor
     * which fillers are free (see route in c/fastpath.c). */
    uint64_t taken[MPU_WORKER_SLOTS];
    uint64_t fault_reading[MPU_WORKER_SLOTS];
    struct mpu_client_stats clients[MPU_CLIENT_SLOTS];
    struct mpu_writer writers[MPU_MAX_WRITERS];  /* under the lock below */
    /* The page directory, which follows in the segment (c/pbm.c): guarded
     * by one robust, process-shared mutex, so that whoever finds its owner
     * dead rebuilds the index, free list and FIFO from the descriptors. */
    uint64_t lock[8];       /* a pthread_mutex_t */
    uint32_t capacity;      /* descriptors: the largest limit the buffer may have */
    uint32_t max_regions;   /* region slots */
    uint32_t top;           /* descriptors handed out so far: those below are in
                               use or on the free list, those above untouched */
    uint32_t free_head;     /* descriptor + 1; 0: take the one at top */
    uint32_t fifo_head;     /* the oldest PRESENT page (descriptor + 1) */
    uint32_t fifo_tail;     /* the newest */
    uint32_t nbuckets;      /* of the index now: a power of two, about the limit */
    uint32_t max_buckets;   /* room for buckets: a power of two, >= capacity */
    uint64_t regions_at;    /* byte offsets in the segment */
    uint64_t descs_at;
    uint64_t buckets_at;
};

int mpu_uffd_open(int flags, int *how);
int mpu_uffd_api(int fd, uint64_t features, uint64_t *features_out);
int mpu_uffd_is_uffd(int fd);
/* The name of the file system the file open on fd is on, if it is one
 * whose files read what the kernel makes for whoever reads them (proc,
 * sysfs, debugfs and the like: fstatfs's magic, which any mount namespace
 * sees alike); NULL for any other, or where fstatfs fails. */
const char *mpu_pseudo_fs_of(int fd);
/* writable: registered for write-protect faults too, every page
 * write-protected until the server lets a client write it. */
int mpu_uffd_register(int fd, uint64_t start, uint64_t len, int writable);
/* protect 0 also wakes the threads waiting on the range.  Every page of
 * the range still registered is done, whatever lies between: -ENOENT only
 * when none is, another -errno when a part failed otherwise (-EAGAIN: the
 * client's mappings kept changing). */
int mpu_uffd_writeprotect(int fd, uint64_t start, uint64_t len, int protect);
int mpu_uffd_wake(int fd, uint64_t start, uint64_t len);

int mpu_futex_wake(uint32_t *word, int count);
uint32_t mpu_load32(uint32_t *word);
uint64_t mpu_load64(uint64_t *word);
uint64_t mpu_add64(uint64_t *word, int64_t delta);

/* A worker's sign of life: its heartbeat word is now. */
void mpu_beat(struct mpu_header *h, uint32_t worker);
/* The latency histogram's bucket for a wait of ns. */
int mpu_latency_bucket(uint64_t ns);

/* ---- the page directory (c/pbm.c) ---- */

/* The segment's size for a buffer of at most `capacity` pages. */
uint64_t mpu_pbm_size(uint32_t capacity, uint32_t max_regions);
int mpu_pbm_init(struct mpu_header *h, uint32_t capacity, uint32_t max_regions);
/* Sizes the index to a new limit: whose buckets are no longer used go back
 * to the system. */
int mpu_pbm_fit_index(struct mpu_header *h, uint32_t limit);
/* The heartbeat a process beats while it waits for the directory (-1:
 * none). */
void mpu_pbm_set_worker(int32_t worker);

int mpu_region_open(struct mpu_header *h, uint32_t slot, uint32_t gen, uint64_t npages);
/* The region is gone: no new page of it is claimed, its PRESENT pages go
 * back to the buffer now (returned: how many), the others as they finish. */
int64_t mpu_region_release(struct mpu_header *h, uint32_t slot, uint32_t gen);
uint64_t mpu_region_present(struct mpu_header *h, uint32_t slot);

/* How a claim takes a buffer page for a new descriptor: a fault waits for
 * room (timeout_ms), calling the evictors; read-ahead takes room up to the
 * limit without waiting, calling them past the high watermark (a scan goes
 * on, and what it read first goes first); a prefetch takes what is free
 * below the high watermark only, so that it never pushes out what is
 * there. */
#define MPU_CLAIM_FAULT 0
#define MPU_CLAIM_AHEAD 1
#define MPU_CLAIM_PREFETCH 2

/* A page's descriptor, or a new one that the caller now fills, with a
 * buffer page for it (`used` counts descriptors in use, nothing else):
 * returns MPU_FREE when the caller owns *desc FILLING, MPU_PRESENT when the
 * page is there (its flags taken into *flags), the state it kept (FILLING,
 * LEAVING) when a wait of timeout_ms for it ran out, -EAGAIN when there was
 * no room (in time), -ESTALE when the region is gone, -ENOSPC when no
 * descriptor is left (never, while the limit is within the capacity). */
int mpu_page_claim(struct mpu_header *h, uint32_t region, uint32_t gen, uint64_t page,
                   uint32_t owner, int how, int timeout_ms, const int *evict_fds,
                   int nevict, uint32_t *desc, uint32_t *flags);
/* Waits up to timeout_ms for the buffer to have room below its limit,
 * calling the evictors: 0 once it has (or did not wait), -EAGAIN.  For a
 * scan whose window found the buffer full: it will need those pages. */
int mpu_pbm_wait_room(struct mpu_header *h, int timeout_ms, const int *evict_fds, int nevict);
/* The end of a fill: PRESENT (at the FIFO's tail), or FREE with its buffer
 * page given back (also when its region was released meanwhile).  flags,
 * beside the page's own: MPU_FILL_DIRTY, filled for a write, writable in
 * that client: DIRTY from the start. */
#define MPU_FILL_DIRTY 0x100
void mpu_page_filled(struct mpu_header *h, uint32_t desc, int present, uint32_t flags);
/* A page's state: MPU_FREE when it has no descriptor. */
int mpu_page_state(struct mpu_header *h, uint32_t region, uint32_t gen, uint64_t page);

/* Up to max of the oldest PRESENT pages punched out of their memfds and
 * FREE, the buffer pages given back: how many (or -errno of a punch or a
 * write-back that failed).  A dirty page is written back first.  Stops at a
 * page of a live region it has no memfd (or no writable file) for, or whose
 * writers' clients it has not heard of yet: -EAGAIN when nothing was
 * evicted for that reason.  Dirty pages whose file will not take them
 * (mpu_lost_write: a full disk, a quota, an I/O error) are dropped, as the
 * kernel drops them, rather than kept for ever (mpu_region_write_errors
 * counts it); the pages of a span that was not written are tried one by
 * one, and only those the file refuses are dropped. */
int64_t mpu_pbm_evict(struct mpu_header *h, uint32_t max, uint32_t owner,
                      const struct mpu_region_slot *regions, uint32_t nregions,
                      const struct mpu_client_slot *clients, uint32_t nclients,
                      uint64_t page_size);
/* Whether a write-back that failed with -err failed for good: its pages
 * would never be written. */
int mpu_lost_write(int err);
/* How many write-backs of region slot (generation gen) had their pages
 * dropped (mpu_pbm_evict), and in *last the errno of the last. */
uint32_t mpu_region_write_errors(struct mpu_header *h, uint32_t slot, uint32_t gen,
                                 int *last);
/* Worker `worker` (a heartbeat slot) reads or writes the store of region
 * slot, generation gen, from now on (gen 0: none). */
void mpu_set_in_store(struct mpu_header *h, int32_t worker, uint32_t slot, uint32_t gen);
/* ... and which it is: 1 and its slot and generation, or 0 for none. */
int mpu_worker_in_store(struct mpu_header *h, uint32_t worker, uint32_t *slot, uint32_t *gen);
/* Marks region slot (generation gen) stalled, or no longer (see
 * mpu_region_info): faults on pages not in the buffer get SIGBUS, its
 * write-backs fail (EIO; an eviction drops those pages: mpu_pbm_evict).
 * 0, or -ENOENT when the slot holds another region now, or none. */
int mpu_region_stall(struct mpu_header *h, uint32_t slot, uint32_t gen, int stalled);
/* Whether region slot (generation gen) is stalled now. */
int mpu_region_stalled(struct mpu_header *h, uint32_t slot, uint32_t gen);
/* Seals region slot (generation gen), or no longer: sealed, no page of it
 * is opened for writing (the fault is only woken: a client's thread that
 * writes there as its mapping goes retries on what replaces it), and a
 * page filled for a write is filled write-protected, CLEAN.  So a region
 * sealed before its last write-back has every write in that write-back.
 * 0, or -ENOENT when the slot holds another region now, or none. */
int mpu_region_seal(struct mpu_header *h, uint32_t slot, uint32_t gen, int sealed);
/* Whether region slot (generation gen) is sealed now. */
int mpu_region_sealed(struct mpu_header *h, uint32_t slot, uint32_t gen);
/* Writes the dirty pages of [first, first + count) of region `slot` to its
 * file and syncs it (what msync(MS_SYNC) does): the pages written, or
 * -errno (-EAGAIN: a writer's client is not known here yet).  Of a sealed
 * region, the pages that fills under way make dirty too. */
int64_t mpu_region_write_back(struct mpu_header *h, uint32_t slot,
                              const struct mpu_region_slot *r,
                              const struct mpu_client_slot *clients, uint32_t nclients,
                              uint64_t first, uint64_t count, uint32_t owner,
                              uint64_t page_size);

/* The writers' table: adding gives 0 or -ENOSPC.  Removing takes one
 * mapping's entry (that client's, of that region at that address: a
 * client may register two mappings over one range, each with its own), or
 * with address 0 every entry of the client; it returns the entries taken. */
int mpu_writer_add(struct mpu_header *h, uint32_t region, uint32_t gen, uint32_t client,
                   uint32_t client_gen, uint64_t address, uint64_t length);
int mpu_writer_remove(struct mpu_header *h, uint32_t client, uint32_t client_gen,
                      uint32_t region, uint32_t gen, uint64_t address);

/* A write to a write-protected page (a WP fault): the page becomes OPENING,
 * held by owner, and MPU_PRESENT is returned; the caller lifts the
 * protection for the writing client, then calls mpu_page_opened.  When the
 * page before it is dirty already (a writer going through the file), so do
 * up to `ahead` pages after it that are there, as far as they follow each
 * other: their first writes then cost no fault.  descs gets the pages
 * opened, *count how many.  Else the page is not there (MPU_FREE: the
 * caller wakes the client, which faults again as on a missing page), or
 * the state it kept through a wait of timeout_ms (-EBUSY: being written
 * back), or -ESTALE (the region went, or is sealed: mpu_region_seal). */
int mpu_page_open_write(struct mpu_header *h, uint32_t region, uint32_t gen, uint64_t page,
                        uint32_t owner, int timeout_ms, uint32_t ahead, uint32_t *descs,
                        uint32_t *count);
void mpu_page_opened(struct mpu_header *h, const uint32_t *descs, uint32_t count,
                     uint32_t owner);
/* The directory's invariants hold: the pages in use (or -1000 - which one
 * failed).  For tests; it takes the lock for a walk over every descriptor. */
int mpu_pbm_check(struct mpu_header *h);
/* A worker died: the pages it held FILLING go back to FREE, those it held
 * LEAVING are punched out (again) and FREE.  Each held a buffer page.  A
 * page it was writing back or opening is DIRTY again: written later. */
uint64_t mpu_pbm_recover(struct mpu_header *h, uint32_t owner,
                         const struct mpu_region_slot *regions, uint32_t nregions,
                         uint64_t page_size);

/* Sizes in system pages, whatever the system page is (4 KiB, 64 KiB). */
uint64_t mpu_round_up(uint64_t n, uint64_t multiple);
uint64_t mpu_system_pages(uint64_t bytes, uint64_t system_page);

int mpu_die_with_parent(int sig, int parent);
int mpu_set_name(const char *name);

#endif
