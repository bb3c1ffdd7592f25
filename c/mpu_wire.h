/*
 * mpumap's wire format, written down once: the socket protocol between
 * clients and the server (docs/protocol.md), and the messages between the
 * server and its workers.  The C client library, the C core and cffi (for
 * mpumap/protocol.py, which builds its struct formats from these structs)
 * all read this file.
 *
 * The client protocol is little-endian on the wire; the structs below give
 * its field order and offsets (no padding anywhere).  Messages to workers
 * never leave the machine: they are these structs as they are in memory.
 */
#ifndef MPU_WIRE_H
#define MPU_WIRE_H

#include <stdint.h>

/* ---- clients and the server ------------------------------------------------ */

#define MPU_PROTOCOL_VERSION 2
#define MPU_HEADER_SIZE 12          /* "MPUM", u16 version, u16 type, u32 length */
#define MPU_MAX_PAYLOAD 163840      /* 160 KiB: one packet in the default buffers */
#define MPU_MAX_FDS 4               /* descriptors one packet may carry */
#define MPU_MAX_SESSION 64          /* bytes of a session tag */

/* What both clients (mpumap/client.py, c/umap_client.c) do unless told. */
#define MPU_DEFAULT_SOCKET "/tmp/mpumap.sock"  /* else $MPUMAP_SOCKET */
#define MPU_REQUEST_SECONDS 10      /* a request's wait for its answer; $MPUMAP_TIMEOUT */
#define MPU_FLUSH_SECONDS 600       /* ... one that writes back: gigabytes may be dirty */

#define MPU_MSG_HELLO 1             /* u32 flags [+ session tag]; fds: userfaultfd */
#define MPU_MSG_WELCOME 2           /* struct mpu_welcome; fds: a pidfd of the server */
#define MPU_MSG_MAP 3               /* u32 flags; fds: the file */
/* MAP's and MAP_URL's flags: bits 0-7, log2 of the region's page size
 * asked for (0: what the store proposes, else the server's page size);
 * MPU_MAP_WRITE, a mapping that writes (MAP: the file opened read-write;
 * the client maps the memfd PROT_READ | PROT_WRITE). */
#define MPU_MAP_PAGE_SHIFT 0xff
#define MPU_MAP_WRITE 0x100
#define MPU_MSG_MAPPED 4            /* struct mpu_mapped; fds: the region's memfd */
#define MPU_MSG_REGISTER 5          /* struct mpu_span */
#define MPU_MSG_REGISTERED 6        /* u64 mapping id */
#define MPU_MSG_UNMAP 7             /* u64 mapping id */
#define MPU_MSG_UNMAPPED 8          /* u64 mapping id */
#define MPU_MSG_STATS 9             /* empty, or a session tag */
#define MPU_MSG_STATS_REPLY 10      /* JSON */
#define MPU_MSG_PREFETCH 11         /* struct mpu_span: mapping id, offset, length */
#define MPU_MSG_PREFETCHING 12      /* u64 umap pages asked for */
#define MPU_MSG_ADVISE 13           /* struct mpu_advice */
#define MPU_MSG_ADVISED 14          /* u64 umap pages asked for (WILLNEED), else 0 */
#define MPU_MSG_ERROR 15            /* i32 errno, then a UTF-8 message */
#define MPU_MSG_MAP_URL 16          /* u32 flags, then the object's URL (UTF-8); answered
                                       by MAPPED, as MAP */
#define MPU_MAX_URL 2048            /* bytes of a URL */
#define MPU_MSG_FLUSH 17            /* struct mpu_span: mapping id, offset, length (0: to
                                       the end); answered once those bytes are in the
                                       file and synced */
#define MPU_MSG_FLUSHED 18          /* u64 pages written */

/* WELCOME: the server's settings, as a client needs them. */
struct mpu_welcome {
    uint64_t system_page_size;
    uint64_t page_size;             /* umap page */
    uint64_t buffer_pages;          /* the buffer's limit when the client came */
    uint32_t fillers;
    uint32_t evictors;
    uint32_t high_water;            /* percent */
    uint32_t low_water;             /* percent */
    uint32_t adaptive;              /* 0 or 1 */
    uint32_t max_fault_events;      /* faults the server reads at once */
};

/* MAPPED: where the region's memfd goes in the client. */
struct mpu_mapped {
    uint64_t mapping_id;
    uint64_t region_id;
    uint64_t size;                  /* of the file */
    uint64_t length;                /* to map: the size in whole system pages */
};

/* REGISTER (mapping id, address, length) and PREFETCH (mapping id, offset,
 * length): a span of a mapping. */
struct mpu_span {
    uint64_t mapping_id;
    uint64_t start;
    uint64_t length;
};

