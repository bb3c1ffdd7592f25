/* See fastpath.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fastpath.h"
#include "mpumap_core_internal.h"

#define WAIT_MS 1000

/* ---- waiting ------------------------------------------------------------- */

/* Waking a sleeping CPU costs tens of microseconds on a VM whose idle CPUs
 * halt at once: more than serving a page from memory.  So the monitor and the
 * fillers poll for their next work for up to spin_ns before they sleep, and
 * yield the CPU between polls, so that a client that has work takes it.  A
 * poll that runs out was wasted: after each miss the waiter sleeps straight
 * away for twice as many waits as before (up to 1024), so work that comes
 * slower than the spin (a disk read away) costs one poll in a thousand.
 *
 * spin() calls poll(arg) until it says there is something (returns nonzero)
 * or the time is up: 1 if there was something, 0 if the caller should sleep. */
static int spin(struct mpu_spinner *s, int (*poll)(void *), void *arg)
{
    if (!s->spin_ns)
        return 0;
    if (s->skip) {
        s->skip--;
        return 0;
    }
    uint64_t until = mpu_now_ns() + s->spin_ns;
    do {
        if (poll(arg)) {
            s->backoff = 0;
            return 1;
        }
        sched_yield();
    } while (mpu_now_ns() < until);
    s->backoff = s->backoff ? (s->backoff < 512 ? 2 * s->backoff : 1024) : 1;
    s->skip = s->backoff;
    return 0;
}

uint32_t mpu_filler_for(uint32_t region, uint64_t page, uint32_t nfillers)
{
    /* Fibonacci hashing of the region spreads neighbouring pages of one
     * region, and pages of different regions, over the fillers. */
    return (uint32_t)((((uint64_t)region * 0x9E3779B1u) ^ page) % nfillers);
}

/* ---- monitor: following scans --------------------------------------------- */

/* The monitor's own, for following a scan through a mapping: its last
 * fault's page, the edge of all that was asked for (0: not in use; going
 * forward the page after it, backward its first page), the pages the last
 * read of it covered (0: no scan yet), when it last saw a fault, and which
 * way it goes (0: not known yet, 1 or -1).  A program that copies a whole
 * mapping may well go backward: glibc's memcpy does, here, for some
 * alignments of source and destination. */
struct stream {
    uint64_t last_page;
    uint64_t ahead_end;
    uint32_t window;
    uint32_t seen;
    int32_t dir;
    uint32_t steps;         /* backward faults seen: windows start at the second */
};

/* Scans followed at once in one mapping: threads that read a stripe each. */
#define STREAMS 8

struct range {              /* a client mapping, sorted by start */
    struct mpu_client_range r;
    uint32_t clock;         /* faults seen, for the streams' `seen` */
    uint64_t around;        /* the last window read around a fault, + 1 (0: none) */
    uint64_t around_end;    /* ... and the page just past it */
    uint32_t around_window; /* the next window to read around (0: the first) */
    struct stream streams[STREAMS];
};

static struct range *locate(struct range *ranges, int n, uint64_t address)
{
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (ranges[mid].r.start <= address)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || address >= ranges[lo - 1].r.end)
        return NULL;
    return &ranges[lo - 1];
}

/* The stream a fault at `page` continues: one whose last fault came before
 * it and whose reads reach it.  Else the least recently used stream, started
 * afresh at the fault; *fresh says which. */
static struct stream *stream_of(struct range *r, uint64_t page, int *fresh)
{
    struct stream *victim = NULL;
    r->clock++;
    for (int i = 0; i < STREAMS; i++) {
        struct stream *s = &r->streams[i];
        int forward = s->dir >= 0 && page >= s->last_page && page <= s->ahead_end;
        int backward = s->dir < 0 ? page <= s->last_page && page + 1 >= s->ahead_end
                                  : s->dir == 0 && page + 1 == s->last_page;
        if (s->ahead_end && (forward || backward)) {
            if (!s->dir && backward) {
                s->dir = -1;
                s->ahead_end = s->last_page;
            }
            s->seen = r->clock;
            *fresh = 0;
            return s;
        }
        /* Ages, not stamps: the clock may wrap. */
        if (!victim || (victim->ahead_end && (!s->ahead_end
                        || r->clock - s->seen > r->clock - victim->seen)))
            victim = s;
    }
    *victim = (struct stream){ .last_page = page, .ahead_end = page + 1, .seen = r->clock };
    /* (dir 0: the next fault says which way it goes) */
    *fresh = 1;
    return victim;
}

/* Read-ahead follows scans, as the kernel's does.  A fault between a
 * stream's last fault and the end of what was asked for it since continues
 * that scan; any other fault reads its page alone, and starts a stream.
 * The second fault of a scan reads a window of 4 pages itself; each fault of
 * the scan asks, in the background, for the windows after what was asked for
 * until `depth` windows lie ahead of it, each twice as large as the last up
 * to 1 + most pages.  The client faults again only where a window is still
 * being read; the disk meanwhile has several reads to work on (it serves
 * more with more in flight, as the kernel's 8 MiB of read-ahead shows).
 * Returns the pages the fault's filler reads after its page; *background
 * the first page of the background windows (0: none), *window their size
 * and *windows how many. */
static uint64_t read_ahead_of(struct range *r, uint64_t page, uint64_t most, uint64_t depth,
                              uint64_t inline_most, uint64_t *background, uint64_t *window,
                              uint64_t *windows, struct stream **started, uint32_t *lane)
{
    int fresh;
    struct stream *s = stream_of(r, page, &fresh);
    *started = fresh ? s : NULL;
    *lane = (uint32_t)(s - r->streams);
    uint64_t ahead = 0;
    *background = 0;
    if (fresh || page == s->last_page)
        return 0;  /* a new stream, or another thread on the same page */
    s->last_page = page;
    uint64_t w = s->window ? 2 * (uint64_t)s->window : 4;
    if (w > most + 1)
        w = most + 1;
    s->window = (uint32_t)w;
    if (s->dir < 0) {
        /* Backward: the fault reads its page, the windows below it are
         * asked for in the background, the nearest first; *background is
         * the edge they go down from.  Only from the second step down: a
         * random fault lands just below another's page often enough. */
        if (page < s->ahead_end)
            s->ahead_end = page;
        if (++s->steps < 2) {
            s->window = 0;
            return 0;
        }
        uint64_t floor = page > depth * w ? page - depth * w : 0;
        if (s->ahead_end > floor) {
            *background = s->ahead_end;
            *window = w;
            *windows = (s->ahead_end - floor + w - 1) / w;
            s->ahead_end = s->ahead_end > *windows * w ? s->ahead_end - *windows * w : 0;
        }
        return 0;
    }
    s->dir = 1;
    if (page >= s->ahead_end) {  /* past what was asked for: read on from here */
        /* The fault's filler reads no more than a file's window itself
         * (the client waits for it); the rest of a larger window goes
         * in the background. */
        ahead = w - 1 < inline_most ? w - 1 : inline_most;
        s->ahead_end = page + 1 + ahead;
    }
    if (s->ahead_end < page + depth * w) {
        *background = s->ahead_end;
        *window = w;
        *windows = (page + depth * w - s->ahead_end + w - 1) / w;
        s->ahead_end += *windows * w;
    }
    return ahead;
}

/* ---- monitor: the fillers' queues ------------------------------------------- */

/* What a filler's socket had no room for: whole packets, each after its u32
 * length, sent in order once the socket drains.  A filler that is stuck long
 * enough is killed and replaced (its heartbeat stops), and its queue goes
 * with it. */
struct outbox {
    int fd;                 /* the filler's socket; -1: none */
    int armed;              /* in the epoll set for EPOLLOUT */
    char *buf;
    size_t head, len, cap;  /* sent up to head, queued up to len */
    int worker;             /* its heartbeat slot; -1: none */
    uint64_t sent;          /* faults posted to it (its `taken` once taken up) */
};

#define OUTBOX_MAX (16u << 20)

struct monitored {
    int uffd;               /* -1: free */
    uint32_t gen;
    int nranges;
    struct range *ranges;   /* malloc'ed, sorted */
};

struct mpu_monitor {
    struct mpu_header *h;
    uint64_t page_size;
    uint64_t system_page;
    uint64_t read_ahead;
    int nfillers;
    struct outbox *out;     /* one per filler */
    char *scratch;          /* a fault packet per filler */
    struct mpu_spinner spinner;
    uint64_t evictions_seen;   /* the evictions counter at the last look ... */
    uint64_t looked_ns;        /* ... and when that was */
    int churning;              /* the evictors ran since the look before */
    int epfd;
    int stopfd;
    pthread_t thread;
    pthread_mutex_t lock;
    struct monitored clients[MPU_CLIENT_SLOTS];
};

#define STOP_KEY UINT64_MAX
#define FILLER_KEY (1ull << 32)  /* + filler index; client slots are below */
#define PACKET_SIZE (sizeof(struct mpu_w_faults) + MPU_FAULTS_MAX * sizeof(struct mpu_fault))

static void arm(struct mpu_monitor *m, int index, int on)
{
    struct outbox *o = &m->out[index];
    if (o->armed == on || o->fd < 0)
        return;
    struct epoll_event ev = { .events = EPOLLOUT, .data.u64 = FILLER_KEY + (uint64_t)index };
    if (epoll_ctl(m->epfd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, o->fd, &ev) == 0 || !on)
        o->armed = on;
}

static void outbox_clear(struct mpu_monitor *m, int index)
{
    arm(m, index, 0);
    m->out[index].head = m->out[index].len = 0;
}

/* Sends what waits, in order; stops at the first packet the socket has no
 * room for.  A socket that fails otherwise has lost its filler: the queue
 * goes (see mpu_monitor_set_filler). */
static void outbox_flush(struct mpu_monitor *m, int index)
{
    struct outbox *o = &m->out[index];
    while (o->head < o->len) {
        uint32_t n;
        memcpy(&n, o->buf + o->head, sizeof n);
        ssize_t sent = send(o->fd, o->buf + o->head + sizeof n, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            arm(m, index, 1);
            return;
        }
        if (sent < 0) {
            outbox_clear(m, index);
            return;
        }
        o->head += sizeof n + n;
    }
    outbox_clear(m, index);
}

/* Sends a packet to a filler, or queues it behind those waiting already.
 * 0, or -ENOBUFS when the queue is full (the packet is not sent). */
