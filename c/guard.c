/* See guard.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>

#include "guard.h"
#include "mpu_sys.h"
#include "mpumap_core_internal.h"

struct range {
    uint64_t addr;
    uint64_t len;
    int fd;
    int memfd;              /* a range that may write: its buffer (-1: read-only) */
};

/* How long the guard of a range that may write waits, its own writers
 * stopped, before it copies the buffer to the file: every client's guard
 * hears of the loss at once, and each must have stopped its writers before
 * the first copy, or a write could land in the buffer after it. */
#define GRACE_MS 200
#define COPY_CHUNK (1u << 20)

struct mpu_guard {
    struct mpu_guard *next; /* in the registry of live guards */
    int sock;
    int server;             /* a pidfd of the server's process (-1: none) */
    int uffd;
    int stopfd;             /* eventfd: written by mpu_guard_stop */
    pthread_t thread;
    pthread_mutex_t lock;   /* the ranges, and the fallback */
    struct range *ranges;
    size_t count;
    size_t cap;
    int fell_back;          /* atomic */
};

/* ---- fork ---------------------------------------------------------------
 *
 * A forked child has none of the guarded ranges (they are MADV_DONTFORK),
 * but the client's objects there still name their addresses: a close or a
 * garbage collector in the child would munmap them, by then perhaps the
 * child's own memory.  So in the child every guarded range gets a PROT_NONE
 * placeholder at once, before anything else can take the addresses: a
 * later munmap there removes only that, and a touch is a SIGSEGV, never a
 * zero read as data.  The registry of live guards and their locks are held
 * across the fork, so that the child finds every range list whole. */

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct mpu_guard *registry;

static void before_fork(void)
{
    pthread_mutex_lock(&registry_lock);
    for (struct mpu_guard *g = registry; g; g = g->next)
        pthread_mutex_lock(&g->lock);
}

static void after_fork_parent(void)
{
    for (struct mpu_guard *g = registry; g; g = g->next)
        pthread_mutex_unlock(&g->lock);
    pthread_mutex_unlock(&registry_lock);
}

static void after_fork_child(void)
{
    for (struct mpu_guard *g = registry; g; g = g->next) {
        for (size_t i = 0; i < g->count; i++)
            mpu_sys_mmap((void *)(uintptr_t)g->ranges[i].addr, g->ranges[i].len, PROT_NONE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE,
                         -1, 0);
        pthread_mutex_unlock(&g->lock);
    }
    pthread_mutex_unlock(&registry_lock);
}

__attribute__((constructor)) static void setup_fork(void)
{
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

static void enlist(struct mpu_guard *g)
{
    pthread_mutex_lock(&registry_lock);
    g->next = registry;
    registry = g;
    pthread_mutex_unlock(&registry_lock);
}

static void delist(struct mpu_guard *g)
{
    pthread_mutex_lock(&registry_lock);
    for (struct mpu_guard **pp = &registry; *pp; pp = &(*pp)->next) {
        if (*pp == g) {
            *pp = g->next;
            break;
        }
    }
    pthread_mutex_unlock(&registry_lock);
}

/* ---- the guard ------------------------------------------------------------ */

/* Replaces one range with the file, in place; a range that cannot be mapped
 * from the file becomes inaccessible (a fault there is a SIGSEGV: a clear
 * error, never a hang and never a zero read as data). */
static int replace(struct mpu_guard *g, const struct range *r)
{
    void *want = (void *)(uintptr_t)r->addr;
    int ok = 1;
    int prot = PROT_READ | (r->memfd >= 0 ? PROT_WRITE : 0);
    void *p = r->fd < 0 ? MAP_FAILED
                        : mpu_sys_mmap(want, r->len, prot, MAP_SHARED | MAP_FIXED, r->fd, 0);
    if (p != want) {
        ok = 0;
        mpu_sys_mmap(want, r->len, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                     -1, 0);
    }
    madvise(want, r->len, MADV_DONTFORK);
    /* The new mapping is not registered: woken, every thread that waits on
     * a fault in the range retries it and finds the file. */
    mpu_uffd_wake(g->uffd, r->addr, r->len);
    return ok;
}

/* Takes (how F_WRLCK) or gives back (F_UNLCK) the region's lock: a
 * process's lock (fcntl), not flock's, whose locks belong to open file
 * descriptions, and every client holds the same one of the memfd. */
static void buffer_lock(int memfd, short how)
{
    struct flock l = { .l_type = how, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0 };
    while (fcntl(memfd, F_SETLKW, &l) < 0 && errno == EINTR)
        ;
}

/* The server's process, as a pidfd: the one the server sent (a dup of it),
 * if it is one; else one opened for the peer of the connection, which
 * is alive while the connection is.  -1 where neither can be had: no
 * pidfds in the kernel, or a server that sent none and whose pid is not
 * in our namespace (SO_PEERCRED says 0 there). */
static int server_pidfd(int sock, int sent)
{
    if (sent >= 0 && mpu_fd_is(sent, "anon_inode:[pidfd]") == 1)
        return fcntl(sent, F_DUPFD_CLOEXEC, 0);
    struct ucred peer;
    socklen_t len = sizeof peer;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &peer, &len) < 0 || peer.pid <= 0)
        return -1;
    return (int)syscall(SYS_pidfd_open, peer.pid, 0);
}

