/*
 * The hot loops of the fault path, in C: the server's fault-monitor thread,
 * and the fillers' receive-and-serve loop.  Profiling put the cost of a fault
 * in the per-wakeup read-and-dispatch loops, not in the system calls.
 * Python keeps everything else (messages that set up clients and regions,
 * logging, policy) and calls these once per batch.
 *
 * This header is what Python sees (c/build_core.py reads it for cffi).
 */
#ifndef MPUMAP_FASTPATH_H
#define MPUMAP_FASTPATH_H

#include <stdint.h>

#include "mpu_wire.h"
#include "mpumap_core.h"

/* Polling for work before sleeping: see spin() in fastpath.c. */
struct mpu_spinner {
    uint64_t spin_ns;   /* 0: never poll */
    uint32_t skip;      /* waits left that sleep at once */
    uint32_t backoff;   /* what the next miss sets skip to */
};

/* The filler that serves every fault on a page (and every prefetch run). */
uint32_t mpu_filler_for(uint32_t region, uint64_t page, uint32_t nfillers);

/* ---- the monitor (a thread of the server) ---------------------------------- */

/* One client mapping, as the server tells the monitor about it. */
struct mpu_client_range {
    uint64_t start;
    uint64_t end;
    uint32_t region;        /* slot */
    uint32_t region_gen;
    uint32_t advice;        /* MPU_ADVICE_NORMAL, _RANDOM or _SEQUENTIAL */
    uint32_t window;        /* the largest read-ahead window, in pages (0: the
                               server's): an object store's reads cost a round
                               trip each, so its windows are larger */
    uint32_t unit;          /* the region's page, in server pages (0, 1: one):
                               a fault reads the whole of it */
    uint32_t writable;      /* mapped for writing: registered for write faults */
};

/* The monitor sleeps in epoll on every client's userfaultfd and drains
 * whichever wakes: each fault becomes (region, page) and goes to the filler
 * that owns the page, a packet per filler, with no Python (and no GIL) on
 * the way.  It never blocks on a filler: what a filler's socket has no room
 * for waits in that filler's queue, in order, until the socket drains.
 *
 * The server's Python side adds and removes clients, their ranges and the
 * fillers' sockets; each call takes the lock the thread holds while it
 * drains (never while it sleeps), so that once a call returns the thread no
 * longer uses what it replaced: a removed client's userfaultfd, a filler
 * socket set to -1, may be closed then. */
struct mpu_monitor;
struct mpu_monitor *mpu_monitor_start(struct mpu_header *h, uint64_t page_size,
                                      uint64_t read_ahead, int nfillers, uint64_t spin_ns);
int mpu_monitor_add_client(struct mpu_monitor *m, uint32_t slot, uint32_t gen, int uffd);
int mpu_monitor_set_ranges(struct mpu_monitor *m, uint32_t slot,
                           const struct mpu_client_range *ranges, int n);
int mpu_monitor_remove_client(struct mpu_monitor *m, uint32_t slot);
/* Sets filler `index`'s socket (-1: none) and heartbeat slot; what waited
 * for the old one is dropped: the server wakes every waiting client once
 * the new one runs. */
void mpu_monitor_set_filler(struct mpu_monitor *m, int index, int fd, int worker);
/* Stops the thread and frees the monitor: 0, or -errno when the thread
 * could not be told to stop (the monitor is then left as it is). */
int mpu_monitor_stop(struct mpu_monitor *m);

/* ---- fillers (worker processes) ----------------------------------------------- */

#define MPU_STORE_DIRECT 0
#define MPU_STORE_DROP 1
#define MPU_STORE_CACHED 2
#define MPU_STORE_CALL 3       /* no descriptor: read_store reads it */

/* How a filler reads a store that C cannot read itself (a remote object, a
 * store a user wrote): len bytes of region slot `region` from offset into
 * buf.  Returns the bytes read (fewer only where the object ends) or
 * -errno, after whatever retries the store's settings allow; the caller
 * then answers a fault it could not fill with SIGBUS.  It is the filler's
 * Python side, which beats the heartbeat while it waits. */
typedef int64_t (*mpu_read_store)(uint32_t region, uint64_t offset, char *buf, uint64_t len);

