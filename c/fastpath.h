/*
 * The hot loops of the fault path, in C: profiling put the cost of a fault in
 * the per-wakeup read-and-dispatch loops of the monitor and the fillers, not
 * in the system calls.  Python keeps everything else (messages that set up
 * clients and regions, logging, policy) and calls these once per batch.
 */
#ifndef MPUMAP_FASTPATH_H
#define MPUMAP_FASTPATH_H

#include <stdint.h>

#include "mpumap_core.h"

/* One fault as the monitor hands it to a filler (W_FAULTS in
 * mpumap/protocol.py): client and region are slot numbers. */
struct mpu_fault {
    uint32_t client;
    uint32_t region;
    uint64_t page;
    uint64_t address;   /* where the umap page starts in the client */
    uint64_t read_at;   /* CLOCK_MONOTONIC ns when the monitor read it */
    uint32_t ahead;     /* pages to read after it, if free: the fault starts a scan */
    uint32_t pad;
};

/* A fault-message packet: kind byte, padding, faults. */
#define MPU_FAULTS_KIND 6
#define MPU_FAULTS_HEADER 8
#define MPU_FAULTS_MAX 64   /* faults a monitor reads at once */

/* Polling for work before sleeping: see spin() in fastpath.c. */
struct mpu_spinner {
    uint64_t spin_ns;   /* 0: never poll */
    uint32_t skip;      /* waits left that sleep at once */
    uint32_t backoff;   /* what the next miss sets skip to */
};

/* ---- monitor (server parent) -------------------------------------------- */

/* The monitor's own, for following a scan through a mapping: its last
 * fault's page, the page after all that was asked for (0: not in use), the
 * pages the last read of it covered (0: no scan yet) and when it last saw a
 * fault. */
struct mpu_stream {
    uint64_t last_page;
    uint64_t ahead_end;
    uint32_t window;
    uint32_t seen;
};

/* Scans followed at once in one mapping: threads that read a stripe each. */
#define MPU_STREAMS 8

struct mpu_range {          /* a client mapping, sorted by start */
    uint64_t start;
    uint64_t end;
    uint32_t region;        /* region slot */
    uint32_t clock;         /* faults seen, for the streams' `seen` */
    struct mpu_stream streams[MPU_STREAMS];
};

/* A read-ahead packet from the monitor to a filler: the kind byte, then
 * u32 region slot, u64 first page, u64 pages (little-endian, packed). */
#define MPU_READ_AHEAD_KIND 8
#define MPU_READ_AHEAD_SIZE 21

/* Reads what the client's userfaultfd has, finds each fault's region and
 * page, and sends each filler its faults in one packet.  A fault outside
 * every range is woken (the thread retries, and never hangs on us).
 * scratch holds nfillers * (MPU_FAULTS_HEADER + MPU_FAULTS_MAX * 40) bytes.
 * Returns the number of faults read, or -errno from reading the uffd. */
int mpu_monitor_drain(struct mpu_header *h, int uffd, uint32_t client_slot,
                      struct mpu_range *ranges, int nranges, uint64_t page_size,
                      uint64_t read_ahead, const int *filler_fds, int nfillers,
                      char *scratch);

uint32_t mpu_filler_for(uint32_t region, uint64_t page, uint32_t nfillers);

/* The monitors, in one C thread of the server: it sleeps in epoll on every
 * client's userfaultfd and drains whichever wakes, with no Python (and no
 * GIL) on the way of a fault.  The server's Python side adds and removes
 * clients, their ranges and the fillers' sockets; each call takes the lock
 * the thread holds while it drains, so that once a call returns the thread
 * no longer uses what it replaced (a removed client's userfaultfd may be
 * closed then). */
struct mpu_monitor;
struct mpu_monitor *mpu_monitor_start(struct mpu_header *h, uint64_t page_size,
                                      uint64_t read_ahead, int nfillers, uint64_t spin_ns);