/* Whether the server's process is gone (a pidfd polls readable once it
 * has exited), as against a server that closed our connection and goes
 * on serving the others.  A server that stops closes its connections
 * just before it exits: it is waited for up to EXIT_MS.  Without a pidfd
 * it is taken for gone. */
#define EXIT_MS 2000
static int server_gone(const struct mpu_guard *g)
{
    if (g->server < 0)
        return 1;
    struct pollfd p = { .fd = g->server, .events = POLLIN };
    struct timespec now, end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += EXIT_MS / 1000;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long left = (end.tv_sec - now.tv_sec) * 1000 + (end.tv_nsec - now.tv_nsec) / 1000000;
        int n = poll(&p, 1, left > 0 ? (int)left : 0);
        if (n >= 0 || errno != EINTR)
            return n != 0;
    }
}

/* Every page the buffer holds, to the file (up to the file's end); then
 * the file synced.  With `punch` (the server is gone), each page is
 * punched out of the buffer once copied.  0, or -errno of the first
 * failure (what follows is still tried). */
static int write_back(const struct range *r, int punch)
{
    struct stat st;
    if (fstat(r->fd, &st) < 0)
        return -errno;
    uint64_t end = (uint64_t)st.st_size < r->len ? (uint64_t)st.st_size : r->len;
    char *chunk = malloc(COPY_CHUNK);
    if (!chunk)
        return -ENOMEM;
    int err = 0;
    for (uint64_t at = 0; at < end;) {
        off_t data = lseek(r->memfd, (off_t)at, SEEK_DATA);
        if (data < 0 || (uint64_t)data >= end)
            break;
        off_t hole = lseek(r->memfd, data, SEEK_HOLE);
        uint64_t stop = hole < 0 || (uint64_t)hole > end ? end : (uint64_t)hole;
        int e = mpu_copy_range(r->memfd, r->fd, (uint64_t)data, stop - (uint64_t)data, chunk,
                               COPY_CHUNK);
        /* Copied: out of the buffer, so that no guard after us writes it
         * again over what the file has been given since.  But a server
         * that dropped us lives on, its descriptors saying these pages
         * are there: punched out, its clients would fault on them for
         * ever.  It writes them back itself. */
        if (e)
            err = err ? err : e;
        else if (!err && punch)
            mpu_punch(r->memfd, (uint64_t)data, stop - (uint64_t)data);
        at = stop;
    }
    free(chunk);
    if (fdatasync(r->fd) < 0 && !err)
        err = -errno;
    return err;
}

static void fall_back(struct mpu_guard *g)
{
    size_t count, failed = 0, unwritten = 0, writers = 0;
    pthread_mutex_lock(&g->lock);
    /* Set first: a woken thread may ask at once, and mpu_guard_fell_back
     * takes the lock, so it answers 1 only once every range is replaced. */
    __atomic_store_n(&g->fell_back, 1, __ATOMIC_SEQ_CST);
    for (size_t i = 0; i < g->count; i++)
        if (g->ranges[i].memfd >= 0) {
            /* Our writers wait from here on (a write-protect fault nobody
             * answers until the range is the file's). */
            mpu_uffd_writeprotect(g->uffd, g->ranges[i].addr, g->ranges[i].len, 1);
            writers++;
        }
    if (writers) {
        struct timespec grace = { 0, GRACE_MS * 1000000L };
        while (nanosleep(&grace, &grace) < 0 && errno == EINTR)
            ;
    }
    int gone = server_gone(g);
    for (size_t i = 0; i < g->count; i++) {
        const struct range *r = &g->ranges[i];
        if (r->memfd >= 0) {
            buffer_lock(r->memfd, F_WRLCK);
            if (write_back(r, gone) < 0)
                unwritten++;
        }
        if (!replace(g, r))
            failed++;
        if (r->memfd >= 0)
            buffer_lock(r->memfd, F_UNLCK);
    }
    count = g->count;
    pthread_mutex_unlock(&g->lock);
    if (unwritten)
        fprintf(stderr, "mpumap: lost the server; what %zu mapping(s) wrote could not all "
                "be written to their files\n", unwritten);
    if (failed)
        fprintf(stderr, "mpumap: lost the server; %zu mapping(s) now use their "
                "file directly, %zu could not be mapped from the file and are "
                "inaccessible\n", count - failed, failed);
    else
        fprintf(stderr, "mpumap: lost the server; %zu mapping(s) now use their "
                "file directly\n", count);
}