/* What a filler did that its Python side should log. */
#define MPU_EV_STUCK 1         /* a page stayed FILLING or LEAVING for a wait */
#define MPU_EV_NO_ROOM 2       /* no buffer page came free for a wait */
#define MPU_EV_UNFILLED 3      /* a FREE page was in the memfd: replaced */
#define MPU_EV_COPY_FAILED 4   /* UFFDIO_COPY failed oddly (err); client woken */
#define MPU_EV_WAKE_FAILED 5   /* UFFDIO_WAKE failed oddly (err) */
#define MPU_EV_STORE_FAILED 6  /* reading the file failed (err): SIGBUS */
#define MPU_EV_SHRANK 7        /* the file ends at `value` now: SIGBUS past it */
#define MPU_EV_NO_POISON 8     /* UFFDIO_POISON failed (err): zeros instead */
#define MPU_EV_WRITE_FAILED 9  /* writing a page into the memfd failed (err) */
#define MPU_EV_NO_FILL_MAP 10  /* the fill mapping could not be made again (err) */

struct mpu_event {
    uint32_t code;
    uint32_t region;
    uint64_t page;
    int64_t err;
    uint64_t value;
};

#define MPU_EVENTS_MAX 32

/* What the kernel read ahead past the last scan of a region that went
 * (its reader's descriptor, kept for this): dropped again later, as for a
 * region that stays, since read-ahead still under way lands after. */
struct mpu_leftover {
    int fd;                    /* -1: a free entry */
    uint32_t sweeps;           /* drops left */
    uint64_t scan_end;
    uint64_t at_ns;            /* the last drop */
};
#define MPU_LEFTOVERS 8

struct mpu_filler {
    struct mpu_header *h;
    int sock;                  /* from the server: faults and everything else */
    const int *evict_fds;
    int nevict;
    uint32_t pid;
    uint32_t worker;           /* heartbeat slot */
    uint32_t index;            /* among the fillers */
    uint32_t nfillers;
    uint32_t serving;          /* a fault, not a window or prefetch (route) */
    uint32_t pad;
    uint64_t system_page;
    uint64_t page_size;
    uint64_t read_ahead;
    struct mpu_spinner spinner;
    mpu_read_store read_store; /* for MPU_STORE_CALL regions (NULL: none) */
    char *chunk;               /* page aligned, max_run pages */
    uint32_t *descs;           /* max_run: the descriptors of a run being filled */
    uint64_t max_run;
    uint64_t swept_ns;         /* when scan leftovers were last looked for */
    int fill_uffd;             /* its own userfaultfd, for filling through its
                                  own mappings of the memfds (-1: none, pwrite) */
    int splice_pipe[2];        /* for scans: the page cache to the memfd */
    uint32_t splicing;         /* 0: not tried yet, 1: the pipe is there, 2: no */
    struct mpu_region_slot *regions;
    uint32_t nregions;
    struct mpu_client_slot *clients;
    uint32_t nclients;
    struct mpu_leftover leftovers[MPU_LEFTOVERS];
    struct mpu_event events[MPU_EVENTS_MAX];
    uint32_t nevents;          /* events since the Python side last looked */
    uint32_t lost;             /* ... and those that did not fit */
};

/* A filler's receive loop: serves fault packets from the server's socket as
 * they come, and returns for anything else.  Returns the length of a message
 * for the caller (in buf, its descriptors in fds, *nfds of them), 0 when
 * events wait to be logged, -EPIPE at the end of the stream, or -errno
 * (-EMSGSIZE for a message cut short).  A receive timeout on the socket
 * (SO_RCVTIMEO) makes it beat its heartbeat while idle. */
int mpu_filler_run(struct mpu_filler *f, int sock, char *buf, int size,
                   int *fds, int *nfds, int maxfds);

/* A region comes to a filler: with a userfaultfd of its own, the filler
 * maps the memfd (read-only) and registers that mapping, so that it fills
 * pages no client waits for with UFFDIO_COPY there rather than by writing
 * the memfd.  Every write to a memfd and every punch takes its inode lock,
 * so writes serialise all the region's fillers and evictors; UFFDIO_COPY
 * takes no such lock.  0, or -errno (the filler then writes the memfd).
 * mpu_filler_region_gone unmaps it. */
int mpu_filler_region_added(struct mpu_filler *f, struct mpu_region_slot *r);

/* What the kernel read ahead past the last scan of a region is dropped
 * from the page cache: before its scan reader is closed, and by the filler
 * once a scan has stopped. */
void mpu_scan_done(struct mpu_region_slot *r);
/* A region goes from a filler: what its last scan left is dropped now and
 * (with a descriptor of the scan reader's kept for that) a few times
 * more, later. */
void mpu_filler_region_gone(struct mpu_filler *f, struct mpu_region_slot *r);

/* A prefetch or read-ahead message: fill this filler's share of it.
 * Faults that come meanwhile are served between runs; when another message
 * waits, it stops and returns 1, with `fill` moved on to what is left (call
 * it again once that message is taken); 0 once done. */
int mpu_filler_fill(struct mpu_filler *f, struct mpu_w_fill *fill);

#endif
