/*
 * libmpumapclient: MP-UMap's client API (umap/umap-client.h) over mpumap's
 * socket protocol (docs/protocol.md), doing what mpumap/client.py does.
 *
 * One connection per process, behind one mutex.  The process keeps its own
 * userfaultfd; a guard thread (guard.c) maps the files themselves over the
 * mappings if the server dies.  Memory is mapped with raw system calls
 * (mpu_sys.h), so that the preload library's mmap() never sees the client's
 * own mappings.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/time.h>
#include <time.h>

#include "umap/umap-client.h"
#include "umap_client_internal.h"
#include "guard.h"
#include "mpu_sys.h"
#include "mpu_wire.h"
#include "mpumap_core.h"

/* The public API is exported; everything else (compiled with
 * -fvisibility=hidden) is not.  The preload library builds this file with
 * MPU_API empty, so that it exports nothing but mmap and munmap. */
#ifndef MPU_API
#define MPU_API __attribute__((visibility("default")))
#endif

#define HEADER_SIZE MPU_HEADER_SIZE
#define MAX_REPLY 8192          /* every reply this client asks for fits */
#define WHY 512
#define DEFAULT_TIMEOUT ((double)MPU_REQUEST_SECONDS)
#define FLUSH_TIMEOUT ((double)MPU_FLUSH_SECONDS)

static const char *msg_name(int kind)
{
    static const char *const names[] = {
        [MPU_MSG_HELLO] = "HELLO", [MPU_MSG_WELCOME] = "WELCOME",
        [MPU_MSG_MAP] = "MAP", [MPU_MSG_MAPPED] = "MAPPED",
        [MPU_MSG_REGISTER] = "REGISTER", [MPU_MSG_REGISTERED] = "REGISTERED",
        [MPU_MSG_UNMAP] = "UNMAP", [MPU_MSG_UNMAPPED] = "UNMAPPED",
        [MPU_MSG_STATS] = "STATS", [MPU_MSG_STATS_REPLY] = "STATS_REPLY",
        [MPU_MSG_PREFETCH] = "PREFETCH", [MPU_MSG_PREFETCHING] = "PREFETCHING",
        [MPU_MSG_ERROR] = "ERROR", [MPU_MSG_MAP_URL] = "MAP_URL",
    };
    int known = kind > 0 && kind < (int)(sizeof names / sizeof names[0]) && names[kind];
    return known ? names[kind] : "?";
}

struct mapping {
    struct mapping *next;
    char *name;
    uint64_t id;
    uintptr_t addr;
    uint64_t length;
    int fd;         /* the file: to turn the mapping into a plain one */
    int served;     /* 0 once it is a plain mapping of the file */
    int writable;   /* PROT_WRITE: its writes are the server's to write back */
};

static struct {
    pthread_mutex_t lock;
    int sock;
    int uffd;
    struct mpu_guard *guard;
    struct mapping *maps;
    size_t count;       /* atomic: mappings in maps */
    int quiet;
    double timeout;     /* seconds a request may wait */
    int unfit;          /* a request timed out: its reply may come late, and
                           would be taken for the next one's */
    /* WELCOME */
    uint64_t page_size, buffer_pages;
    uint32_t fillers, evictors, high_water, low_water, adaptive, max_events;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
} C = { .lock = PTHREAD_MUTEX_INITIALIZER, .sock = -1, .uffd = -1 };

/* ---- messages on stderr ------------------------------------------------ */

void mpu_write_line(const char *prefix, const char *fmt, va_list ap)
{
    int saved = errno;
    char line[2048];
    int n = snprintf(line, sizeof line, "%s: ", prefix);
    vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    size_t len = strlen(line);
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
    errno = saved;
}

static void say(const char *fmt, ...)
{
    if (C.quiet)
        return;
    va_list ap;
    va_start(ap, fmt);
    mpu_write_line("mpumap-client", fmt, ap);
    va_end(ap);
}

static void why_errno(char *why, const char *what)
{
    snprintf(why, WHY, "%s: %s", what, strerror(errno));
}

/* ---- framing ----------------------------------------------------------- */

static int send_msg(int kind, const void *payload, size_t len, int fd)
{
    unsigned char head[HEADER_SIZE];
    uint16_t version = htole16(MPU_PROTOCOL_VERSION), type = htole16((uint16_t)kind);
    uint32_t length = htole32((uint32_t)len);
    memcpy(head, "MPUM", 4);
    memcpy(head + 4, &version, 2);
    memcpy(head + 6, &type, 2);
    memcpy(head + 8, &length, 4);

    /* The payload from where it is: a URL is up to MPU_MAX_URL bytes. */
    struct iovec iov[2] = { { .iov_base = head, .iov_len = HEADER_SIZE },
                            { .iov_base = (void *)payload, .iov_len = len } };
    struct msghdr mh = { .msg_iov = iov, .msg_iovlen = len ? 2 : 1 };
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    if (fd >= 0) {
        memset(&ctl, 0, sizeof ctl);
        mh.msg_control = ctl.buf;
        mh.msg_controllen = sizeof ctl.buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    }
    ssize_t n;
    do
        n = sendmsg(C.sock, &mh, MSG_NOSIGNAL);   /* a dead server: EPIPE, not SIGPIPE */
    while (n < 0 && errno == EINTR);
    return n < 0 ? -1 : 0;
}

