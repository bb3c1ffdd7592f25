/*
 * Raw mmap and munmap, straight to the kernel.
 *
 * The native client and the fallback guard map memory through these, never
 * through the C library's mmap(): inside a program that runs with
 * libmpumappreload.so, mmap() and munmap() are the preload library's own, and
 * the client's mappings must not go back into it.
 */
#ifndef MPU_SYS_H
#define MPU_SYS_H

#include <stddef.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

/* Flags older C libraries do not name yet. */
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#ifndef MAP_SHARED_VALIDATE
#define MAP_SHARED_VALIDATE 0x03
#endif

static inline void *mpu_sys_mmap(void *addr, size_t len, int prot, int flags,
                                 int fd, off_t offset)
{
    long r = syscall(SYS_mmap, addr, len, prot, flags, fd, offset);
    return r == -1 ? MAP_FAILED : (void *)r;
}

static inline int mpu_sys_munmap(void *addr, size_t len)
{
    return (int)syscall(SYS_munmap, addr, len);
}

#endif