static int post(struct mpu_monitor *m, int index, const void *packet, uint32_t n)
{
    struct outbox *o = &m->out[index];
    if (o->fd < 0)
        return 0;  /* no filler: the server wakes every waiting client once one runs */
    if (o->head == o->len) {
        ssize_t sent;
        do
            sent = send(o->fd, packet, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        while (sent < 0 && errno == EINTR);
        if (sent >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
            return 0;  /* sent, or the filler is gone */
    }
    if (o->head > 0 && o->head == o->len)
        o->head = o->len = 0;
    size_t need = o->len + sizeof n + n;
    if (need > OUTBOX_MAX)
        return -ENOBUFS;
    if (need > o->cap) {
        if (o->head > 0) {  /* make room at the front first */
            memmove(o->buf, o->buf + o->head, o->len - o->head);
            o->len -= o->head;
            o->head = 0;
            need = o->len + sizeof n + n;
        }
        if (need > o->cap) {
            size_t cap = o->cap ? o->cap : 1 << 16;
            while (cap < need)
                cap *= 2;
            char *buf = realloc(o->buf, cap);
            if (!buf)
                return -ENOBUFS;
            o->buf = buf;
            o->cap = cap;
        }
    }
    memcpy(o->buf + o->len, &n, sizeof n);
    memcpy(o->buf + o->len + sizeof n, packet, n);
    o->len += sizeof n + n;
    arm(m, index, 1);
    return 0;
}

/* ---- monitor: draining a client ---------------------------------------------- */

/* A window larger than a filler's read (`run`: the mapping's largest
 * read-ahead window) goes to every filler, each reading the runs that fall
 * to it, so that the disk has a read from each at once. */
static void post_read_ahead(struct mpu_monitor *m, uint32_t kind, uint32_t region,
                            uint32_t gen, uint64_t first, uint64_t window, uint32_t lane,
                            uint64_t run)
{
    struct mpu_w_fill fill = { .kind = kind, .region = region, .gen = gen,
                               .run = window > run ? (uint32_t)run : 0,
                               .first = first, .count = window };
    if (fill.run) {
        for (int to = 0; to < m->nfillers; to++)
            post(m, to, &fill, sizeof fill);
        return;
    }
    /* A scan's windows by its lane: one filler reads them all, in order,
     * so that its reader sees one stream (scan_reader).  Others by window:
     * their first pages may be a multiple of the fillers apart; so a
     * store's scan windows too (larger than a file's, they need no scan
     * reader), so that several are read at once. */
    int scan = (kind == MPU_W_READ_AHEAD || kind == MPU_W_READ_BEHIND)
               && run == m->read_ahead + 1;
    int to = (int)mpu_filler_for(region, scan ? lane : first / window,
                                 (uint32_t)m->nfillers);
    post(m, to, &fill, sizeof fill);  /* a window it cannot queue is not read ahead */
}

struct window {             /* read-ahead or read-around windows to ask for */
    uint64_t first, count, windows;
    uint32_t region, gen;
    uint32_t kind;          /* MPU_W_READ_AHEAD, _READ_BEHIND (windows going down
                               from `first`), MPU_W_READ_AROUND */
    uint32_t lane;          /* read-ahead: the scan's (client slot, stream) */
    uint64_t run;           /* the mapping's largest window */
};

/* How many read-ahead windows a scan keeps ahead of it: up to
 * READ_AHEAD_DEPTH, while they take no more than a quarter of the buffer
 * (a small buffer must keep room for what is read). */
#define READ_AHEAD_DEPTH 8
static uint64_t read_ahead_depth(struct mpu_monitor *m, uint64_t window)
{
    uint64_t fit = __atomic_load_n(&m->h->limit, __ATOMIC_RELAXED) / 4 / window;
    return fit < 2 ? 2 : fit > READ_AHEAD_DEPTH ? READ_AHEAD_DEPTH : fit;
}

/* Read-around, as the kernel's mmap does it but only while the buffer has
 * room: a fault that starts a stream (no scan yet) also asks for the
 * aligned window around it, unless the evictors ran within the last
 * CHURN_NS (room they just made is not room: read around there, a random
 * fault would read a window to use one page).  A region fits when the
 * pages present in the others and all of its own stay below the high
 * watermark (present pages, not pages in use: a page being filled is in
 * use and missing both, and a buffer that held the file with a few pages
 * to spare looked full while its fills were in flight).  What is read
 * around a region that fits stays until it is used (the fillers claim it as
 * they claim a prefetch, and never push a page out for it); its window
 * starts at 1 + most pages and doubles at each read-around, up to
 * AROUND_MAX_BYTES.  A data set that fits is then read in large reads
 * whatever the order.  A region that does not fit reads windows of
 * 1 + most pages, only while two of them fit below the low watermark:
 * evictions keep a full buffer between the two watermarks, and when faults
 * come slowly (from a cold disk) the climb from one to the other outlasts
 * CHURN_NS; read around there, each climb would be windows of pages used
 * once in a while.  In a full buffer a random fault reads its page alone.
 * Returns the window's first page + 1 (0: none), its size in *window. */
#define CHURN_NS 500000000ull
#define AROUND_MAX_BYTES (8ull << 20)
static uint64_t read_around_of(struct mpu_monitor *m, struct range *r, uint64_t page,
                               uint64_t most, uint64_t *window)
{
    struct mpu_header *h = m->h;
    uint32_t used = __atomic_load_n(&h->used, __ATOMIC_RELAXED);
    uint32_t high = __atomic_load_n(&h->high, __ATOMIC_RELAXED);
    uint32_t low = __atomic_load_n(&h->low, __ATOMIC_RELAXED);
    uint64_t now = mpu_now_ns(), evictions = mpu_load64(&h->evictions);
    if (evictions != m->evictions_seen) {
        m->evictions_seen = evictions;
        m->looked_ns = now;
        m->churning = 1;
    } else if (now - m->looked_ns > CHURN_NS) {
        m->churning = 0;
    }
    uint64_t base = most + 1, largest = AROUND_MAX_BYTES / m->page_size;
    if (largest < base)
        largest = base;
    const struct mpu_region_info *info = &mpu_regions(h)[r->r.region];
    uint64_t mine = __atomic_load_n(&info->present, __ATOMIC_RELAXED);
    uint64_t all = mpu_load64(&h->present);
    int fits = (all > mine ? all - mine : 0) + info->npages <= high;
    uint64_t w = fits && r->around_window ? r->around_window : base;
    if (base < 2 || m->churning || (!fits && (uint64_t)used + 2 * w > low)) {
        /* No more reading around: a random fault that lands at either
         * edge of the last window is no scan going through it. */
        r->around = r->around_end = 0;
        return 0;
    }
    uint64_t first = page / w * w;
    if (r->around == first + 1)
        return 0;  /* asked for already: another fault in the window */
    r->around = first + 1;
    r->around_end = first + w;
    r->around_window = (uint32_t)(fits && 2 * w <= largest ? 2 * w : w);
    *window = w;
    return first + 1;
}

/* Whether a filler would take a fault up now: every fault sent to it is
 * taken up, none in this batch, and it reads the store for none.  One that
 * answers a fault it has read (UFFDIO_COPY, then WAKE) is free: its client
 * may fault again before that call returns.  So is one that reads a
 * window (read-ahead, prefetch): it serves faults between its runs, and a
 * fault sent elsewhere would often wait for a page of that window. */
static int filler_free(struct mpu_monitor *m, uint32_t to, const uint32_t *counts)
{
    const struct outbox *o = &m->out[to];
    if (o->fd < 0 || o->worker < 0 || counts[to])
        return 0;
    uint64_t taken = mpu_load64(&m->h->taken[o->worker]);
    return (int64_t)(o->sent - taken) <= 0 && !mpu_load64(&m->h->fault_reading[o->worker]);
}

/* The filler for a fault: its page's (mpu_filler_for), unless that one is
 * busy and another is free.  A filler reads one page at a time: two
 * clients' faults on pages of one filler waited for each other's disk
 * reads while the other filler sat idle (half the time with two fillers:
 * a quarter of each fault's time, from a cold disk), and one filler caught
 * in a store that hangs held every fault on half the pages of every file.
 * Another filler may take a fault on a page in hand elsewhere: the page's
 * state word orders them (it waits for PRESENT, then wakes).
 * Write-protect faults keep their page's filler: they read nothing. */
static uint32_t route(struct mpu_monitor *m, uint32_t region, uint64_t page, uint32_t pf,
                      const uint32_t *counts)
{
    uint32_t home = mpu_filler_for(region, page, (uint32_t)m->nfillers);
    if (pf & MPU_PF_WP)
        return home;
    for (uint32_t k = 0; k < (uint32_t)m->nfillers; k++) {
        uint32_t to = (home + k) % (uint32_t)m->nfillers;
        if (filler_free(m, to, counts))
            return to;
    }
    return home;
}

/* Reads what the client's userfaultfd has, finds each fault's region and
 * page, and sends each filler its faults in one packet.  A fault outside
 * every range is woken (the thread retries, and never hangs on us).
 * Returns the number of faults read, or -errno from reading the uffd. */
static int drain(struct mpu_monitor *m, uint32_t slot, struct monitored *c)
{
    struct mpu_header *h = m->h;
    uint64_t started = mpu_now_ns();
    uint32_t counts[m->nfillers];
    uint64_t addrs[MPU_FAULTS_MAX];
    struct window aheads[MPU_FAULTS_MAX];
    int total = 0;

    for (;;) {
        int n = mpu_uffd_read_faults(c->uffd, addrs, MPU_FAULTS_MAX);
        if (n <= 0) {
            if (n < 0 && total == 0)
                return n;
            break;
        }
        /* Counted before they go to the fillers: a client whose fault is
         * answered must find it counted. */
        mpu_add64(&h->faults, n);
        if (slot < MPU_CLIENT_SLOTS)
            mpu_add64(&h->clients[slot].faults, n);
        uint64_t now = mpu_now_ns();
        int naheads = 0;
        memset(counts, 0, sizeof counts);
        for (int i = 0; i < n; i++) {
            uint32_t pf = (uint32_t)(addrs[i] & (MPU_PF_WRITE | MPU_PF_WP));
            addrs[i] &= ~(uint64_t)(MPU_PF_WRITE | MPU_PF_WP);
            struct range *r = locate(c->ranges, c->nranges, addrs[i]);
            if (!r) {
                uint64_t page = addrs[i] & ~(m->system_page - 1);
                mpu_uffd_wake(c->uffd, page, m->system_page);
                continue;
            }
            uint64_t index = (addrs[i] - r->r.start) / m->page_size;
            uint32_t to = route(m, r->r.region, index, pf, counts);
            struct mpu_fault *fault = (struct mpu_fault *)(m->scratch + to * PACKET_SIZE
                                                           + sizeof(struct mpu_w_faults))
                                      + counts[to]++;
            *fault = (struct mpu_fault){
                .client = slot, .client_gen = c->gen,
                .region = r->r.region, .region_gen = r->r.region_gen,
                .page = index, .address = r->r.start + index * m->page_size,
                .read_at = now,
                .flags = (pf & MPU_PF_WP ? MPU_FAULT_WP
                          : pf & MPU_PF_WRITE ? MPU_FAULT_WRITE : 0)
                         | (r->r.writable ? MPU_FAULT_WRITABLE : 0),
            };
            if (pf & MPU_PF_WP)
                continue;  /* a page that is there: nothing to read */
            if (m->read_ahead && r->r.advice != MPU_ADVICE_RANDOM) {
                /* A store's larger windows: at most a sixteenth of the
                 * buffer, so that several fit in the quarter a scan may
                 * keep ahead (read_ahead_depth). */
                uint64_t most = m->read_ahead;
                if (r->r.window > most + 1) {
                    uint64_t part = __atomic_load_n(&h->limit, __ATOMIC_RELAXED) / 16;
                    uint64_t w = r->r.window < part ? r->r.window : part;
                    most = w > most + 1 ? w - 1 : most;
                }
                uint64_t first, window, windows, full = most + 1;
                uint64_t depth = read_ahead_depth(m, full);
                struct stream *started;
                uint32_t lane;
                fault->ahead = (uint32_t)read_ahead_of(r, index, most, depth, m->read_ahead,
                                                       &first, &window, &windows, &started,
                                                       &lane);
                int down = started && r->around && index + 2 == r->around;
                if (started && (r->r.advice == MPU_ADVICE_SEQUENTIAL || down
                                || (r->around_end && index == r->around_end))) {
                    /* Advised sequential, or the page just past the last
                     * window read around, or just before it (a scan went
                     * through it, one way or the other): go on as a scan,
                     * read ahead in full windows, rather than read
                     * around. */
                    started->last_page = down ? index + 1 : index - 1;
                    started->ahead_end = down ? index + 1 : index;
                    started->dir = down ? -1 : 0;
                    started->steps = down ? 2 : 0;
                    started->window = (uint32_t)full;
                    fault->ahead = (uint32_t)read_ahead_of(r, index, most, depth,
                                                           m->read_ahead, &first, &window,
                                                           &windows, &started, &lane);
                }
                if (first)
                    aheads[naheads++] = (struct window){
                        first, window, windows, r->r.region, r->r.region_gen,
                        r->streams[lane].dir < 0 ? MPU_W_READ_BEHIND : MPU_W_READ_AHEAD,
                        slot * STREAMS + lane, full };
                else if (started
                         && (first = read_around_of(m, r, index, most, &window)))
                    aheads[naheads++] = (struct window){ first - 1, window, 1, r->r.region,
                                                         r->r.region_gen, MPU_W_READ_AROUND, 0,
                                                         full };
            }
            if (r->r.unit > 1) {
                /* The region's pages are larger than the server's: the
                 * fault's filler reads all of the one it is in. */
                uint64_t start = index / r->r.unit * r->r.unit;
                uint64_t tail = start + r->r.unit - 1 - index;
                fault->behind = (uint32_t)(index - start);
                if (fault->ahead < tail)
                    fault->ahead = (uint32_t)tail;
            }
        }
        for (int to = 0; to < m->nfillers; to++) {
            if (!counts[to])
                continue;
            char *packet = m->scratch + to * PACKET_SIZE;
            *(struct mpu_w_faults *)packet = (struct mpu_w_faults){ MPU_W_FAULTS, counts[to] };
            uint32_t size = sizeof(struct mpu_w_faults) + counts[to] * sizeof(struct mpu_fault);
            if (post(m, to, packet, size) < 0) {
                /* Nowhere to keep them: woken, the threads fault again. */
                const struct mpu_fault *f = (const struct mpu_fault *)(packet
                                                                       + sizeof(struct mpu_w_faults));
                for (uint32_t k = 0; k < counts[to]; k++)
                    mpu_uffd_wake(c->uffd, f[k].address, m->page_size);
                continue;
            }
            m->out[to].sent += counts[to];
            if (m->out[to].head < m->out[to].len)
                mpu_add64(&h->queued_faults, counts[to]);  /* they wait in its queue */
        }
        /* After the faults: a filler serves what a client waits for first. */
        for (int k = 0; k < naheads; k++) {
            struct window *a = &aheads[k];
            for (uint64_t i = 0; i < a->windows; i++) {
                if (a->kind != MPU_W_READ_BEHIND) {
                    post_read_ahead(m, a->kind, a->region, a->gen, a->first + i * a->count,
                                    a->count, a->lane, a->run);
                    continue;
                }
                uint64_t top = a->first - i * a->count;  /* > 0: windows stop at 0 */
                uint64_t count = top < a->count ? top : a->count;
                post_read_ahead(m, a->kind, a->region, a->gen, top - count, count, a->lane,
                                a->run);
            }
        }
        total += n;
        if (n < MPU_FAULTS_MAX)
            break;
    }
    mpu_add64(&h->monitor_ns, (int64_t)(mpu_now_ns() - started));
    return total;
}

/* ---- the monitor thread --------------------------------------------------- */

struct epoll_wait_args {
    int epfd;
    struct epoll_event *events;
    int max;
    int n;
};

static int poll_epoll(void *arg)
{
    struct epoll_wait_args *a = arg;
    a->n = epoll_wait(a->epfd, a->events, a->max, 0);
    return a->n != 0;
}

static void *monitor_loop(void *arg)
{
    struct mpu_monitor *m = arg;
    struct epoll_event events[64];
    struct epoll_wait_args polled = { m->epfd, events, 64, 0 };
    for (;;) {
        int n = spin(&m->spinner, poll_epoll, &polled) ? polled.n
                                                     : epoll_wait(m->epfd, events, 64, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        for (int i = 0; i < n; i++) {
            uint64_t key = events[i].data.u64;
            if (key == STOP_KEY)
                return NULL;
            pthread_mutex_lock(&m->lock);
            if (key >= FILLER_KEY) {
                int index = (int)(key - FILLER_KEY);
                if (index < m->nfillers && m->out[index].armed)
                    outbox_flush(m, index);
            } else {
                struct monitored *c = &m->clients[key];
                if (c->uffd >= 0) {
                    int got = drain(m, (uint32_t)key, c);
                    /* A userfaultfd that only reports an error would wake
                     * us forever: stop watching it (the server drops its
                     * client when its connection closes). */
                    if (got < 0 && (events[i].events & (EPOLLERR | EPOLLHUP)))
                        epoll_ctl(m->epfd, EPOLL_CTL_DEL, c->uffd, NULL);
                }
            }
            pthread_mutex_unlock(&m->lock);
        }
    }
}

static void monitor_free(struct mpu_monitor *m)
{
    for (int i = 0; i < MPU_CLIENT_SLOTS; i++)
        free(m->clients[i].ranges);
    for (int i = 0; m->out && i < m->nfillers; i++)
        free(m->out[i].buf);
    if (m->epfd >= 0)
        close(m->epfd);
    if (m->stopfd >= 0)
        close(m->stopfd);
    pthread_mutex_destroy(&m->lock);
    free(m->out);
    free(m->scratch);
    free(m);
}

struct mpu_monitor *mpu_monitor_start(struct mpu_header *h, uint64_t page_size,
                                      uint64_t read_ahead, int nfillers, uint64_t spin_ns)
{
    if (nfillers <= 0) {
        errno = EINVAL;
        return NULL;
    }
    struct mpu_monitor *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->h = h;
    m->page_size = page_size;
    m->system_page = (uint64_t)sysconf(_SC_PAGESIZE);
    m->read_ahead = read_ahead;
    m->spinner.spin_ns = spin_ns;
    m->nfillers = nfillers;
    m->out = calloc((size_t)nfillers, sizeof *m->out);
    m->scratch = aligned_alloc(8, (size_t)nfillers * PACKET_SIZE);
    m->epfd = epoll_create1(EPOLL_CLOEXEC);
    m->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_mutex_init(&m->lock, NULL);
    for (int i = 0; i < nfillers && m->out; i++)
        m->out[i].fd = m->out[i].worker = -1;
    for (int i = 0; i < MPU_CLIENT_SLOTS; i++)
        m->clients[i].uffd = -1;
    struct epoll_event stop = { .events = EPOLLIN, .data.u64 = STOP_KEY };
    int err = 0;
    if (!m->out || !m->scratch || m->epfd < 0 || m->stopfd < 0
        || epoll_ctl(m->epfd, EPOLL_CTL_ADD, m->stopfd, &stop) < 0)
        err = errno ? errno : ENOMEM;
    else
        err = pthread_create(&m->thread, NULL, monitor_loop, m);
    if (err) {
        monitor_free(m);
        errno = err;
        return NULL;
    }
    return m;
}

int mpu_monitor_add_client(struct mpu_monitor *m, uint32_t slot, uint32_t gen, int uffd)
{
    if (slot >= MPU_CLIENT_SLOTS)
        return -EINVAL;
    pthread_mutex_lock(&m->lock);
    struct monitored *c = &m->clients[slot];
    int err = c->uffd >= 0 ? -EBUSY : 0;
    if (!err) {
        struct epoll_event ev = { .events = EPOLLIN, .data.u64 = slot };
        if (epoll_ctl(m->epfd, EPOLL_CTL_ADD, uffd, &ev) < 0)
            err = -errno;
    }
    if (!err) {
        c->uffd = uffd;
        c->gen = gen;
    }
    pthread_mutex_unlock(&m->lock);
    return err;
}

int mpu_monitor_set_ranges(struct mpu_monitor *m, uint32_t slot,
                           const struct mpu_client_range *ranges, int n)
{
    if (slot >= MPU_CLIENT_SLOTS || n < 0)
        return -EINVAL;
    struct range *copy = NULL;
    if (n) {
        copy = calloc((size_t)n, sizeof *copy);
        if (!copy)
            return -ENOMEM;
        for (int i = 0; i < n; i++)
            copy[i].r = ranges[i];
    }
    pthread_mutex_lock(&m->lock);
    struct monitored *c = &m->clients[slot];
    struct range *old = c->ranges;
    /* Mappings that stay keep the scans the monitor follows in them (both
     * lists are sorted by start). */
    for (int i = 0, j = 0; i < n && j < c->nranges;) {
        if (old[j].r.start < copy[i].r.start) {
            j++;
        } else if (old[j].r.start > copy[i].r.start) {
            i++;
        } else {
            if (old[j].r.end == copy[i].r.end && old[j].r.region == copy[i].r.region
                && old[j].r.region_gen == copy[i].r.region_gen) {
                copy[i].clock = old[j].clock;
                copy[i].around = old[j].around;
                copy[i].around_end = old[j].around_end;
                copy[i].around_window = old[j].around_window;
                memcpy(copy[i].streams, old[j].streams, sizeof copy[i].streams);
            }
            i++, j++;
        }
    }
    c->ranges = copy;
    c->nranges = n;
    pthread_mutex_unlock(&m->lock);
    free(old);
    return 0;
}

int mpu_monitor_remove_client(struct mpu_monitor *m, uint32_t slot)
{
    if (slot >= MPU_CLIENT_SLOTS)
        return -EINVAL;
    pthread_mutex_lock(&m->lock);
    struct monitored *c = &m->clients[slot];
    if (c->uffd >= 0)
        epoll_ctl(m->epfd, EPOLL_CTL_DEL, c->uffd, NULL);
    c->uffd = -1;
    struct range *old = c->ranges;
    c->ranges = NULL;
    c->nranges = 0;
    pthread_mutex_unlock(&m->lock);
    free(old);
    return 0;
}

void mpu_monitor_set_filler(struct mpu_monitor *m, int index, int fd, int worker)
{
    pthread_mutex_lock(&m->lock);
    if (index >= 0 && index < m->nfillers) {
        struct outbox *o = &m->out[index];
        outbox_clear(m, index);
        o->fd = fd;
        o->worker = fd >= 0 && worker >= 0 && worker < MPU_WORKER_SLOTS ? worker : -1;
        /* What a filler that died had in hand, or was reading, is not its
         * successor's. */
        o->sent = o->worker >= 0 ? mpu_load64(&m->h->taken[o->worker]) : 0;
        if (o->worker >= 0)
            __atomic_store_n(&m->h->fault_reading[o->worker], 0, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&m->lock);
}

int mpu_monitor_stop(struct mpu_monitor *m)
{
    if (!m)
        return 0;
    uint64_t one = 1;
    ssize_t n;
    do
        n = write(m->stopfd, &one, sizeof one);
    while (n < 0 && errno == EINTR);
    if (n != sizeof one)
        return -(errno ? errno : EIO);  /* it would never wake: leave it be */
    pthread_join(m->thread, NULL);
    monitor_free(m);
    return 0;
}

/* ---- filler -------------------------------------------------------------- */

static void event(struct mpu_filler *f, uint32_t code, uint32_t region, uint64_t page,
                  int64_t err, uint64_t value)
{
    if (f->nevents >= MPU_EVENTS_MAX) {
        f->lost++;  /* counted: the Python side says how many it did not see */
        return;
    }
    struct mpu_event *e = &f->events[f->nevents++];
    e->code = code;
    e->region = region;
    e->page = page;
    e->err = err;
    e->value = value;
}

static void beat(struct mpu_filler *f)
{
    mpu_beat(f->h, f->worker);
}

static uint32_t slot_of(const struct mpu_filler *f, const struct mpu_region_slot *r)
{
    return (uint32_t)(r - f->regions);
}

/* Says whether the filler reads the store for a fault now (route). */
static void fault_reading(struct mpu_filler *f, int on)
{
    if (f->serving && f->worker < MPU_WORKER_SLOTS)
        __atomic_store_n(&f->h->fault_reading[f->worker], (uint64_t)on, __ATOMIC_RELEASE);
}

/* What this filler reads from now on (NULL: nothing), for the supervisor
 * that finds it hung to know whose store hangs (mpu_set_in_store), and for
 * the monitor (fault_reading). */
static void reading(struct mpu_filler *f, const struct mpu_region_slot *r)
{
    mpu_set_in_store(f->h, (int32_t)f->worker, r ? slot_of(f, r) : 0, r ? r->gen : 0);
    fault_reading(f, r != NULL);
}

/* Whether the region's store hung a worker (mpu_region_stall). */
static int stalled(const struct mpu_filler *f, const struct mpu_region_slot *r)
{
    return mpu_region_stalled(f->h, slot_of(f, r), r->gen);
}

static uint64_t fill_length(const struct mpu_filler *f, const struct mpu_region_slot *r,
                            uint64_t page)
{
    uint64_t start = page * f->page_size;
    uint64_t left = r->map_length - start;
    return left < f->page_size ? left : f->page_size;
}

#ifndef SYS_cachestat
#define SYS_cachestat 451  /* the same on every architecture */
#endif

/* Whether the kernel's page cache holds all of [offset, offset + len) of the
 * file, by cachestat (Linux 6.5).  Since 6.14 the kernel answers only those
 * who own the file or may write it (as mincore does); where it will not
 * answer, the region stops asking. */
static int in_page_cache(struct mpu_filler *f, struct mpu_region_slot *r, uint64_t offset,
                         uint64_t len)
{
    if (offset >= r->size)
        return 0;
    if (offset + len > r->size)
        len = r->size - offset;
    struct { uint64_t off, len; } range = { offset, len };
    struct {
        uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
    } stat;
    if (syscall(SYS_cachestat, r->store_fd, &range, &stat, 0) < 0) {
        if (errno != EINTR && errno != EAGAIN)
            r->no_cache = 1;  /* ENOSYS, EPERM */
        return 0;
    }
    return stat.nr_cache >= mpu_system_pages(len, f->system_page);
}

/* The store's file opened again, buffered, through /proc/self/fd: the same
 * inode, a description of our own, told `advice` (posix_fadvise).  Never
 * waits for a lease (O_NONBLOCK, cleared once open).  -1 when refused. */
static int reopen_store(const struct mpu_region_slot *r, int advice)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", r->store_fd);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0 && (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0
                    || posix_fadvise(fd, 0, 0, advice) != 0)) {
        close(fd);
        fd = -1;
    }
    return fd;
}

/* The reader beside a direct store for what the page cache holds: opened
 * only once the page cache holds something to read, so that a region read
 * from a cold disk costs a filler no descriptor for it; its reads start no
 * read-ahead into the cache (POSIX_FADV_RANDOM). */
static int cache_reader(struct mpu_region_slot *r)
{
    if (r->cache_fd >= 0 || r->no_cache)
        return r->cache_fd;
    int fd = reopen_store(r, POSIX_FADV_RANDOM);
    if (fd < 0)
        r->no_cache = 1;
    return r->cache_fd = fd;
}

/* For a direct store, pages another process keeps in the page cache are
 * copied from there: a disk read costs 30 to 50 times more, and taking them
 * adds nothing to the memory in use.  Only when cachestat says the whole run
 * is there: a buffered read that misses starts reading the missing pages
 * into the cache even with RWF_NOWAIT.  RWF_NOWAIT still, so that a page
 * evicted since we looked costs a short read (what follows is read with
 * O_DIRECT) and not a wait; its pages may then land in the cache, a rare
 * race.  (Not for drop: the pages the kernel read ahead for it would look
 * like another's, and stay.)  Returns the bytes copied, a whole number of
 * system pages unless the file ends there. */
static uint64_t read_from_page_cache(struct mpu_filler *f, struct mpu_region_slot *r,
                                     uint64_t offset, uint64_t want)
{
    if (r->store_mode != MPU_STORE_DIRECT || r->no_cache || !in_page_cache(f, r, offset, want))
        return 0;
    int fd = cache_reader(r);
    if (fd < 0)
        return 0;
    uint64_t got = 0;
    while (got < want) {
        struct iovec iov = { .iov_base = f->chunk + got, .iov_len = want - got };
        ssize_t n = preadv2(fd, &iov, 1, (off_t)(offset + got), RWF_NOWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (uint64_t)n;
    }
    if (got < want && offset + got < r->size)
        got -= got % f->system_page;  /* the store reads the rest, aligned */
    mpu_add64(&f->h->cache_bytes, (int64_t)got);
    return got;
}

/* The store's file opened again for scans (reopen_store), told
 * POSIX_FADV_SEQUENTIAL.  A scan's full windows read through it,
 * and the kernel's asynchronous read-ahead keeps the disk busy while we
 * copy what we read: on this project's virtual disk O_DIRECT gave 1.1-1.3
 * GB/s at any size and depth (and so did buffered reads of exactly what we
 * asked for, with POSIX_FADV_WILLNEED of the next windows), buffered reads
 * with the kernel's read-ahead 2.4.  Each scan's windows go to one filler
 * (see post_read_ahead), so that its reader sees one stream.  What a scan
 * read is dropped behind it (read_run), whoever else read it (but for
 * pages someone maps: the kernel keeps those): the page cache holds at
 * most the kernel's read-ahead window past where a scan stopped. */
#define SCAN_DROP_BEHIND 8  /* windows */
#define SCAN_SWEEPS 6       /* drops of what lies past a scan that stopped */
static int scan_reader(struct mpu_region_slot *r)
{
    if (r->scan_fd != -1)
        return r->scan_fd;
    int fd = reopen_store(r, POSIX_FADV_SEQUENTIAL);
    return r->scan_fd = fd >= 0 ? fd : -2;
}

/* A scan's full window, in bytes. */
static uint64_t scan_window(const struct mpu_filler *f)
{
    return (f->read_ahead + 1) * f->page_size;
}

/* Whether a scan's window (or what is left of it) is read through the scan
 * reader, and dropped behind: unless the page cache holds all of it and it
 * does not start at, or a little past, where this filler's scan reader last
 * read (there, what the cache holds is what the kernel read ahead for us).
 * A little past: a program that outruns its read-ahead faults on the first
 * page of a window before the window is read, and the rest of the window
 * starts a page late; pages a scan skipped lie within what drop_behind
 * drops.  A file another process keeps in the page cache is copied from
 * there, and left there. */
static int scan_through_reader(struct mpu_filler *f, struct mpu_region_slot *r,
                               uint64_t offset, uint64_t want)
{
    if (r->store_mode != MPU_STORE_DIRECT)
        return 0;
    if (r->scan_ns && offset >= r->scan_end
        && offset - r->scan_end < SCAN_DROP_BEHIND * scan_window(f))
        return 1;
    return r->no_cache || !in_page_cache(f, r, offset, want);
}

/* After a scan's read of [offset, offset + got) through the scan reader:
 * that is dropped from the page cache, and behind it too (the kernel's
 * read-ahead may have brought pages there that a shorter read, not
 * through this reader, took). */
static void drop_behind(struct mpu_region_slot *r, int fd, uint64_t offset, uint64_t got,
                        uint64_t window)
{
    uint64_t behind = offset < SCAN_DROP_BEHIND * window ? offset : SCAN_DROP_BEHIND * window;
    posix_fadvise(fd, (off_t)(offset - behind), (off_t)(got + behind), POSIX_FADV_DONTNEED);
    r->scan_end = offset + got;
    r->scan_ns = mpu_now_ns();
    r->sweeps = SCAN_SWEEPS;
}

/* The filler's pipe for splice_run, made when its loop starts (a
 * descriptor it keeps for good), as large as a scan's window: splice_run
 * moves nothing larger, and a pipe larger than fs.pipe-max-size (1 MiB by
 * default) is refused to a server that is not root, which would then
 * never splice. */
static void make_splice_pipe(struct mpu_filler *f)
{
    if (f->splicing)
        return;
    f->splicing = 2;
    if (pipe2(f->splice_pipe, O_CLOEXEC) < 0)
        return;
    if (fcntl(f->splice_pipe[1], F_SETPIPE_SZ, (int)((f->read_ahead + 1) * f->page_size)) > 0) {
        f->splicing = 1;
    } else {
        close(f->splice_pipe[0]);
        close(f->splice_pipe[1]);
    }
}

/* A scan's window straight from the page cache into the memfd, through a
 * pipe (splice): one copy where read and write make two, and the copying
 * is what bounds a scan of small pages.  Returns the bytes moved, or -1
 * when splicing cannot be used here (the caller reads instead); what it
 * moved of a page it did not finish is the caller's to punch out. */
static int64_t splice_run(struct mpu_filler *f, struct mpu_region_slot *r, uint64_t first,
                          uint64_t npages)
{
    if (f->splicing != 1 || r->store_mode != MPU_STORE_DIRECT)
        return -1;
    reading(f, r);  /* opening the scan reader asks the store too */
    int fd = scan_reader(r);
    if (fd < 0) {
        reading(f, NULL);
        return -1;
    }
    uint64_t want = npages * f->page_size, offset = first * f->page_size, got = 0;
    uint64_t started = mpu_now_ns();
    beat(f);
    while (got < want) {
        loff_t in = (loff_t)(offset + got);
        ssize_t n = splice(fd, &in, f->splice_pipe[1], NULL, want - got, SPLICE_F_MOVE);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && got == 0 && errno == EINVAL) {
            reading(f, NULL);
            return f->splicing = 2, -1;  /* this file system cannot */
        }
        if (n <= 0)
            break;
        for (ssize_t moved = 0; moved < n;) {
            loff_t out = (loff_t)(offset + got + (uint64_t)moved);
            ssize_t m = splice(f->splice_pipe[0], NULL, r->memfd, &out, (size_t)(n - moved),
                               SPLICE_F_MOVE);
            if (m < 0 && errno == EINTR)
                continue;
            if (m <= 0) {
                /* The pipe must be empty for the next window: drain it. */
                char sink[1024];
                for (ssize_t left = n - moved; left > 0;) {
                    ssize_t k = read(f->splice_pipe[0], sink,
                                     left < (ssize_t)sizeof sink ? (size_t)left : sizeof sink);
                    if (k <= 0)
                        break;
                    left -= k;
                }
                reading(f, NULL);
                beat(f);
                return (int64_t)(got + (uint64_t)moved);
            }
            moved += m;
        }
        got += (uint64_t)n;
    }
    reading(f, NULL);
    beat(f);
    if (got)
        drop_behind(r, fd, offset, got, scan_window(f));
    mpu_add64(&f->h->read_ns, (int64_t)(mpu_now_ns() - started));
    mpu_add64(&f->h->bytes_read, (int64_t)got);
    return (int64_t)got;
}

/* read_run for a store that C does not read: the filler's Python side
 * does, into the chunk. */
static int64_t call_store(struct mpu_filler *f, struct mpu_region_slot *r, uint64_t offset,
                          uint64_t want, uint64_t started)
{
    int64_t got = f->read_store ? f->read_store(slot_of(f, r), offset, f->chunk, want)
                                : -ENOSYS;
    beat(f);
    if (got < 0)
        return got;
    if ((uint64_t)got > want)
        got = (int64_t)want;
    memset(f->chunk + got, 0, want - (uint64_t)got);
    mpu_add64(&f->h->read_ns, (int64_t)(mpu_now_ns() - started));
    mpu_add64(&f->h->bytes_read, got);
    return got;
}

/* Reads npages from page `first` into the chunk; zeros past the file's end.
 * A full window of a scan (`scan`: see scan_through_reader) reads
 * through scan_reader, and drops what it read.  Returns the bytes read, or
 * -errno.  The heartbeat is bumped on both sides of the read: only
 * a read that hangs stops it. */
static int64_t read_run(struct mpu_filler *f, struct mpu_region_slot *r,
                        uint64_t first, uint64_t npages, int scan)
{
    uint64_t want = npages * f->page_size;
    uint64_t offset = first * f->page_size;
    uint64_t started = mpu_now_ns();
    beat(f);
    if (r->store_mode == MPU_STORE_CALL) {
        fault_reading(f, 1);
        int64_t got = call_store(f, r, offset, want, started);  /* (it has deadlines) */
        fault_reading(f, 0);
        return got;
    }
    reading(f, r);
    int fd = r->store_fd, direct = r->store_mode == MPU_STORE_DIRECT, drop = 0;
    if (scan && direct && (fd = scan_reader(r)) >= 0)
        direct = 0, drop = 1;
    else
        fd = r->store_fd;
    /* (Not for a scan: what the kernel read ahead for it is in the cache,
     * and must be dropped behind it too.) */
    uint64_t cached = drop ? 0 : read_from_page_cache(f, r, offset, want), got = cached;
    /* What the cache gave may end at the file's end, unaligned: the store
     * must not be asked for more then. */
    uint64_t asked = cached && offset + cached >= r->size ? cached : want;
    while (got < asked) {
        ssize_t n = pread(fd, f->chunk + got, want - got, (off_t)(offset + got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int err = errno;
            reading(f, NULL);
            beat(f);
            return -err;
        }
        if (n == 0)
            break;
        got += (uint64_t)n;
        if (direct && got % 512)
            break;  /* a short O_DIRECT read ends at the end of the file */
    }
    reading(f, NULL);
    beat(f);
    if (got < want)
        memset(f->chunk + got, 0, want - got);
    if (drop && got)
        drop_behind(r, fd, offset, got, scan_window(f));
    if (r->store_mode == MPU_STORE_DROP && got)
        posix_fadvise(r->store_fd, (off_t)offset, (off_t)got, POSIX_FADV_DONTNEED);
    mpu_add64(&f->h->read_ns, (int64_t)(mpu_now_ns() - started));
    mpu_add64(&f->h->bytes_read, (int64_t)got);
    return (int64_t)got;
}

/* What the kernel read ahead past a scan that stopped (no window read for
 * SCAN_IDLE_NS) is dropped too, up to SCAN_LEFTOVER bytes past it: else
 * every scan that ends before its file does leaves the kernel's read-ahead
 * window in the page cache.  Looked for at most every SCAN_IDLE_NS / 2, on
 * the filler's way to its next message (it wakes idle often enough), and
 * dropped again, SCAN_SWEEPS times in all, further apart each time, from
 * SCAN_LATE before where it ended: a read-ahead still under way when it
 * is dropped (a busy disk) lands in the cache after. */
#define SCAN_IDLE_NS 200000000ull
#define SCAN_LEFTOVER (64ull << 20)
#define SCAN_LATE (8ull << 20)  /* behind scan_end: read-ahead that landed late */
static void drop_leftovers(struct mpu_region_slot *r)
{
    uint64_t from = r->scan_end > SCAN_LATE ? r->scan_end - SCAN_LATE : 0;
    posix_fadvise(r->scan_fd, (off_t)from, (off_t)(r->scan_end - from + SCAN_LEFTOVER),
                  POSIX_FADV_DONTNEED);
}

void mpu_scan_done(struct mpu_region_slot *r)
{
    if (r->scan_fd >= 0 && r->scan_ns)
        drop_leftovers(r);
    r->scan_ns = 0;
}

void mpu_filler_region_gone(struct mpu_filler *f, struct mpu_region_slot *r)
{
    if (r->fill_map) {
        munmap((void *)(uintptr_t)r->fill_map, r->map_length);
        r->fill_map = 0;
    }
    if (r->scan_fd < 0 || !r->scan_ns) {
        mpu_scan_done(r);
        return;
    }
    for (int k = 0; k < MPU_LEFTOVERS; k++) {
        struct mpu_leftover *l = &f->leftovers[k];
        if (l->fd >= 0)
            continue;
        l->fd = fcntl(r->scan_fd, F_DUPFD_CLOEXEC, 3);
        if (l->fd >= 0) {
            l->sweeps = SCAN_SWEEPS - 1;
            l->scan_end = r->scan_end;
            l->at_ns = mpu_now_ns();
        }
        break;
    }
    mpu_scan_done(r);
}

static void drop_scan_leftovers(struct mpu_filler *f)
{
    uint64_t now = mpu_now_ns();
    if (now - f->swept_ns < SCAN_IDLE_NS / 2)
        return;
    f->swept_ns = now;
    for (int k = 0; k < MPU_LEFTOVERS; k++) {
        struct mpu_leftover *l = &f->leftovers[k];
        if (l->fd < 0 || now - l->at_ns <= SCAN_IDLE_NS << (SCAN_SWEEPS - l->sweeps))
            continue;
        struct mpu_region_slot gone = { .scan_fd = l->fd, .scan_end = l->scan_end };
        drop_leftovers(&gone);
        l->at_ns = now;
        if (--l->sweeps == 0) {
            close(l->fd);
            l->fd = -1;
        }
    }
    for (uint32_t i = 0; i < f->nregions; i++) {
        struct mpu_region_slot *r = &f->regions[i];
        if (!r->live || !r->scan_ns || now - r->scan_ns <= SCAN_IDLE_NS)
            continue;
        if (r->sweeps > 1 && r->scan_fd >= 0) {
            /* Each sweep waits twice as long as the last: 0.2 s ... 6.4 s. */
            if (now - r->scan_ns <= SCAN_IDLE_NS << (SCAN_SWEEPS - r->sweeps))
                continue;
            r->sweeps--;
            drop_leftovers(r);
            r->scan_ns = now;
        } else {
            mpu_scan_done(r);
        }
    }
}

/* How many pages of a run the file gave all their bytes: fewer than the run
 * when the file shrank since it was mapped. */
static uint64_t whole_pages(struct mpu_filler *f, struct mpu_region_slot *r,
                            uint64_t first, uint64_t npages, uint64_t got)
{
    for (uint64_t k = 0; k < npages; k++) {
        uint64_t start = (first + k) * f->page_size;
        uint64_t expect = r->size - start < f->page_size ? r->size - start : f->page_size;
        if (got < k * f->page_size + expect)
            return k;
    }
    return npages;
}

/* Claims up to count FREE pages from start on (their descriptors into
 * `into`), stopping at the first that is not FREE or when the buffer has no
 * room (`how`: MPU_CLAIM_AHEAD, MPU_CLAIM_PREFETCH say when).  *full tells
 * the latter when nothing was claimed. */
static uint64_t claim_run(struct mpu_filler *f, struct mpu_region_slot *r,
                          uint64_t start, uint64_t count, int how, int *full,
                          uint32_t *into)
{
    uint64_t n = 0;
    *full = 0;
    for (uint64_t page = start; page < r->npages && n < count; page++, n++) {
        int state = mpu_page_claim(f->h, slot_of(f, r), r->gen, page, f->pid, how, 0,
                                   f->evict_fds, f->nevict, &into[n], NULL);
        if (state == -EAGAIN)
            *full = n == 0;
        if (state != MPU_FREE)
            break;
    }
    return n;
}

/* Claims the FREE pages just before `page`, up to `count` of them, nearest
 * first, stopping at the first that is not FREE or when the buffer has no
 * room; their descriptors go into `into` in page order.  How many. */
static uint64_t claim_behind(struct mpu_filler *f, struct mpu_region_slot *r, uint64_t page,
                             uint64_t count, uint32_t *into)
{
    uint64_t n = 0;
    if (count > page)
        count = page;
    if (count > f->max_run / 2)
        count = f->max_run / 2;
    while (n < count) {
        int state = mpu_page_claim(f->h, slot_of(f, r), r->gen, page - 1 - n, f->pid,
                                   MPU_CLAIM_AHEAD, 0, f->evict_fds, f->nevict, &into[n], NULL);
        if (state != MPU_FREE)
            break;
        n++;
    }
    for (uint64_t i = 0; i < n / 2; i++) {  /* nearest first -> page order */
        uint32_t d = into[i];
        into[i] = into[n - 1 - i];
        into[n - 1 - i] = d;
    }
    return n;
}

static void abandon(struct mpu_filler *f, const uint32_t *descs, uint64_t count)
{
    for (uint64_t k = 0; k < count; k++)
        mpu_page_filled(f->h, descs[k], 0, 0);
}

int mpu_filler_region_added(struct mpu_filler *f, struct mpu_region_slot *r)
{
    if (f->fill_uffd < 0 || r->fill_map || !r->map_length)
        return 0;
    void *at = mmap(NULL, r->map_length, PROT_READ, MAP_SHARED, r->memfd, 0);
    if (at == MAP_FAILED)
        return -errno;
    int err = mpu_uffd_register(f->fill_uffd, (uint64_t)(uintptr_t)at, r->map_length, 0);
    if (err) {
        munmap(at, r->map_length);
        return err;
    }
    r->fill_map = (uint64_t)(uintptr_t)at;
    r->fill_copied = 0;
    return 0;
}

/* MADV_DONTNEED lets go of the pages, but before Linux 6.14 (PT_RECLAIM)
 * not of the page tables that held them: 4 KiB for each 2 MiB of the
 * region ever filled, 8 GiB by a filler that filled 4 TiB.  A new mapping
 * every FILL_REMAP_BYTES keeps them to 2 MiB. */
#define FILL_REMAP_BYTES (1ull << 30)
static void remap_when_due(struct mpu_filler *f, struct mpu_region_slot *r, uint32_t region)
{
    if (r->fill_copied < FILL_REMAP_BYTES)
        return;
    munmap((void *)(uintptr_t)r->fill_map, r->map_length);
    r->fill_map = 0;
    int err = mpu_filler_region_added(f, r);
    if (err)  /* the filler writes the memfd from now on */
        event(f, MPU_EV_NO_FILL_MAP, region, 0, -err, 0);
}

/* UFFDIO_COPY of len bytes from `from` to the memfd at `offset`, through
 * the filler's own mapping of it.  A page already in the memfd there
 * (EEXIST) was never filled (the run's pages are claimed): punched out and
 * copied again, as copy() does.  Then the filler's page table lets go of
 * what it copied: the pages are the clients', and an evictor's punch need
 * not look in ours.  Returns the bytes copied. */
static uint64_t copy_in(struct mpu_filler *f, struct mpu_region_slot *r, uint32_t region,
                        uint64_t offset, const char *from, uint64_t len)
{
    char *map = (char *)(uintptr_t)r->fill_map;
    uint64_t done, more = 0;
    if (mpu_uffd_copy(f->fill_uffd, (uint64_t)(uintptr_t)(map + offset), from, len, 0,
                      &done) == -EEXIST) {
        /* The punch takes the whole umap page, with what this copy put in
         * it before the page that was there: copied again from its start. */
        uint64_t page = (offset + done) / f->page_size;
        event(f, MPU_EV_UNFILLED, region, page, 0, 0);
        mpu_punch(r->memfd, page * f->page_size, f->page_size);
        done = page * f->page_size - offset;
        mpu_uffd_copy(f->fill_uffd, (uint64_t)(uintptr_t)(map + offset + done), from + done,
                      len - done, 0, &more);
        done += more;
    }
    if (done) {
        madvise(map + offset, done, MADV_DONTNEED);
        r->fill_copied += done;
        remap_when_due(f, r, region);
    }
    return done;
}

/* len bytes from `from` into the memfd at `offset`: copied in through the
 * filler's own mapping where it has one, else written.  The bytes put. */
static ssize_t put_in(struct mpu_filler *f, struct mpu_region_slot *r, uint32_t region,
                      uint64_t offset, const char *from, uint64_t len)
{
    if (r->fill_map)
        return (ssize_t)copy_in(f, r, region, offset, from, len);
    return pwrite(r->memfd, from, len, (off_t)offset);
}

/* Writes claimed pages [first, first+count) (descriptors in descs) from the
 * chunk (the first at chunk page `slot`) into the memfd, PRESENT; failures
 * go back to FREE.  One put_in for the run (were it a write, each takes the
 * memfd's inode lock, which other fillers and the evictors want too), page
 * by page only where that one fell short.  Returns the pages written. */
static uint64_t write_run(struct mpu_filler *f, struct mpu_region_slot *r, uint32_t region,
                          uint64_t first, uint64_t count, uint64_t slot, uint32_t flags,
                          const uint32_t *descs)
{
    if (!count)
        return 0;
    uint64_t whole = (count - 1) * f->page_size + fill_length(f, r, first + count - 1);
    ssize_t n = put_in(f, r, region, first * f->page_size, f->chunk + slot * f->page_size,
                       whole);
    uint64_t wrote = n < 0 ? 0 : (uint64_t)n, done = 0;
    for (uint64_t k = 0; k < count; k++) {
        uint64_t page = first + k;
        uint64_t len = fill_length(f, r, page);
        int ok = wrote >= k * f->page_size + len;
        if (!ok) {
            ssize_t m = put_in(f, r, region, page * f->page_size,
                               f->chunk + (slot + k) * f->page_size, len);
            ok = m == (ssize_t)len;
            if (!ok)
                event(f, MPU_EV_WRITE_FAILED, region, page, m < 0 ? errno : EIO, 0);
        }
        mpu_page_filled(f->h, descs[k], ok, flags);
        done += ok;
    }
    return done;
}

static int gone(int err)
{
    /* The client died or unmapped: the page goes back to FREE, and the next
     * fault on it fills it. */
    return err == ESRCH || err == ENOENT || err == EINVAL || err == EFAULT || err == EBADF;
}

static int wake(struct mpu_filler *f, int uffd, uint32_t region, uint64_t page,
                uint64_t address, uint64_t len)
{
    uint64_t started = mpu_now_ns();
    int err = -mpu_uffd_wake(uffd, address, len);
    mpu_add64(&f->h->wake_ns, (int64_t)(mpu_now_ns() - started));
    if (err && !gone(err))
        event(f, MPU_EV_WAKE_FAILED, region, page, err, 0);
    return err == 0;
}

/* UFFDIO_COPY fills within one of the client's mappings (VMAs): a client
 * that split its mapping inside a page (mlock, mprotect or madvise of a
 * part of it) gets ENOENT for the whole page, as one that unmapped it, and
 * its fault would wait for ever.  The page goes into the memfd through our
 * own way in instead, and the client, woken, maps it from there itself.
 * One that lands write-protected is protected first, while it is still a
 * hole (a marker then stands for it).  Where the client did unmap, the
 * page is simply in the buffer.  0, or the errno of a put_in that fell
 * short (never one gone() knows: the client, woken, faults again). */
static int copy_beside(struct mpu_filler *f, struct mpu_region_slot *r, uint32_t region,
                       int uffd, uint64_t page, uint64_t address, uint64_t len,
                       uint64_t from, int wp)
{
    if (wp)
        mpu_uffd_writeprotect(uffd, address, len, 1);
    ssize_t n = put_in(f, r, region, page * f->page_size, f->chunk + from, len);
    if (n != (ssize_t)len)
        return n < 0 && !gone(errno) ? errno : EIO;
    mpu_uffd_wake(uffd, address, len);
    return 0;
}

/* Copies len bytes from the chunk at `from` to the client; 0 or errno.
 * wp: the page lands write-protected (a mapping that may write, reading). */
static int copy(struct mpu_filler *f, struct mpu_region_slot *r, uint32_t region,
                int uffd, uint64_t page, uint64_t address, uint64_t len, uint64_t from,
                int wp)
{
    uint64_t started = mpu_now_ns();
    int err = -mpu_uffd_copy(uffd, address, f->chunk + from, len, wp, NULL);
    if (err == EEXIST) {
        /* The memfd has a page we never filled (its state said FREE): it
         * cannot be trusted.  Punch it out and copy ours in. */
        event(f, MPU_EV_UNFILLED, region, page, 0, 0);
        mpu_punch(r->memfd, page * f->page_size, f->page_size);
        err = -mpu_uffd_copy(uffd, address, f->chunk + from, len, wp, NULL);
    }
    if (err == ENOENT && len > f->system_page)
        err = copy_beside(f, r, region, uffd, page, address, len, from, wp);
    mpu_add64(&f->h->copy_ns, (int64_t)(mpu_now_ns() - started));
    if (err) {
        mpu_add64(&f->h->fill_errors, 1);
        if (!gone(err)) {
            event(f, MPU_EV_COPY_FAILED, region, page, err, 0);
            wake(f, uffd, region, page, address, len);  /* woken, it faults again */
        }
    }
    return err;
}

/* Pages the buffer holds past the end of a file that shrank are dropped,
 * once per shrink: the first filler to see the file end before what the
 * region's record last knew walks the descriptors (the pages in use, not
 * those of the file); others find that walk done. */
static int drop_past_end(struct mpu_filler *f, struct mpu_region_slot *r, uint64_t end_page)
{
    struct mpu_region_info *info = &mpu_regions(f->h)[slot_of(f, r)];
    uint64_t known = __atomic_load_n(&info->covered, __ATOMIC_SEQ_CST);
    do {
        if (end_page >= known || info->gen != r->gen)
            return 0;
    } while (!__atomic_compare_exchange_n(&info->covered, &known, end_page, 0,
                                          __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    mpu_region_evict_from(f->h, slot_of(f, r), r->gen, end_page, f->pid, r->memfd,
                          f->page_size);
    beat(f);
    return 1;
}

/* UFFDIO_POISON's answer on a kernel that has none (before 6.6): an
 * unknown ioctl is EINVAL there, which gone() takes for a client that
 * went; POISON itself never says EINVAL of a client that went (ENOENT,
 * ESRCH). */
static int no_poison(int err)
{
    return err == EINVAL || err == ENOTTY;
}

/* UFFDIO_POISON of [start, start + len), waking whoever faulted there.  A
 * client that split its mapping inside the page (see copy_beside) gets
 * ENOENT for the whole range, as one that unmapped it, and its fault would
 * wait for ever: each system page, within one piece, is poisoned on its
 * own then (a piece the client did unmap is skipped).  0 or an errno. */
static int poison(struct mpu_filler *f, int uffd, uint64_t start, uint64_t len)
{
    int err = -mpu_uffd_poison(uffd, start, len, 1);
    if (err != ENOENT || len <= f->system_page)
        return err;
    for (uint64_t at = 0; at < len; at += f->system_page) {
        err = -mpu_uffd_poison(uffd, start + at, f->system_page, 1);
        if (err && err != EEXIST && !gone(err))
            return err;
    }
    return 0;
}

/* The file shrank (or cannot be read): as with a mapped file, the client
 * gets the bytes still there, zeros to the end of that system page, and
 * SIGBUS past them; pages the buffer holds past the end are dropped. */
static void past_the_end(struct mpu_filler *f, struct mpu_region_slot *r, uint32_t region,
                         int uffd, uint64_t page, uint64_t address, uint64_t len,
                         uint64_t got, int wp)
{
    uint64_t kept = mpu_round_up(got, f->system_page);
    if (kept > len)
        kept = len;
    if (kept < len) {
        /* Poisoned before the copy wakes the client: woken first, it could
         * fault past the end again before the poison is there.  The poison
         * wakes whoever faulted past the end (the copy wakes only those
         * within what it copies): a fault there, with the page's first
         * bytes in the buffer already, was not woken, and waited for
         * ever. */
        int err = poison(f, uffd, address + kept, len - kept);
        if (err && err != EEXIST && (no_poison(err) || !gone(err))) {
            /* No UFFDIO_POISON (an old kernel, or a client that did not ask
             * for it): zeros, as a hole would read. */
            event(f, MPU_EV_NO_POISON, region, page, err, 0);
            memset(f->chunk + kept, 0, len - kept);
            kept = len;
        }
    }
    if (kept)
        copy(f, r, region, uffd, page, address, kept, 0, wp);
    if (r->store_mode == MPU_STORE_CALL)
        return;  /* an object does not shrink: it failed, or was replaced */
    /* From the first page the file no longer holds whole: the one its end
     * falls in has bytes past the end too. */
    struct stat st;
    uint64_t end_page = page + 1, end = page * f->page_size + got;
    reading(f, r);
    int known = fstat(r->store_fd, &st) == 0;
    reading(f, NULL);
    if (known) {
        end = (uint64_t)st.st_size;
        if (end >= r->size)
            return;  /* it did not shrink: the read failed */
        end_page = end / f->page_size;
    }
    /* Said once per shrink, not once per fault past the end. */
    if (drop_past_end(f, r, end_page))
        event(f, MPU_EV_SHRANK, region, page, 0, end);
}

/* The slots a fault names, if they still hold the client and region it was
 * read for; a fault that outlived either is counted and left. */
static int resolve(struct mpu_filler *f, const struct mpu_fault *fault,
                   struct mpu_client_slot **c, struct mpu_region_slot **r)
{
    if (fault->client >= f->nclients || fault->region >= f->nregions)
        return 0;
    *c = &f->clients[fault->client];
    *r = &f->regions[fault->region];
    if ((*c)->uffd < 0 || (*c)->gen != fault->client_gen) {
        mpu_add64(&f->h->stale_faults, 1);
        return 0;
    }
    if (!(*r)->live || (*r)->gen != fault->region_gen || fault->page >= (*r)->npages) {
        /* The client's own: woken, its thread retries and finds out. */
        mpu_add64(&f->h->stale_faults, 1);
        mpu_uffd_wake((*c)->uffd, fault->address, f->page_size);
        return 0;
    }
    return 1;
}

/* A write to a page that is there, write-protected in that client: it is
 * dirty from now on, and the client may write it until it is written
 * back. */
static void serve_write(struct mpu_filler *f, const struct mpu_fault *fault,
                        struct mpu_client_slot *c, struct mpu_region_slot *r)
{
    uint64_t len = fill_length(f, r, fault->page);
    for (;;) {
        uint32_t count = 0;
        uint64_t ahead = f->read_ahead < f->max_run - 1 ? f->read_ahead : f->max_run - 1;
        int state = mpu_page_open_write(f->h, fault->region, fault->region_gen, fault->page,
                                        f->pid, WAIT_MS, (uint32_t)ahead, f->descs, &count);
        if (state == MPU_PRESENT) {
            /* Lifted while the pages are OPENING, ours: no write-back can
             * take one (and protect it again) in between.  The pages after
             * the fault's were opened for a writer going through the file:
             * one ioctl for them all (up to the end of the mapping). */
            if (count > 1) {
                uint64_t end = (fault->page + count) * f->page_size;
                uint64_t start = fault->page * f->page_size;
                len = (end < r->map_length ? end : r->map_length) - start;
            }
            int err = -mpu_uffd_writeprotect(c->uffd, fault->address, len, 0);
            mpu_page_opened(f->h, f->descs, count, f->pid);
            if (err && !gone(err)) {
                event(f, MPU_EV_WAKE_FAILED, fault->region, fault->page, err, 0);
                wake(f, c->uffd, fault->region, fault->page, fault->address, len);
            }
            if (!err)
                mpu_account(f->h, fault->client, fault->read_at, 0, MPU_ANSWER_WAKE);
            return;
        }
        if (state == MPU_FREE) {
            /* Evicted meanwhile (written back first): the memfd has a hole
             * there, and woken, the thread faults again on a missing page.
             * Or the memfd holds a page no descriptor stands for (a fill
             * never finished): not to be trusted, and protected for good,
             * it goes, under a claim of ours so that no fill of it is
             * punched. */
            uint32_t entry, flags;
            if (mpu_page_claim(f->h, fault->region, fault->region_gen, fault->page, f->pid,
                               MPU_CLAIM_AHEAD, 0, f->evict_fds, f->nevict, &entry,
                               &flags) == MPU_FREE) {
                mpu_punch(r->memfd, fault->page * f->page_size, f->page_size);
                mpu_page_filled(f->h, entry, 0, 0);
            }
        }
        if (state == MPU_FREE || (state < 0 && state != -EBUSY)) {
            /* (or its region went) */
            wake(f, c->uffd, fault->region, fault->page, fault->address, len);
            return;
        }
        if (state == -EBUSY && stalled(f, r))
            return;  /* written back by a worker caught in the store: the thread
                        waits, as on a hung file's page under write-back, and is
                        woken when the store is tried again */
        beat(f);
        event(f, MPU_EV_STUCK, fault->region, fault->page, 0,
              (uint64_t)(state < 0 ? MPU_PRESENT : state));
    }
}

/* A fault of a region whose store hung a worker: the page if the buffer
 * holds it, else SIGBUS at once (as a soft-mounted NFS file's EIO), never a
 * read, nor a wait for a page that a filler still stuck in that store
 * holds.  Without UFFDIO_POISON the thread is left waiting, as a read of
 * that store would leave it: woken, it would only fault again. */
static void refuse(struct mpu_filler *f, const struct mpu_fault *fault, int uffd, uint64_t len)
{
    /* A page that is there, or a region no longer stalled (tried again, or
     * gone): woken, the thread faults again and finds out. */
    if (mpu_page_state(f->h, fault->region, fault->region_gen, fault->page) == MPU_PRESENT
        || !mpu_region_stalled(f->h, fault->region, fault->region_gen)) {
        wake(f, uffd, fault->region, fault->page, fault->address, len);
        return;
    }
    mpu_add64(&f->h->fill_errors, 1);
    int err = -mpu_uffd_poison(uffd, fault->address, len, 1);
    if (err == EEXIST)  /* the page came in meanwhile */
        wake(f, uffd, fault->region, fault->page, fault->address, len);
    else if (err && (no_poison(err) || !gone(err)))
        event(f, MPU_EV_NO_POISON, fault->region, fault->page, err, 0);
}

static void serve_one(struct mpu_filler *f, const struct mpu_fault *fault)
{
    struct mpu_client_slot *c;
    struct mpu_region_slot *r;
    if (!resolve(f, fault, &c, &r))
        return;
    if (fault->flags & MPU_FAULT_WP) {
        serve_write(f, fault, c, r);
        return;
    }
    /* A mapping that may write gets what it reads write-protected (the
     * server hears of its first write), what it writes writable and dirty. */
    int writing = (fault->flags & MPU_FAULT_WRITE) && (fault->flags & MPU_FAULT_WRITABLE);
    int wp = (fault->flags & MPU_FAULT_WRITABLE) && !writing;
    int uffd = c->uffd;
    uint64_t page = fault->page, address = fault->address;
    uint64_t len = fill_length(f, r, page);
    uint32_t entry, flags = 0;
    mpu_add64(&f->h->queue_ns, (int64_t)(mpu_now_ns() - fault->read_at));

    for (;;) {
        /* Asked again after every wait: the page we wait for may be one
         * that a filler caught in the store holds, and never fills. */
        if (stalled(f, r)) {
            refuse(f, fault, uffd, len);
            return;
        }
        int state = mpu_page_claim(f->h, fault->region, fault->region_gen, page, f->pid,
                                   MPU_CLAIM_FAULT, WAIT_MS, f->evict_fds, f->nevict,
                                   &entry, &flags);
        if (state == -EAGAIN) {
            beat(f);
            event(f, MPU_EV_NO_ROOM, fault->region, page, 0, WAIT_MS);
            continue;
        }
        if (state < 0) {
            /* The region went (or, against every count, no descriptor was
             * left): woken, the client's thread retries and finds out. */
            mpu_add64(&f->h->stale_faults, 1);
            wake(f, uffd, fault->region, page, address, len);
            return;
        }
        if (state == MPU_PRESENT) {
            if (flags & MPU_READ_AHEAD)
                mpu_add64(&f->h->readahead_hits, 1);
            if (wake(f, uffd, fault->region, page, address, len))
                mpu_account(f->h, fault->client, fault->read_at, 0, MPU_ANSWER_WAKE);
            return;
        }
        if (state == MPU_FREE && !stalled(f, r)) {
            /* Asked once the page is ours.  A seal not seen yet came after
             * the claim: the write-back that follows it waits for this
             * page's fill (wait_fills in pbm.c).  One seen may have that
             * write-back past this page already: it must not become dirty. */
            if (writing && mpu_region_sealed(f->h, fault->region, fault->region_gen))
                writing = 0, wp = 1;
            break;
        }
        if (state == MPU_FREE) {
            mpu_page_filled(f->h, entry, 0, 0);  /* its store hung meanwhile */
            refuse(f, fault, uffd, len);
            return;
        }
        beat(f);
        event(f, MPU_EV_STUCK, fault->region, page, 0, (uint64_t)state);
    }

    /* One read from `first`: the free pages of the fault's region page
     * before it (a region page larger than the server's), the fault's, and
     * those after it (the rest of that region page, a scan's window). */
    int full;
    uint64_t behind = claim_behind(f, r, page, fault->behind, f->descs);
    uint64_t first = page - behind;
    uint32_t *ahead_descs = f->descs + behind + 1;
    uint64_t room = f->max_run - behind - 1;
    uint64_t ahead = claim_run(f, r, page + 1, fault->ahead < room ? fault->ahead : room,
                               MPU_CLAIM_AHEAD, &full, ahead_descs);
    uint64_t total = behind + 1 + ahead;
    int present = 0;
    int64_t got = read_run(f, r, first, total,
                           !behind && ahead && ahead == f->read_ahead
                           && scan_through_reader(f, r, page * f->page_size,
                                                  (1 + ahead) * f->page_size));
    uint64_t whole = got < 0 ? 0 : whole_pages(f, r, first, total, (uint64_t)got);
    if (whole <= behind) {
        if (got < 0)
            event(f, MPU_EV_STORE_FAILED, fault->region, page, -got, 0);
        abandon(f, f->descs, behind);
        abandon(f, ahead_descs, ahead);
        uint64_t skip = behind * f->page_size;
        uint64_t mine = got > (int64_t)skip ? (uint64_t)got - skip : 0;
        if (behind)
            memmove(f->chunk, f->chunk + skip, f->page_size);  /* past_the_end copies from 0 */
        past_the_end(f, r, fault->region, uffd, page, address, len, mine, wp);
    } else {
        /* The pages around go in first: woken, the client goes on to them. */
        write_run(f, r, fault->region, first, behind, 0, 0, f->descs);
        uint64_t after = whole - behind - 1;
        uint64_t written = write_run(f, r, fault->region, page + 1, after, behind + 1,
                                     MPU_READ_AHEAD, ahead_descs);
        mpu_add64(&f->h->readahead_fills, (int64_t)written);
        abandon(f, ahead_descs + after, ahead - after);
        present = copy(f, r, fault->region, uffd, page, address, len,
                       behind * f->page_size, wp) == 0;
        if (present)
            mpu_account(f->h, fault->client, fault->read_at, len, MPU_ANSWER_COPY);
    }
    mpu_page_filled(f->h, entry, present, writing ? MPU_FILL_DIRTY : 0);
}

/* Serves the faults of a W_FAULTS packet of n bytes (its header first). */
static void serve_packet(struct mpu_filler *f, const char *packet, size_t n)
{
    struct mpu_w_faults head;
    memcpy(&head, packet, sizeof head);
    uint32_t count = (uint32_t)((n - sizeof head) / sizeof(struct mpu_fault));
    if (head.count < count)
        count = head.count;
    const struct mpu_fault *faults = (const struct mpu_fault *)(packet + sizeof head);
    f->serving = 1;
    for (uint32_t i = 0; i < count; i++) {
        if (f->worker < MPU_WORKER_SLOTS)
            mpu_add64(&f->h->taken[f->worker], 1);
        serve_one(f, &faults[i]);
        beat(f);
    }
    f->serving = 0;
}

struct recvmsg_args {
    int sock;
    struct msghdr *msg;
    size_t controllen;
    ssize_t n;
};

static int poll_socket(void *arg)
{
    struct recvmsg_args *a = arg;
    a->msg->msg_controllen = a->controllen;
    a->n = recvmsg(a->sock, a->msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    return a->n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
}

/* Work that waited for the disk gains little from a spin, and a busy CPU
 * slows a virtual disk down: after work that took longer than a spin, the
 * next wait sleeps at once. */
static void sleep_after_long_work(struct mpu_filler *f, uint64_t started)
{
    if (mpu_now_ns() - started > f->spinner.spin_ns && !f->spinner.skip)
        f->spinner.skip = 1;
}

int mpu_filler_run(struct mpu_filler *f, int sock, char *buf, int size,
                   int *fds, int *nfds, int maxfds)
{
    char control[CMSG_SPACE(sizeof(int) * 16)];
    if (maxfds > 16)
        maxfds = 16;
    make_splice_pipe(f);
    for (;;) {
        beat(f);
        drop_scan_leftovers(f);
        struct iovec iov = { .iov_base = buf, .iov_len = (size_t)size };
        struct msghdr msg = {
            .msg_iov = &iov, .msg_iovlen = 1,
            .msg_control = control, .msg_controllen = CMSG_SPACE(sizeof(int) * maxfds),
        };
        struct recvmsg_args polled = { sock, &msg, msg.msg_controllen, 0 };
        ssize_t n = spin(&f->spinner, poll_socket, &polled) ? polled.n
                                                         : recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                continue;  /* (the receive timeout: a heartbeat while idle) */
            return -errno;
        }
        *nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < count; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                if (*nfds < maxfds)
                    fds[(*nfds)++] = fd;
                else
                    close(fd);
            }
        }
        if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
            for (int i = 0; i < *nfds; i++)
                close(fds[i]);
            *nfds = 0;
            return -EMSGSIZE;
        }
        if (n == 0)
            return -EPIPE;
        struct mpu_w_faults head;
        if (*nfds || (size_t)n < sizeof head)
            return (int)n;
        memcpy(&head, buf, sizeof head);
        if (head.kind != MPU_W_FAULTS)
            return (int)n;
        uint64_t started = mpu_now_ns();
        serve_packet(f, buf, (size_t)n);
        sleep_after_long_work(f, started);
        if (f->nevents || f->lost)
            return 0;
    }
}

/* Between the runs of a long fill, the faults that wait on the socket are
 * served first: a prefetch must not keep a client waiting for more than a
 * run.  Returns 1 when another message waits at the head of the queue: the
 * fill stops there, for the caller to take it, in order, and go on. */
static int serve_waiting_faults(struct mpu_filler *f)
{
    char buf[sizeof(struct mpu_w_faults) + MPU_FAULTS_MAX * sizeof(struct mpu_fault)];
    for (;;) {
        struct mpu_w_faults head;
        ssize_t n = recv(f->sock, &head, sizeof head, MSG_PEEK | MSG_DONTWAIT);
        if (n < 0)
            return 0;   /* nothing waits (or the caller's loop finds out) */
        if (n < (ssize_t)sizeof head || head.kind != MPU_W_FAULTS)
            return 1;
        n = recv(f->sock, buf, sizeof buf, MSG_DONTWAIT);
        if (n < (ssize_t)sizeof head)
            return 0;
        serve_packet(f, buf, (size_t)n);
    }
}

/* How long a scan's window waits for the evictors to make room. */
#define SCAN_ROOM_MS 100

/* Fills the FREE pages of [first, first + count) that the buffer has room
 * for, in runs; stops when the buffer is full.  `kind` says who asked: a
 * client (MPU_W_PREFETCH), or the monitor, for a scan (MPU_W_READ_AHEAD:
 * room up to the limit) or around a fault (MPU_W_READ_AROUND: room below
 * the high watermark, as a prefetch); what the monitor asked for is marked
 * as read ahead.  Each kind has its counter. */
static void fill_span(struct mpu_filler *f, uint32_t region, uint64_t first, uint64_t count,
                      uint32_t kind)
{
    struct mpu_region_slot *r = &f->regions[region];
    uint32_t flags = kind == MPU_W_PREFETCH ? 0 : MPU_READ_AHEAD;
    /* A backward scan is a scan, but for the scan reader: the kernel's
     * read-ahead goes forward, over what the scan read already. */
    int scanning = kind == MPU_W_READ_AHEAD || kind == MPU_W_READ_BEHIND;
    int how = scanning ? MPU_CLAIM_AHEAD : MPU_CLAIM_PREFETCH;
    uint64_t *counter = scanning ? &f->h->readahead_fills
                        : kind == MPU_W_READ_AROUND ? &f->h->readaround_fills
                        : &f->h->prefetch_fills;
    uint64_t page = first, end = first + count < r->npages ? first + count : r->npages;
    while (page < end && !stalled(f, r)) {
        int full;
        uint64_t want = end - page < f->max_run ? end - page : f->max_run;
        uint64_t run = claim_run(f, r, page, want, how, &full, f->descs);
        if (full && scanning
            && mpu_pbm_wait_room(f->h, SCAN_ROOM_MS, f->evict_fds, f->nevict) == 0)
            continue;  /* the scan needs these pages: wait for the evictors */
        if (full)
            break;  /* more would only push out what is there */
        if (!run) {
            page++;  /* there already, or on its way */
            continue;
        }
        int scan = kind == MPU_W_READ_AHEAD && run == f->read_ahead + 1
                   && scan_through_reader(f, r, page * f->page_size, run * f->page_size);
        /* Splicing copies once where reading and copying in copy twice,
         * but it writes the memfd: under its inode lock, it waits for the
         * evictors' punches and makes them wait (a scan through a buffer
         * smaller than its file went 15-20% faster by reading). */
        int64_t got = scan && !r->fill_map ? splice_run(f, r, page, run) : -1;
        uint64_t whole, written;
        if (got >= 0) {  /* in the memfd already */
            whole = whole_pages(f, r, page, run, (uint64_t)got);
            if (whole < run && got > (int64_t)(whole * f->page_size))
                mpu_punch(r->memfd, (page + whole) * f->page_size, (run - whole) * f->page_size);
            for (uint64_t k = 0; k < whole; k++)
                mpu_page_filled(f->h, f->descs[k], 1, flags);
            written = whole;
        } else {
            got = read_run(f, r, page, run, scan);
            whole = got < 0 ? 0 : whole_pages(f, r, page, run, (uint64_t)got);
            written = write_run(f, r, region, page, whole, 0, flags, f->descs);
        }
        mpu_add64(counter, (int64_t)written);
        abandon(f, f->descs + whole, run - whole);
        page += run;
    }
}

int mpu_filler_fill(struct mpu_filler *f, struct mpu_w_fill *fill)
{
    if (fill->region >= f->nregions || !f->regions[fill->region].live
        || f->regions[fill->region].gen != fill->gen || stalled(f, &f->regions[fill->region]))
        return 0;
    uint64_t started = mpu_now_ns();
    int interrupted = 0;
    if (!fill->run) {
        fill_span(f, fill->region, fill->first, fill->count, fill->kind);
        fill->count = 0;
    }
    /* Our runs of the span, each to the filler of its number; fill->first
     * and count move on with us, so that an interrupted fill goes on from
     * where it stopped. */
    while (fill->count && !interrupted) {
        uint64_t n = fill->count < fill->run ? fill->count : fill->run;
        if (mpu_filler_for(fill->region, fill->first / fill->run, f->nfillers) == f->index) {
            fill_span(f, fill->region, fill->first, n, fill->kind);
            beat(f);
            interrupted = serve_waiting_faults(f);
        }
        fill->first += n;
        fill->count -= n;
    }
    sleep_after_long_work(f, started);
    return fill->count != 0;
}