static void close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

/* Sends a request and reads its one reply, which must be of type expect with
 * exactly size payload bytes (copied to out) and nfd descriptors (the one
 * kept in *fd_out).  -1 with errno set and *why filled on failure; an ERROR
 * reply sets errno to the server's. */
static int timed_out(char *why, const char *what)
{
    C.unfit = 1;
    errno = ETIMEDOUT;
    snprintf(why, WHY, "the server at %s %s within %g s ($MPUMAP_TIMEOUT)", C.path, what,
             C.timeout);
    return -1;
}

static int release(uint64_t id, int writable);

static int call(int kind, const void *payload, size_t len, int fd_send,
                int expect, void *out, size_t size, int *fd_out, char *why)
{
    if (C.unfit) {
        errno = ENOTCONN;
        snprintf(why, WHY, "a request timed out before: this connection takes no more "
                 "(close_umap_client, then init_umap_client)");
        return -1;
    }
    if (send_msg(kind, payload, len, fd_send) < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return timed_out(why, "took no request");
        snprintf(why, WHY, "lost the server at %s: %s", C.path, strerror(errno));
        return -1;
    }
    unsigned char buf[HEADER_SIZE + MAX_REPLY];
    union {
        char buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = { .iov_base = buf, .iov_len = sizeof buf };
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf,
    };
    ssize_t n;
    do
        n = recvmsg(C.sock, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return timed_out(why, "did not answer");
    if (n < 0) {
        snprintf(why, WHY, "lost the server at %s: %s", C.path, strerror(errno));
        return -1;
    }
    int fds[8], nfds = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count && nfds < 8; i++)
            memcpy(&fds[nfds++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
    }
    if (n == 0) {
        close_fds(fds, nfds);
        errno = ECONNRESET;
        snprintf(why, WHY, "the server at %s closed the connection", C.path);
        return -1;
    }
    uint16_t version, type;
    uint32_t length;
    if (mh.msg_flags & MSG_TRUNC || n < HEADER_SIZE || memcmp(buf, "MPUM", 4) != 0) {
        close_fds(fds, nfds);
        errno = EPROTO;
        snprintf(why, WHY, "bad reply from the server (not an mpumap message)");
        return -1;
    }
    memcpy(&version, buf + 4, 2);
    memcpy(&type, buf + 6, 2);
    memcpy(&length, buf + 8, 4);
    version = le16toh(version);
    type = le16toh(type);
    length = le32toh(length);
    if (version != MPU_PROTOCOL_VERSION || length != (size_t)n - HEADER_SIZE) {
        close_fds(fds, nfds);
        errno = EPROTO;
        snprintf(why, WHY, "bad reply from the server (version %u, %u payload bytes)",
                 version, length);
        return -1;
    }
    if (type == MPU_MSG_ERROR) {
        close_fds(fds, nfds);
        int32_t code = 0;
        if (length >= 4) {
            memcpy(&code, buf + HEADER_SIZE, 4);
            code = (int32_t)le32toh((uint32_t)code);
        }
        int text = length > 4 ? (int)(length - 4) : 0;
        snprintf(why, WHY, "the server refused: %.*s", text, (char *)buf + HEADER_SIZE + 4);
        errno = code > 0 ? code : EIO;
        return -1;
    }
    if (mh.msg_flags & MSG_CTRUNC && type == MPU_MSG_MAPPED
        && length == sizeof(struct mpu_mapped)) {
        /* The region's memfd found no descriptor free here (RLIMIT_NOFILE);
         * the server holds the mapping all the same: give it back. */
        struct mpu_mapped mapped;
        memcpy(&mapped, buf + HEADER_SIZE, sizeof mapped);
        close_fds(fds, nfds);
        release(le64toh(mapped.mapping_id), 0);
        errno = EMFILE;
        snprintf(why, WHY, "the server's descriptor found no room here: %s",
                 strerror(EMFILE));
        return -1;
    }
    int want_fds = fd_out ? 1 : 0;
    if (mh.msg_flags & MSG_CTRUNC || type != expect || length != size || nfds != want_fds) {
        close_fds(fds, nfds);
        errno = EPROTO;
        snprintf(why, WHY, "bad reply from the server: %s with %u bytes and %d "
                 "descriptors to %s", msg_name(type), length, nfds, msg_name(kind));
        return -1;
    }
    memcpy(out, buf + HEADER_SIZE, size);
    if (fd_out)
        *fd_out = fds[0];
    return 0;
}

/* ---- the connection ---------------------------------------------------- */

static int connected(void)
{
    return C.sock >= 0;
}

static int server_lost(void)
{
    return mpu_guard_fell_back(C.guard);
}

/* After a request failed: whether that was the server going, with the
 * guard falling back (it sees the hang-up within milliseconds; waited for
 * up to a second). */
static int lost_meanwhile(void)
{
    int err = errno;
    if (C.unfit || (err != EPIPE && err != ECONNRESET && err != ENOTCONN))
        return 0;
    for (int i = 0; i < 100 && !server_lost(); i++) {
        struct timespec ms10 = { 0, 10 * 1000000L };
        nanosleep(&ms10, NULL);
    }
    errno = err;
    return server_lost();
}

/* What a connection holds, closed; mappings stay (they are plain ones now,
 * or the caller unmapped them). */
static void close_descriptors(void)
{
    if (C.sock >= 0)
        close(C.sock);
    if (C.uffd >= 0)
        close(C.uffd);
    C.sock = C.uffd = -1;
}

static void disconnect(void)
{
    mpu_guard_stop(C.guard);
    C.guard = NULL;
    close_descriptors();
    for (struct mapping *m = C.maps; m; m = m->next)
        m->served = 0;
}

/* Seconds a request may wait for the server: $MPUMAP_TIMEOUT, else 10.
 * Page faults are not requests: they wait. */
static double request_timeout(void)
{
    const char *text = getenv("MPUMAP_TIMEOUT");
    if (!text || !*text)
        return DEFAULT_TIMEOUT;
    char *end;
    double seconds = strtod(text, &end);
    if (*end || !(seconds > 0)) {
        say("MPUMAP_TIMEOUT=%s is not a positive number of seconds: %g s it is", text,
            DEFAULT_TIMEOUT);
        return DEFAULT_TIMEOUT;
    }
    return seconds;
}

/* A connection to the server within the timeout: a full accept queue makes
 * connect() wait, or fail with EAGAIN when it must not, so it is tried
 * again until the deadline.  Sends and receives on it then give up after
 * the timeout too (SO_SNDTIMEO, SO_RCVTIMEO). */
static int open_socket(const struct sockaddr_un *sa, char *why)
{
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (sock < 0) {
        why_errno(why, "socket");
        return -1;
    }
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        if (connect(sock, (const struct sockaddr *)sa, sizeof *sa) == 0)
            break;
        int err = errno;
        if (err == EINTR)
            continue;
        clock_gettime(CLOCK_MONOTONIC, &now);
        double waited = (double)(now.tv_sec - start.tv_sec)
                        + (double)(now.tv_nsec - start.tv_nsec) / 1e9;
        if (err == EAGAIN && waited < C.timeout) {
            struct timespec pause = { 0, 10 * 1000 * 1000 };
            nanosleep(&pause, NULL);
            continue;
        }
        close(sock);
        if (err == EAGAIN) {
            errno = ETIMEDOUT;
            snprintf(why, WHY, "the mpumap server at %s accepts no connection (waited %g s, "
                     "$MPUMAP_TIMEOUT)", C.path, C.timeout);
        } else {
            errno = err;
            snprintf(why, WHY, "no mpumap server at %s: %s", C.path, strerror(err));
        }
        return -1;
    }
    struct timeval tv = { .tv_sec = (time_t)C.timeout,
                          .tv_usec = (suseconds_t)((C.timeout - (double)(time_t)C.timeout) * 1e6) };
    int flags = fcntl(sock, F_GETFL);
    if (flags < 0 || fcntl(sock, F_SETFL, flags & ~O_NONBLOCK) < 0
        || setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0
        || setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0) {
        why_errno(why, "setting the socket's timeouts");
        int err = errno;
        close(sock);
        errno = err;
        return -1;
    }
    return sock;
}