int mpu_monitor_add_client(struct mpu_monitor *m, uint32_t slot, int uffd);
int mpu_monitor_set_ranges(struct mpu_monitor *m, uint32_t slot,
                           const struct mpu_range *ranges, int n);
int mpu_monitor_remove_client(struct mpu_monitor *m, uint32_t slot);
void mpu_monitor_set_filler(struct mpu_monitor *m, int index, int fd);
void mpu_monitor_stop(struct mpu_monitor *m);

/* ---- filler -------------------------------------------------------------- */

#define MPU_STORE_DIRECT 0
#define MPU_STORE_DROP 1
#define MPU_STORE_CACHED 2

struct mpu_region_slot {
    struct mpu_table *table;   /* NULL: no region in this slot */
    int memfd;
    int store_fd;
    int store_mode;
    int cache_fd;              /* buffered, for a direct store; else -1 */
    uint64_t npages;
    uint64_t size;             /* of the file when the region was made */
    uint64_t map_length;       /* what clients map: size in whole system pages */
};

struct mpu_client_slot {
    int uffd;                  /* -1: no client in this slot */
    uint32_t pad;
};

/* What a filler did that its Python side should log. */
#define MPU_EV_STUCK        1  /* a page stayed FILLING or LEAVING for a wait */
#define MPU_EV_NO_ROOM      2  /* no buffer page came free for a wait */
#define MPU_EV_UNFILLED     3  /* a FREE page was in the memfd: replaced */
#define MPU_EV_COPY_FAILED  4  /* UFFDIO_COPY failed oddly (err); client woken */
#define MPU_EV_WAKE_FAILED  5  /* UFFDIO_WAKE failed oddly (err) */
#define MPU_EV_STORE_FAILED 6  /* reading the file failed (err): SIGBUS */
#define MPU_EV_SHRANK       7  /* the file ends at `value` now: SIGBUS past it */
#define MPU_EV_NO_POISON    8  /* UFFDIO_POISON failed (err): zeros instead */
#define MPU_EV_WRITE_FAILED 9  /* writing a page into the memfd failed (err) */

struct mpu_event {
    uint32_t code;
    uint32_t region;
    uint64_t page;
    int64_t err;
    uint64_t value;
};

#define MPU_EVENTS_MAX 32

struct mpu_filler {
    struct mpu_header *h;
    const int *evict_fds;
    int nevict;
    uint32_t pid;
    uint64_t page_size;
    uint64_t read_ahead;
    struct mpu_spinner spinner;  /* polling for work before sleeping */
    char *chunk;               /* page aligned, max_run pages */
    uint64_t max_run;
    struct mpu_region_slot *regions;
    uint32_t nregions;
    struct mpu_client_slot *clients;
    uint32_t nclients;
    struct mpu_event events[MPU_EVENTS_MAX];
    uint32_t nevents;          /* events since the Python side last looked */
};

/* Serve a batch of faults: COPY to the first requester of a page, WAKE to
 * the others, read-ahead, SIGBUS past the end of a shrunk file. */
void mpu_filler_serve(struct mpu_filler *f, const struct mpu_fault *faults, int n);

/* A filler's receive loop: serves fault packets from the server's socket as
 * they come and returns for anything else.  Returns the length of a message
 * for the caller (in buf, its descriptors in fds, *nfds of them), 1 with buf
 * holding a fault packet's kind when events wait to be logged, 0 at the end
 * of the stream, or -errno (-EMSGSIZE for a message cut short). */
int mpu_filler_run(struct mpu_filler *f, int sock, char *buf, int size,
                   int *fds, int *nfds, int maxfds);

/* Fill the FREE pages of [first, first + count) of a region that the buffer
 * has room for, in runs; stops when the buffer is full.  read_ahead: the
 * monitor asked (a scan), not a client: counted and marked as read-ahead. */
void mpu_filler_prefetch(struct mpu_filler *f, uint32_t region, uint64_t first,
                         uint64_t count, int read_ahead);

#endif
