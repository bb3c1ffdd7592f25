/*
 * libmpumappreload.so: serve an unmodified program's file mappings through
 * mpumap.
 *
 *     MPUMAP_PRELOAD_MAP='/data/*.bin:/scratch/graph-*' \
 *     LD_PRELOAD=$(mpumap-client config --preload) program ...
 *
 * mmap() (and mmap64) of a regular file whose path (readlink of
 * /proc/self/fd/N) matches one of the colon-separated fnmatch(3) patterns,
 * with PROT_READ, MAP_SHARED or MAP_PRIVATE (or PROT_READ | PROT_WRITE and
 * MAP_SHARED, of a file open for reading and writing), offset 0, and the
 * whole file's length, and no MAP_FIXED, is served by the server at
 * $MPUMAP_SOCKET (connected on the first such call).  munmap() of such a
 * range releases it (what was written is in the file when it returns);
 * msync() of it writes back what was written; a munmap that cuts into one
 * leaves the rest of it as a plain mapping of the file, and an mmap with
 * MAP_FIXED over one is that munmap first.  Every other call goes to the C
 * library untouched.  When the server cannot serve (none
 * there, or it refuses), the call goes to the C library too, with one
 * warning on stderr per process.
 *
 * The client code is compiled into this library, hidden: it exports mmap,
 * mmap64, munmap and msync only.  The client maps its own memory with raw
 * system calls, so nothing here runs twice for one call.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include "mpu_sys.h"
#include "mpu_wire.h"
#include "umap_client_internal.h"

#define EXPORT __attribute__((visibility("default")))

_Static_assert(sizeof(off_t) == 8, "mmap64 is mmap only where off_t has 64 bits");

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);
typedef int (*munmap_fn)(void *, size_t);
typedef int (*msync_fn)(void *, size_t, int);

static mmap_fn real_mmap;
static munmap_fn real_munmap;
static msync_fn real_msync;

/* Set while this thread is inside the library: any mmap it causes (through
 * the C library, say) goes straight through. */
static __thread int busy __attribute__((tls_model("initial-exec")));

static pthread_once_t once = PTHREAD_ONCE_INIT;
static char **patterns;
static int npatterns;

static pthread_mutex_t connect_lock = PTHREAD_MUTEX_INITIALIZER;
static int connection;          /* 0: not tried, 1: connected, -1: failed */
static int warned;              /* atomic */

/* A forked child has no connection (the client drops the parent's): its
 * first matching mmap connects anew. */
static void after_fork_child(void)
{
    pthread_mutex_init(&connect_lock, NULL);
    connection = 0;
}

__attribute__((constructor)) static void resolve(void)
{
    busy++;
    real_mmap = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
    real_munmap = (munmap_fn)dlsym(RTLD_NEXT, "munmap");
    real_msync = (msync_fn)dlsym(RTLD_NEXT, "msync");
    pthread_atfork(NULL, NULL, after_fork_child);
    busy--;
}

static void *pass_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    if (real_mmap)
        return real_mmap(addr, len, prot, flags, fd, off);
    return mpu_sys_mmap(addr, len, prot, flags, fd, off);
}

static int pass_munmap(void *addr, size_t len)
{
    if (real_munmap)
        return real_munmap(addr, len);
    return mpu_sys_munmap(addr, len);
}

static int pass_msync(void *addr, size_t len, int flags)
{
    if (real_msync)
        return real_msync(addr, len, flags);
    return (int)syscall(SYS_msync, addr, len, flags);
}

static void load_patterns(void)
{
    const char *spec = getenv("MPUMAP_PRELOAD_MAP");
    if (!spec || !*spec)
        return;
    char *copy = strdup(spec);
    if (!copy)
        return;
    int n = 1;
    for (const char *p = copy; *p; p++)
        n += *p == ':';
    patterns = calloc((size_t)n, sizeof *patterns);
    if (!patterns) {
        free(copy);
        return;
    }
    char *save = NULL;
    for (char *tok = strtok_r(copy, ":", &save); tok; tok = strtok_r(NULL, ":", &save))
        if (*tok)
            patterns[npatterns++] = tok;
}

static void warn_once(const char *fmt, ...)
{
    if (__atomic_exchange_n(&warned, 1, __ATOMIC_SEQ_CST))
        return;
    va_list ap;
    va_start(ap, fmt);
    mpu_write_line("mpumap-preload", fmt, ap);
    va_end(ap);
}