/* Whether the server's user may have this process's memory: HELLO hands
 * it our userfaultfd, with which it writes into us, and each MAP a
 * descriptor of ours; anyone may bind a socket in /tmp while the real
 * server is down.  Root, our own user, and the user $MPUMAP_SERVER_USER
 * names (a name or a uid) may. */
static int trusted_server(int sock, char *why)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        why_errno(why, "SO_PEERCRED");
        return 0;
    }
    if (cred.uid == 0 || cred.uid == geteuid())
        return 1;
    const char *named = getenv("MPUMAP_SERVER_USER");
    if (named && *named) {
        char *end;
        unsigned long uid = strtoul(named, &end, 10);
        if (*end) {
            struct passwd *pw = getpwnam(named);
            uid = pw ? pw->pw_uid : (unsigned long)-1;
        }
        if (uid == cred.uid)
            return 1;
    }
    errno = EPERM;
    snprintf(why, WHY, "the server at %s runs as uid %u, neither root nor this process's "
             "user: not handing it this process's memory (MPUMAP_SERVER_USER=%u trusts that "
             "user)", C.path, (unsigned)cred.uid, (unsigned)cred.uid);
    return 0;
}

static int connect_locked(const char *sock_path, char *why)
{
    if (connected() && !server_lost())
        return 0;
    if (connected())
        disconnect();   /* the old server is gone: its mappings read their files */

    if (!sock_path || !*sock_path)
        sock_path = getenv("MPUMAP_SOCKET");
    if (!sock_path || !*sock_path)
        sock_path = MPU_DEFAULT_SOCKET;
    if (strlen(sock_path) >= sizeof C.path) {
        errno = ENAMETOOLONG;
        snprintf(why, WHY, "socket path too long: %s", sock_path);
        return -1;
    }
    strcpy(C.path, sock_path);

    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    strcpy(sa.sun_path, C.path);
    C.timeout = request_timeout();
    int sock = open_socket(&sa, why);
    if (sock < 0)
        return -1;
    if (!trusted_server(sock, why)) {
        int err = errno;
        close(sock);
        errno = err;
        return -1;
    }

    /* Our own userfaultfd, kept for as long as any mapping lives. */
    int how;
    int uffd = mpu_uffd_open(O_CLOEXEC | O_NONBLOCK, &how);
    if (uffd < 0) {
        close(sock);
        errno = -uffd;
        why_errno(why, "userfaultfd");
        return -1;
    }
    uint64_t features;
    int err = mpu_uffd_api(uffd, 0, &features);
    if (err < 0) {
        close(uffd);
        close(sock);
        errno = -err;
        why_errno(why, "UFFDIO_API");
        return -1;
    }

    C.sock = sock;
    C.uffd = uffd;
    C.unfit = 0;
    /* HELLO: u32 flags, then the launcher's session tag, if there is one,
     * so that `mpumap-client run --stats` counts this process too. */
    unsigned char hello[4 + MPU_MAX_SESSION] = { 0 };
    struct mpu_welcome w;
    size_t hello_len = 4;
    const char *session = getenv("MPUMAP_SESSION");
    if (session) {
        size_t n = strlen(session);
        if (n > MPU_MAX_SESSION)
            n = MPU_MAX_SESSION;
        memcpy(hello + 4, session, n);
        hello_len += n;
    }
    int server;
    if (call(MPU_MSG_HELLO, hello, hello_len, uffd, MPU_MSG_WELCOME, &w, sizeof w, &server,
             why) < 0)
        goto fail;
    C.page_size = le64toh(w.page_size);
    C.buffer_pages = le64toh(w.buffer_pages);
    C.fillers = le32toh(w.fillers);
    C.evictors = le32toh(w.evictors);
    C.high_water = le32toh(w.high_water);
    C.low_water = le32toh(w.low_water);
    C.adaptive = le32toh(w.adaptive);
    C.max_events = le32toh(w.max_fault_events);
    C.guard = mpu_guard_start(sock, uffd, server);
    err = errno;
    close(server);  /* the guard keeps its own */
    errno = err;
    if (!C.guard) {
        why_errno(why, "starting the fallback guard");
        goto fail;
    }
    return 0;

fail:
    err = errno;
    close(uffd);
    close(sock);
    C.sock = C.uffd = -1;
    errno = err;
    return -1;
}