/* ADVISE: what a program knows of its access to a mapping, in madvise's
 * words and numbers.  NORMAL, RANDOM and SEQUENTIAL hold for the whole
 * mapping (offset 0, length 0 or the mapping's); WILLNEED is a prefetch of
 * the span. */
#define MPU_ADVICE_NORMAL 0         /* read ahead on scans, around while there is room */
#define MPU_ADVICE_RANDOM 1         /* each fault reads its own page */
#define MPU_ADVICE_SEQUENTIAL 2     /* every fault reads ahead, full windows at once */
#define MPU_ADVICE_WILLNEED 3       /* fill the span now */

struct mpu_advice {
    uint64_t mapping_id;
    uint64_t start;
    uint64_t length;
    uint32_t advice;                /* MPU_ADVICE_* */
    uint32_t pad;
};

/* ---- the server and its workers --------------------------------------------- */

/* Every message to a worker starts with a u32 kind. */
#define MPU_W_ADD_CLIENT 2          /* struct mpu_w_client; fds: userfaultfd */
#define MPU_W_DROP_CLIENT 3         /* struct mpu_w_client */
#define MPU_W_ADD_REGION 4          /* struct mpu_w_region; fds: memfd, store (a
                                       file), or memfd and then the object's
                                       JSON {url, identity} (MPU_STORE_CALL) */
#define MPU_W_DROP_REGION 5         /* struct mpu_w_region */
#define MPU_W_FAULTS 6              /* struct mpu_w_faults, then struct mpu_fault[] */
#define MPU_W_PREFETCH 7            /* struct mpu_w_fill: a client asked */
#define MPU_W_READ_AHEAD 8          /* struct mpu_w_fill: the monitor saw a scan */
#define MPU_W_READ_AROUND 9         /* struct mpu_w_fill: a fault, and the buffer has room */
#define MPU_W_READ_BEHIND 10        /* struct mpu_w_fill: the monitor saw a backward scan */
#define MPU_W_WRITE_FD 11           /* struct mpu_w_region (to evictors); fds: the region's
                                       file, opened for writing */
#define MPU_W_FLUSH 12              /* struct mpu_w_flush (to one evictor): write back */
#define MPU_W_FLUSHED 13            /* struct mpu_w_flush, from the evictor: done (the
                                       only message a worker sends) */

/* Clients and regions are named by their slots (small numbers, reused) and
 * generations (unique ids): a message that outlived its slot's owner is
 * known by its generation and ignored. */
struct mpu_w_client {
    uint32_t kind;
    uint32_t slot;
    uint32_t gen;
    uint32_t pad;
};

struct mpu_w_region {
    uint32_t kind;
    uint32_t slot;
    uint32_t gen;
    uint32_t store_mode;            /* MPU_STORE_* */
    uint64_t size;                  /* of the file when it was mapped */
    uint64_t npages;                /* umap pages */
};

/* Fill [first, first + count) of a region, what the buffer has room for.  A
 * prefetch goes to every filler with the same span: each fills the runs of
 * `run` pages that fall to it (mpu_filler_for of the run's number), so that
 * a prefetch of any size costs one message per filler. */
struct mpu_w_fill {
    uint32_t kind;
    uint32_t region;
    uint32_t gen;
    uint32_t run;                   /* pages; 0: all of it is this filler's */
    uint64_t first;
    uint64_t count;
};

/* Write back the dirty pages of [first, first + count) of a region, sync its
 * file, and say so with the same struct (kind FLUSHED, result set). */
struct mpu_w_flush {
    uint32_t kind;
    uint32_t region;
    uint32_t gen;
    uint32_t pad;
    uint64_t first;
    uint64_t count;
    uint64_t token;                 /* the server's, given back */
    int64_t result;                 /* pages written, or -errno */
};

/* A fault's flags. */
#define MPU_FAULT_WRITE 1           /* a write to a missing page */
#define MPU_FAULT_WP 2              /* a write to a write-protected page */
#define MPU_FAULT_WRITABLE 4        /* in a mapping that may write: filled protected */

/* One fault as the monitor hands it to a filler. */
struct mpu_fault {
    uint32_t client;                /* slot */
    uint32_t client_gen;
    uint32_t region;                /* slot */
    uint32_t region_gen;
    uint64_t page;                  /* umap page in the region */
    uint64_t address;               /* where that page starts in the client */
    uint64_t read_at;               /* CLOCK_MONOTONIC ns when the monitor read it */
    uint32_t ahead;                 /* pages to read after it, if free: a scan */
    uint32_t behind;                /* ... and before it: the region page it is in */
    uint32_t flags;                 /* MPU_FAULT_* */
    uint32_t pad;
};

struct mpu_w_faults {
    uint32_t kind;
    uint32_t count;                 /* struct mpu_fault that follow */
};

#define MPU_FAULTS_MAX 64           /* faults the monitor reads at once */

#endif