static int connect_once(void)
{
    pthread_mutex_lock(&connect_lock);
    if (connection == 0) {
        mpu_client_set_quiet(1);
        connection = mpu_client_connect(NULL) == 0 ? 1 : -1;
        if (connection < 0) {
            const char *path = getenv("MPUMAP_SOCKET");
            warn_once("no mpumap server at %s (%s): mapping files with the kernel's "
                      "mmap", path && *path ? path : MPU_DEFAULT_SOCKET, strerror(errno));
        }
    }
    int ok = connection > 0;
    pthread_mutex_unlock(&connect_lock);
    return ok;
}

/* The mapping, or NULL: let the C library do it. */
static void *serve(void *addr, size_t len, int fd, int writable)
{
    pthread_once(&once, load_patterns);
    if (npatterns == 0)
        return NULL;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size <= 0)
        return NULL;
    int mode = fcntl(fd, F_GETFL);
    if (mode < 0 || (mode & O_ACCMODE) == O_WRONLY || (mode & O_PATH))
        return NULL;    /* the kernel refuses these itself */
    if (writable && ((mode & O_ACCMODE) != O_RDWR || (mode & O_APPEND)))
        return NULL;    /* ... or these */
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t whole = ((size_t)st.st_size + page - 1) & ~(page - 1);
    if (((len + page - 1) & ~(page - 1)) != whole)
        return NULL;    /* not the whole file */

    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0 || path[0] != '/')
        return NULL;
    path[n] = '\0';
    int match = 0;
    for (int i = 0; i < npatterns && !match; i++)
        match = fnmatch(patterns[i], path, 0) == 0;
    if (!match || !connect_once())
        return NULL;

    uint64_t length;
    void *p = mpu_client_map_fd(fd, path, addr, 0, writable, &length);
    if (!p)
        warn_once("%s: %s: mapped with the kernel's mmap instead", path, strerror(errno));
    return p;
}

/* MAP_FIXED over a served range is the kernel's munmap of it, then the
 * mapping: ours first, so that the range is handed back as munmap hands it
 * back (written back, the rest of a mapping cut into made the file's).
 * Left to the kernel alone, the new mapping would sit inside one the
 * server still serves: a lost server's guard would map the file over it. */
static void unmap_before_fixed(void *addr, size_t len, int flags)
{
    if (!(flags & MAP_FIXED) || busy || mpu_client_count() == 0)
        return;
    int saved = errno, handled;
    busy++;
    mpu_client_munmap(addr, len, &handled);
    busy--;
    errno = saved;
}

static void *hook_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    unmap_before_fixed(addr, len, flags);
    int type = flags & MAP_TYPE;
    int shared = type == MAP_SHARED || type == MAP_SHARED_VALIDATE;
    int writable = prot == (PROT_READ | PROT_WRITE) && shared;
    if (fd < 0 || busy || (flags & (MAP_ANONYMOUS | MAP_FIXED | MAP_FIXED_NOREPLACE))
        || (prot != PROT_READ && !writable) || off != 0 || len == 0
        || (!shared && type != MAP_PRIVATE))
        return pass_mmap(addr, len, prot, flags, fd, off);
    int saved = errno;
    busy++;
    void *p = serve(addr, len, fd, writable);
    busy--;
    errno = saved;
    return p ? p : pass_mmap(addr, len, prot, flags, fd, off);
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return hook_mmap(addr, len, prot, flags, fd, off);
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
    return hook_mmap(addr, len, prot, flags, fd, (off_t)off);
}

EXPORT int munmap(void *addr, size_t len)
{
    if (!busy && mpu_client_count() > 0) {
        int handled;
        busy++;
        int r = mpu_client_munmap(addr, len, &handled);
        busy--;
        if (handled)
            return r;
    }
    return pass_munmap(addr, len);
}

/* MS_SYNC and MS_ASYNC alike write back now (the kernel's MS_ASYNC starts
 * nothing since 2.6.19; a program that asks wants its bytes on the way). */
EXPORT int msync(void *addr, size_t len, int flags)
{
    if (!busy && mpu_client_count() > 0 && !(flags & ~(MS_SYNC | MS_ASYNC | MS_INVALIDATE))) {
        int handled;
        busy++;
        int r = mpu_client_flush(addr, len, &handled);
        busy--;
        if (handled)
            return r;
    }
    return pass_msync(addr, len, flags);
}