/* ---- mappings ---------------------------------------------------------- */

/* How long the next replies may take (SO_RCVTIMEO). */
static void reply_timeout(double seconds)
{
    struct timeval tv = { .tv_sec = (time_t)seconds,
                          .tv_usec = (suseconds_t)((seconds - (double)(time_t)seconds) * 1e6) };
    setsockopt(C.sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

/* A request the server answers once dirty pages are in the file. */
static int call_writing_back(int kind, const void *payload, size_t len, int expect,
                             void *out, size_t size, char *why)
{
    reply_timeout(FLUSH_TIMEOUT > C.timeout ? FLUSH_TIMEOUT : C.timeout);
    int r = call(kind, payload, len, -1, expect, out, size, NULL, why);
    int err = errno;
    reply_timeout(C.timeout);
    errno = err;
    return r;
}

/* UNMAP; for a mapping that wrote, answered once its writes are in the
 * file.  -1 with errno set (and a line on stderr) when they may not be:
 * the server said it could not write them back, or never answered. */
static int release(uint64_t id, int writable)
{
    if (!connected() || server_lost())
        return 0;  /* (the guard wrote a lost server's pages back itself) */
    if (C.unfit) {
        if (!writable)
            return 0;
        errno = ENOTCONN;  /* a request timed out: nobody can say they are in */
        say("unmapped, but the writes may not be in the file: a request timed out before");
        return -1;
    }
    uint64_t body = htole64(id), out;
    char why[WHY];
    int saved = errno;
    if (writable) {
        if (call_writing_back(MPU_MSG_UNMAP, &body, sizeof body, MPU_MSG_UNMAPPED, &out,
                              sizeof out, why) < 0) {
            say("unmapped, but the writes may not be in the file: %s", why);
            return -1;
        }
    } else {
        call(MPU_MSG_UNMAP, &body, sizeof body, -1, MPU_MSG_UNMAPPED, &out, sizeof out, NULL,
             why);
    }
    errno = saved;
    return 0;
}

/* Maps what fd names (a file), or the object url names (fd -1); writable:
 * read-write (fd open for reading and writing). */
static void *map_fd_locked(int fd, const char *url, void *addr, int fixed, int writable,
                           uint64_t *length_out, uint64_t *id_out, char *why)
{
    if (!connected()) {
        errno = ENOTCONN;
        snprintf(why, WHY, "not connected to a server (init_umap_client)");
        return NULL;
    }
    if (server_lost()) {
        errno = ENOTCONN;
        snprintf(why, WHY, "lost the server at %s", C.path);
        return NULL;
    }
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) < 0) {
        why_errno(why, "fstat");
        return NULL;
    }
    if (fd >= 0 && !S_ISREG(st.st_mode)) {
        errno = EINVAL;
        snprintf(why, WHY, "not a regular file");
        return NULL;
    }
    if (fd >= 0 && st.st_size == 0) {
        errno = EINVAL;
        snprintf(why, WHY, "cannot map an empty file");
        return NULL;
    }

    /* MAP: u32 flags, the file's descriptor; MAP_URL: u32 flags, the URL. */
    unsigned char request[4 + MPU_MAX_URL] = { 0 };
    uint32_t map_flags = htole32(writable ? MPU_MAP_WRITE : 0);
    memcpy(request, &map_flags, sizeof map_flags);
    size_t len = 4;
    if (url) {
        size_t n = strlen(url);
        if (n > MPU_MAX_URL) {
            errno = ENAMETOOLONG;
            snprintf(why, WHY, "a URL is at most %d bytes", MPU_MAX_URL);
            return NULL;
        }
        memcpy(request + 4, url, n);
        len += n;
    }
    struct mpu_mapped mapped;
    int memfd = -1;
    if (call(url ? MPU_MSG_MAP_URL : MPU_MSG_MAP, request, len, fd, MPU_MSG_MAPPED, &mapped,
             sizeof mapped, &memfd, why) < 0)
        return NULL;
    uint64_t id = le64toh(mapped.mapping_id), size = le64toh(mapped.size);
    uint64_t length = le64toh(mapped.length);
    long page = sysconf(_SC_PAGESIZE);
    if (length == 0 || length < size || length % (uint64_t)page) {
        close(memfd);
        release(id, writable);
        errno = EPROTO;
        snprintf(why, WHY, "bad reply from the server: %llu bytes to map",
                 (unsigned long long)length);
        return NULL;
    }

    /* Only MAP_SHARED: no MAP_POPULATE or the like, which would fill the
     * buffer's holes with zeros before the range is registered. */
    void *p = mpu_sys_mmap(addr, length, PROT_READ | (writable ? PROT_WRITE : 0),
                           MAP_SHARED | (fixed ? MAP_FIXED_NOREPLACE : 0), memfd, 0);
    int err = errno;
    if (p == MAP_FAILED) {
        close(memfd);
        release(id, writable);
        errno = err;
        why_errno(why, "mmap");
        return NULL;
    }
    if (fixed && p != addr) {   /* a kernel without MAP_FIXED_NOREPLACE */
        close(memfd);
        mpu_sys_munmap(p, length);
        release(id, writable);
        errno = EEXIST;
        why_errno(why, "mmap");
        return NULL;
    }
    /* A forked child must not inherit the range: nothing would watch its
     * faults, and a read there would plant a zero page in the buffer. */
    if (madvise(p, length, MADV_DONTFORK) < 0) {
        close(memfd);
        why_errno(why, "madvise(MADV_DONTFORK)");
        goto unmap;
    }
    /* A mapping that writes is guarded with its buffer: should the server
     * go, the guard writes what the buffer holds to the file first. */
    err = mpu_guard_add_writable(C.guard, (uintptr_t)p, length, fd, writable ? memfd : -1);
    close(memfd);
    if (err < 0) {
        errno = -err;
        if (err == -ENOTCONN)
            snprintf(why, WHY, "lost the server at %s", C.path);
        else
            why_errno(why, "guarding the mapping");
        goto unmap;
    }
    struct mpu_span reg = { htole64(id), htole64((uintptr_t)p), htole64(length) };
    unsigned char registered[8];
    if (call(MPU_MSG_REGISTER, &reg, sizeof reg, -1, MPU_MSG_REGISTERED, registered,
             sizeof registered, NULL, why) < 0) {
        err = errno;
        mpu_guard_remove(C.guard, (uintptr_t)p);
        errno = err;
        goto unmap;
    }
    *length_out = length;
    *id_out = id;
    return p;

unmap:
    err = errno;
    mpu_sys_munmap(p, length);
    release(id, writable);
    errno = err;
    return NULL;
}