static void *watch(void *arg)
{
    struct mpu_guard *g = arg;
    for (;;) {
        /* Not POLLIN: replies arrive on that socket and the client reads
         * them.  POLLHUP and POLLERR are always reported. */
        struct pollfd p[2] = {
            { .fd = g->stopfd, .events = POLLIN },
            { .fd = g->sock, .events = POLLRDHUP },
        };
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ENOMEM)
                continue;
            return NULL;
        }
        if (p[0].revents)
            return NULL;
        if (p[1].revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL)) {
            fall_back(g);
            return NULL;
        }
    }
}

struct mpu_guard *mpu_guard_start(int server_sock, int uffd, int server)
{
    struct mpu_guard *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->sock = server_sock;
    g->uffd = uffd;
    g->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (g->stopfd < 0) {
        int err = errno;
        free(g);
        errno = err;
        return NULL;
    }
    g->server = server_pidfd(server_sock, server);
    pthread_mutex_init(&g->lock, NULL);

    /* The thread takes no signals: they are the program's. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    int err = pthread_create(&g->thread, &attr, watch, g);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        close(g->stopfd);
        if (g->server >= 0)
            close(g->server);
        pthread_mutex_destroy(&g->lock);
        free(g);
        errno = err;
        return NULL;
    }
    enlist(g);
    return g;
}

int mpu_guard_add(struct mpu_guard *g, uint64_t addr, uint64_t len, int file_fd)
{
    return mpu_guard_add_writable(g, addr, len, file_fd, -1);
}

int mpu_guard_add_writable(struct mpu_guard *g, uint64_t addr, uint64_t len, int file_fd,
                           int memfd)
{
    if (!g || len == 0 || (memfd >= 0 && file_fd < 0))
        return -EINVAL;
    int fd = file_fd < 0 ? -1 : fcntl(file_fd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0 && file_fd >= 0)
        return -errno;
    int mfd = memfd < 0 ? -1 : fcntl(memfd, F_DUPFD_CLOEXEC, 3);
    if (mfd < 0 && memfd >= 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    int err = 0;
    pthread_mutex_lock(&g->lock);
    if (__atomic_load_n(&g->fell_back, __ATOMIC_SEQ_CST)) {
        err = -ENOTCONN;
    } else if (g->count == g->cap) {
        size_t cap = g->cap ? 2 * g->cap : 8;
        struct range *r = realloc(g->ranges, cap * sizeof *r);
        if (!r) {
            err = -ENOMEM;
        } else {
            g->ranges = r;
            g->cap = cap;
        }
    }
    if (!err)
        g->ranges[g->count++] = (struct range){ .addr = addr, .len = len, .fd = fd,
                                                .memfd = mfd };
    pthread_mutex_unlock(&g->lock);
    if (err && fd >= 0)
        close(fd);
    if (err && mfd >= 0)
        close(mfd);
    return err;
}

int mpu_guard_remove(struct mpu_guard *g, uint64_t addr)
{
    if (!g)
        return -EINVAL;
    int fd = -1, mfd = -1, found = 0;
    pthread_mutex_lock(&g->lock);
    for (size_t i = 0; i < g->count; i++) {
        if (g->ranges[i].addr == addr) {
            fd = g->ranges[i].fd;
            mfd = g->ranges[i].memfd;
            g->ranges[i] = g->ranges[--g->count];
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&g->lock);
    if (!found)
        return -ENOENT;
    if (fd >= 0)
        close(fd);
    if (mfd >= 0)
        close(mfd);
    return 0;
}

int mpu_guard_fell_back(struct mpu_guard *g)
{
    if (!g)
        return 0;
    pthread_mutex_lock(&g->lock);
    int lost = __atomic_load_n(&g->fell_back, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&g->lock);
    return lost;
}

static void release(struct mpu_guard *g)
{
    for (size_t i = 0; i < g->count; i++) {
        if (g->ranges[i].fd >= 0)
            close(g->ranges[i].fd);
        if (g->ranges[i].memfd >= 0)
            close(g->ranges[i].memfd);
    }
    free(g->ranges);
    close(g->stopfd);
    if (g->server >= 0)
        close(g->server);
    free(g);
}

void mpu_guard_stop(struct mpu_guard *g)
{
    if (!g)
        return;
    uint64_t one = 1;
    delist(g);
    while (write(g->stopfd, &one, sizeof one) < 0 && errno == EINTR)
        ;
    pthread_join(g->thread, NULL);
    pthread_mutex_destroy(&g->lock);
    release(g);
}

void mpu_guard_abandon(struct mpu_guard *g)
{
    if (g) {
        delist(g);
        release(g);
    }
}
