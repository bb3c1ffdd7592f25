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
#include <sys/vfs.h>

#include "mpumap_core_internal.h"

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

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

/* Asks for UFFD_FEATURE_POISON (6.6 on: the server answers a fault past a
 * truncated file's end with SIGBUS through it) and write-protection of
 * shared memory (5.19 on: how the server learns what a client wrote) too,
 * each where the kernel has it. */
int mpu_uffd_api(int fd, uint64_t features, uint64_t *features_out)
{
    const uint64_t optional[] = { MPU_FEATURE_POISON | MPU_FEATURE_WP_SHMEM,
                                  MPU_FEATURE_WP_SHMEM, MPU_FEATURE_POISON, 0 };
    for (size_t k = 0; k < sizeof optional / sizeof optional[0]; k++) {
        struct uffdio_api api = { .api = UFFD_API, .features = features | optional[k] };
        if (ioctl(fd, UFFDIO_API, &api) == 0) {
            *features_out = api.features;
            return 0;
        }
        if (errno != EINVAL)
            return neg_errno();
    }
    return -EINVAL;
}

int mpu_fd_is(int fd, const char *kind)
{
    char path[64], target[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, target, sizeof target - 1);
    if (n < 0)
        return neg_errno();
    target[n] = '\0';
    return strcmp(target, kind) == 0;
}

/* linux/magic.h's numbers, written out: older headers lack some. */
static const struct { unsigned long magic; const char *name; } pseudo_fs[] = {
    { 0x9fa0, "proc" },            { 0x62656572, "sysfs" },
    { 0x64626720, "debugfs" },     { 0x74726163, "tracefs" },
    { 0x73636673, "securityfs" },  { 0x62656570, "configfs" },
    { 0xde5e81e4, "efivarfs" },    { 0xcafe4a11, "bpf" },
    { 0x27e0eb, "cgroup" },        { 0x63677270, "cgroup2" },
    { 0x6165676c, "pstore" },      { 0xf97cff8c, "selinuxfs" },
    { 0x65735543, "fusectl" },     { 0x42494e4d, "binfmt_misc" },
    { 0x6e667364, "nfsd" },        { 0x67596969, "rpc_pipefs" },
    { 0x7655821, "resctrl" },
};

const char *mpu_pseudo_fs_of(int fd)
{
    struct statfs st;
    if (fstatfs(fd, &st) < 0)
        return NULL;
    for (size_t k = 0; k < sizeof pseudo_fs / sizeof pseudo_fs[0]; k++)
        if ((unsigned long)st.f_type == pseudo_fs[k].magic)
            return pseudo_fs[k].name;
    return NULL;
}

int mpu_uffd_is_uffd(int fd)
{
    return mpu_fd_is(fd, "anon_inode:[userfaultfd]");
}

int mpu_uffd_register(int fd, uint64_t start, uint64_t len, int writable)
{
    struct uffdio_register reg = {
        .range = { .start = start, .len = len },
        .mode = UFFDIO_REGISTER_MODE_MISSING | (writable ? UFFDIO_REGISTER_MODE_WP : 0),
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return neg_errno();
    /* Every page of a writable range starts write-protected, holes too
     * (the kernel keeps a marker in the page table, through evictions):
     * the first write to each is a fault the server sees. */
    if (writable)
        return mpu_uffd_writeprotect(fd, start, len, 1);
    return 0;
}

static int writeprotect_once(int fd, uint64_t start, uint64_t len, int protect)
{
    struct uffdio_writeprotect wp = {
        .range = { .start = start, .len = len },
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    for (int tries = 0; tries < 10000; tries++) {
        if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) == 0)
            return 0;
        if (errno != EAGAIN)
            return neg_errno();
        sched_yield();
    }
    return -EAGAIN;
}

/* Halves of a range that failed with ENOENT, down to system pages: *any
 * is set when one of them took.  The first other error, else 0. */
static int writeprotect_halves(int fd, uint64_t start, uint64_t len, int protect,
                               uint64_t page, int *any)
{
    int err = writeprotect_once(fd, start, len, protect);
    if (err == 0)
        *any = 1;
    if (err != -ENOENT)
        return err;
    if (len <= page)
        return 0;
    uint64_t half = len / page / 2 * page;
    int first = writeprotect_halves(fd, start, half, protect, page, any);
    int second = writeprotect_halves(fd, start + half, len - half, protect, page, any);
    return first ? first : second;
}

/* A range that crosses from one of the client's mappings into a hole, or
 * into a mapping not registered (one the program put over part of ours),
 * or before Linux 6.4 into another mapping at all (mlock or madvise of
 * part of one splits it), fails with ENOENT: as a whole, or after the
 * mappings before the gap.  Its halves are then tried, down to system
 * pages, so that every page still ours is protected; -ENOENT only when
 * none is (the client unmapped it, or is gone). */
int mpu_uffd_writeprotect(int fd, uint64_t start, uint64_t len, int protect)
{
    int err = writeprotect_once(fd, start, len, protect);
    if (err != -ENOENT)
        return err;
    int any = 0;
    err = writeprotect_halves(fd, start, len, protect, (uint64_t)sysconf(_SC_PAGESIZE), &any);
    return err ? err : any ? 0 : -ENOENT;
}

/* EAGAIN means the client's mappings are changing under us: try again.  A
 * partial copy reports how far it got; go on from there. */
int mpu_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, int wp,
                  uint64_t *copied)
{
    const char *from = src;
    uint64_t unused;
    if (!copied)
        copied = &unused;
    *copied = 0;
    for (int tries = 0; tries < 10000; tries++) {
        struct uffdio_copy copy = {
            .dst = dst, .src = (uint64_t)(uintptr_t)from, .len = len,
            .mode = wp ? UFFDIO_COPY_MODE_WP : 0,
        };
        if (ioctl(fd, UFFDIO_COPY, &copy) == 0) {
            *copied += len;
            return 0;
        }
        int err = errno;
        if (copy.copy > 0) {
            dst += copy.copy;
            from += copy.copy;
            len -= copy.copy;
            *copied += copy.copy;
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
    for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t flags = msgs[i].arg.pagefault.flags;
        addrs[count++] = msgs[i].arg.pagefault.address
            | (flags & UFFD_PAGEFAULT_FLAG_WRITE ? MPU_PF_WRITE : 0)
            | (flags & UFFD_PAGEFAULT_FLAG_WP ? MPU_PF_WP : 0);
    }
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

/* ---- pages ---------------------------------------------------------------- */

int mpu_copy_range(int from, int to, uint64_t at, uint64_t len, char *buf, size_t size)
{
    for (uint64_t end = at + len; at < end;) {
        size_t want = end - at < size ? (size_t)(end - at) : size;
        ssize_t got = pread(from, buf, want, (off_t)at);
        if (got <= 0)
            return got < 0 ? -errno : -EIO;
        for (ssize_t done = 0; done < got;) {
            ssize_t put = pwrite(to, buf + done, (size_t)(got - done),
                                 (off_t)(at + (uint64_t)done));
            if (put < 0 && errno == EINTR)
                continue;
            if (put <= 0)
                return put < 0 ? -errno : -EIO;
            done += put;
        }
        at += (uint64_t)got;
    }
    return 0;
}

int mpu_punch(int fd, uint64_t offset, uint64_t len)
{
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)offset, (off_t)len) < 0)
        return neg_errno();
    return 0;
}

/* ---- accounting -------------------------------------------------------- */

uint64_t mpu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int mpu_latency_bucket(uint64_t ns)
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
    mpu_add64(&h->latency[mpu_latency_bucket(waited)], 1);
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