static struct mapping *record(const char *name, int fd, void *p, uint64_t length,
                              uint64_t id, int writable, char *why)
{
    struct mapping *m = calloc(1, sizeof *m);
    if (!m || !(m->name = strdup(name ? name : ""))) {
        free(m);
        errno = ENOMEM;
        why_errno(why, "keeping the mapping");
        return NULL;
    }
    m->fd = fd < 0 ? -1 : fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (m->fd < 0 && fd >= 0) {
        int err = errno;
        free(m->name);
        free(m);
        errno = err;
        why_errno(why, "keeping the mapping");
        return NULL;
    }
    m->addr = (uintptr_t)p;
    m->length = length;
    m->id = id;
    m->served = 1;
    m->writable = writable;
    m->next = C.maps;
    C.maps = m;
    __atomic_add_fetch(&C.count, 1, __ATOMIC_SEQ_CST);
    return m;
}

static void forget(struct mapping *m)
{
    for (struct mapping **pp = &C.maps; *pp; pp = &(*pp)->next) {
        if (*pp == m) {
            *pp = m->next;
            break;
        }
    }
    __atomic_sub_fetch(&C.count, 1, __ATOMIC_SEQ_CST);
    if (m->fd >= 0)
        close(m->fd);
    free(m->name);
    free(m);
}

/* Unmaps a served range: the guard forgets it, then munmap, then UNMAP
 * (never the other way round).  A thread that waited on a fault there is
 * woken, and retries (it faults, as after the kernel's munmap). */
static int unmap_locked(struct mapping *m)
{
    if (m->served)
        mpu_guard_remove(C.guard, m->addr);
    int r = mpu_sys_munmap((void *)m->addr, m->length);
    int err = errno;
    if (m->served)
        mpu_uffd_wake(C.uffd, m->addr, m->length);
    if (m->served && release(m->id, m->writable) < 0 && r == 0) {
        r = -1;
        err = errno;
    }
    forget(m);
    errno = err;
    return r;
}

/* Under C.lock: the mapping client_umap made of name, or NULL. */
static struct mapping *named_locked(const char *name)
{
    struct mapping *m = C.maps;
    while (m && strcmp(m->name, name) != 0)
        m = m->next;
    return m;
}

/* scheme://..., and not file:// (a scheme: a letter, then letters, digits,
 * '+', '-', '.'). */
static int is_url(const char *name)
{
    const char *c = name;
    if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z')))
        return 0;
    while ((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9')
           || *c == '+' || *c == '-' || *c == '.')
        c++;
    return strncmp(c, "://", 3) == 0 && strncasecmp(name, "file://", 7) != 0;
}

static void *map_locked(int fd, const char *name, void *addr, int fixed, int writable,
                        uint64_t *length_out, char *why)
{
    uint64_t length, id;
    void *p = map_fd_locked(fd, fd < 0 ? name : NULL, addr, fixed, writable, &length, &id,
                            why);
    if (!p)
        return NULL;
    if (!record(name, fd, p, length, id, writable, why)) {
        int err = errno;
        mpu_guard_remove(C.guard, (uintptr_t)p);
        mpu_sys_munmap(p, length);
        release(id, writable);
        errno = err;
        return NULL;
    }
    if (length_out)
        *length_out = length;
    return p;
}

/* ---- fork -------------------------------------------------------------- */

static void before_fork(void)
{
    pthread_mutex_lock(&C.lock);
}

static void after_fork_parent(void)
{
    pthread_mutex_unlock(&C.lock);
}

/* The connection, the userfaultfd, the guard and the mappings (which
 * MADV_DONTFORK kept out of this address space) are the parent's. */
static void after_fork_child(void)
{
    mpu_guard_abandon(C.guard);
    C.guard = NULL;
    close_descriptors();
    while (C.maps) {
        struct mapping *m = C.maps;
        C.maps = m->next;
        close(m->fd);
        free(m->name);
        free(m);
    }
    C.count = 0;
    pthread_mutex_unlock(&C.lock);
}

__attribute__((constructor)) static void setup(void)
{
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

/* ---- for the preload library ------------------------------------------ */

void mpu_client_set_quiet(int quiet)
{
    C.quiet = quiet;
}

int mpu_client_connect(const char *sock_path)
{
    char why[WHY];
    pthread_mutex_lock(&C.lock);
    int r = connect_locked(sock_path, why);
    if (r < 0)
        say("%s", why);
    int err = errno;
    pthread_mutex_unlock(&C.lock);
    errno = err;
    return r;
}

void *mpu_client_map_fd(int fd, const char *name, void *addr, int fixed, int writable,
                        uint64_t *length_out)
{
    char why[WHY];
    pthread_mutex_lock(&C.lock);
    void *p = map_locked(fd, name, addr, fixed, writable, length_out, why);
    if (!p)
        say("cannot map %s: %s", name ? name : "a file", why);
    int err = errno;
    pthread_mutex_unlock(&C.lock);
    errno = err;
    return p;
}

size_t mpu_client_count(void)
{
    return __atomic_load_n(&C.count, __ATOMIC_SEQ_CST);
}

/* A mapping that munmap cuts into becomes a plain mapping of its file, in
 * place, before the cut: the rest of it stays readable (and writable).  One
 * that writes is write-protected first (its writers wait), and the server
 * writes its pages back before it answers UNMAP. */
static void make_plain(struct mapping *m)
{
    if (!m->served)
        return;
    if (m->writable)
        mpu_uffd_writeprotect(C.uffd, m->addr, m->length, 1);
    mpu_guard_remove(C.guard, m->addr);
    if (m->writable) {
        release(m->id, 1);
        m->served = 0;
    }
    void *want = (void *)m->addr;
    int prot = PROT_READ | (m->writable ? PROT_WRITE : 0);
    if (mpu_sys_mmap(want, m->length, prot, MAP_SHARED | MAP_FIXED, m->fd, 0) != want)
        mpu_sys_mmap(want, m->length, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    madvise(want, m->length, MADV_DONTFORK);
    /* a fault that was waiting there retries on the file */
    mpu_uffd_wake(C.uffd, m->addr, m->length);
    if (m->served)
        release(m->id, 0);
    m->served = 0;
}

int mpu_client_flush(void *addr, size_t len, int *handled)
{
    *handled = 0;
    uintptr_t start = (uintptr_t)addr, end = start + len;
    int r = 0;
    char why[WHY];
    pthread_mutex_lock(&C.lock);
    if (server_lost()) {  /* (under the lock: a reconnection frees the guard) */
        pthread_mutex_unlock(&C.lock);
        return 0;  /* the file's own mappings now: the kernel's msync */
    }
    for (struct mapping *m = C.maps; m; m = m->next) {
        uintptr_t mend = m->addr + m->length;
        if (!m->served || m->addr >= end || mend <= start)
            continue;
        *handled = 1;
        uintptr_t from = start > m->addr ? start : m->addr, to = end < mend ? end : mend;
        struct mpu_span span = { htole64(m->id), htole64(from - m->addr),
                                 htole64(to - from) };
        uint64_t pages;
        if (call_writing_back(MPU_MSG_FLUSH, &span, sizeof span, MPU_MSG_FLUSHED, &pages,
                              sizeof pages, why) < 0) {
            if (lost_meanwhile()) {  /* the guard wrote the buffer back, and synced */
                *handled = 0;
                r = 0;
                break;
            }
            say("cannot flush %s: %s", m->name, why);
            r = -1;
            break;
        }
    }
    int err = errno;
    pthread_mutex_unlock(&C.lock);
    errno = err;
    return r;
}

int mpu_client_munmap(void *addr, size_t len, int *handled)
{
    *handled = 0;
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)addr;
    if (len == 0 || start % (uintptr_t)page || start + len < start)
        return 0;   /* the kernel's munmap says EINVAL */
    uintptr_t end = start + ((len + (size_t)page - 1) & ~((size_t)page - 1));

    pthread_mutex_lock(&C.lock);
    int inside = 0;
    for (struct mapping *m = C.maps, *next; m; m = next) {
        next = m->next;
        uintptr_t mend = m->addr + m->length;
        if (m->addr >= end || mend <= start)
            continue;
        *handled = 1;
        if (m->addr >= start && mend <= end) {
            if (m->served)
                mpu_guard_remove(C.guard, m->addr);
            inside++;
        } else {
            /* what is left of it is the program's, like any mapping */
            make_plain(m);
            forget(m);
        }
    }
    if (!*handled) {
        pthread_mutex_unlock(&C.lock);
        return 0;
    }
    int r = mpu_sys_munmap(addr, len);
    int err = errno;
    if (inside) {
        for (struct mapping *m = C.maps, *next; m; m = next) {
            next = m->next;
            if (m->addr >= start && m->addr + m->length <= end) {
                /* A write-back that failed is said on stderr: munmap
                 * itself never fails for it (the range is gone). */
                if (m->served) {
                    mpu_uffd_wake(C.uffd, m->addr, m->length);
                    release(m->id, m->writable);
                }
                forget(m);
            }
        }
    }
    pthread_mutex_unlock(&C.lock);
    errno = err;
    return r;
}

/* ---- the public API ----------------------------------------------------- */

MPU_API void init_umap_client(const char *sock_path)
{
    /* void: errno is how the caller tells (0: connected) */
    if (mpu_client_connect(sock_path) == 0)
        errno = 0;
}

MPU_API void close_umap_client(void)
{
    pthread_mutex_lock(&C.lock);
    int was = connected();
    while (C.maps)
        unmap_locked(C.maps);
    disconnect();
    pthread_mutex_unlock(&C.lock);
    if (!was)
        errno = ENOTCONN;
}

MPU_API void *client_umap(const char *filename, int prot, int flags, void *addr)
{
    if (!filename) {
        errno = EINVAL;
        say("client_umap: no file name");
        return NULL;
    }
    int type = flags & MAP_TYPE;
    int writable = prot == (PROT_READ | PROT_WRITE);
    if (prot != PROT_READ && !writable) {
        errno = EINVAL;
        say("cannot map %s: prot must be PROT_READ, or PROT_READ | PROT_WRITE", filename);
        return NULL;
    }
    if (writable && type == MAP_PRIVATE) {
        errno = EINVAL;
        say("cannot map %s: PROT_WRITE only with MAP_SHARED (private copies are not "
            "served)", filename);
        return NULL;
    }
    if ((type != MAP_SHARED && type != MAP_PRIVATE && type != MAP_SHARED_VALIDATE)
        || (flags & ~(MAP_TYPE | MAP_FIXED | MAP_FIXED_NOREPLACE | MAP_NORESERVE))) {
        errno = EINVAL;
        say("cannot map %s: flags must be MAP_SHARED or MAP_PRIVATE", filename);
        return NULL;
    }
    if ((uintptr_t)addr % (uintptr_t)sysconf(_SC_PAGESIZE)) {
        errno = EINVAL;
        say("cannot map %s: address %p is not page-aligned", filename, addr);
        return NULL;
    }

    char why[WHY];
    void *p = NULL;
    pthread_mutex_lock(&C.lock);
    if (named_locked(filename)) {
        errno = EEXIST;
        snprintf(why, WHY, "mapped already (client_uunmap it first)");
        goto out;
    }
    if (!connected()) {
        errno = ENOTCONN;
        snprintf(why, WHY, "not connected to a server (init_umap_client)");
        goto out;
    }
    /* A file is opened here, with the caller's own rights: ENOENT and
     * EACCES come from this call, before the server hears of it.  A URL
     * (scheme://...) names an object the server reads, if its allow-list
     * says so (EACCES otherwise). */
    int fd = -1;
    if (!is_url(filename)) {
        fd = open(filename, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
        if (fd < 0) {
            snprintf(why, WHY, "%s", strerror(errno));
            goto out;
        }
    }
    p = map_locked(fd, filename, addr, addr != NULL, writable, NULL, why);
    int err = errno;
    if (fd >= 0)
        close(fd);
    errno = err;
out:
    if (!p)
        say("cannot map %s: %s", filename, why);
    int saved = errno;
    pthread_mutex_unlock(&C.lock);
    errno = saved;
    return p;
}

MPU_API int client_uunmap(const char *filename)
{
    if (!filename) {
        errno = EINVAL;
        say("client_uunmap: no file name");
        return -1;
    }
    int r = -1;
    pthread_mutex_lock(&C.lock);
    struct mapping *m = named_locked(filename);
    if (!m) {
        errno = EINVAL;
        say("cannot unmap %s: not mapped", filename);
    } else if ((r = unmap_locked(m)) < 0) {
        say("cannot unmap %s: %s", filename, strerror(errno));
    }
    int saved = errno;
    pthread_mutex_unlock(&C.lock);
    errno = saved;
    return r < 0 ? -1 : 0;
}

MPU_API int client_uflush(const char *filename)
{
    if (!filename) {
        errno = EINVAL;
        say("client_uflush: no file name");
        return -1;
    }
    pthread_mutex_lock(&C.lock);
    struct mapping *m = named_locked(filename);
    uintptr_t addr = m ? m->addr : 0;
    size_t length = m ? m->length : 0;
    int served = m && m->served;
    pthread_mutex_unlock(&C.lock);
    if (!m) {
        errno = EINVAL;
        say("cannot flush %s: not mapped", filename);
        return -1;
    }
    int handled = 0, r = served ? mpu_client_flush((void *)addr, length, &handled) : 0;
    if (!handled)  /* the file's own mapping now (or since the server was lost): msync it */
        return msync((void *)addr, length, MS_SYNC);
    return r;
}

MPU_API long umapcfg_get_system_page_size(void)
{
    return sysconf(_SC_PAGESIZE);
}

#define GETTER(type, name, field)                      \
    MPU_API type name(void)                            \
    {                                                  \
        pthread_mutex_lock(&C.lock);                   \
        int ok = connected();                          \
        type value = ok ? (type)C.field : 0;           \
        pthread_mutex_unlock(&C.lock);                 \
        if (!ok)                                       \
            errno = ENOTCONN;                          \
        return value;                                  \
    }

GETTER(uint64_t, umapcfg_get_max_pages_in_buffer, buffer_pages)
GETTER(uint64_t, umapcfg_get_umap_page_size, page_size)
GETTER(uint64_t, umapcfg_get_num_fillers, fillers)
GETTER(uint64_t, umapcfg_get_num_evictors, evictors)
GETTER(int, umapcfg_get_evict_low_water_threshold, low_water)
GETTER(int, umapcfg_get_evict_high_water_threshold, high_water)
GETTER(uint64_t, umapcfg_get_max_fault_events, max_events)
