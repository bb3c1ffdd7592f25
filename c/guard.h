/*
 * The fallback guard: a client's safety net for when its server dies.
 *
 * A client keeps its own userfaultfd open, so its ranges stay registered when
 * the server goes; a thread that touches a missing page then waits for an
 * answer that will never come.  The guard is a C thread (it needs no Python
 * GIL: a Python thread blocked on a fault may hold it) that watches the
 * client's socket.  Once the server is lost (POLLHUP, POLLRDHUP or POLLERR on
 * the socket), it replaces every range it knows, in place, with a read-only
 * MAP_SHARED | MAP_FIXED mapping of the file itself (same address, same
 * length), marks it MADV_DONTFORK, and issues UFFDIO_WAKE on the client's
 * userfaultfd over the whole range: every thread blocked on a fault there
 * retries and reads the file through the kernel.  One warning line goes to
 * stderr.
 *
 * A range that may write holds bytes the file does not have yet: the pages
 * written since they were last written back.  Those the guard writes to
 * the file first, under a lock every client of the region takes in turn:
 * it write-protects its own range (its threads that write wait), lets
 * GRACE_MS pass (every other client's guard, woken by the same loss, does
 * the same meanwhile), then copies every page the memfd holds to the file,
 * punches it out of the memfd (so that a guard that comes later copies
 * nothing stale over what was written to the file since), syncs, and maps
 * the file read-write in its place.  Punches only if the server's process
 * has exited: one that closed this connection and serves on keeps the
 * pages for its other clients, and writes them back itself.
 *
 * Use, for each mapping:  mmap the memfd, MADV_DONTFORK, mpu_guard_add, then
 * REGISTER (so that no registered range is ever unguarded); and to unmap:
 * mpu_guard_remove, then munmap, then UNMAP (so that the guard never maps
 * over a range that is no longer the client's).  Stop the guard before
 * closing the socket or the userfaultfd.
 *
 * Functions return 0 or a negative errno, unless said otherwise.
 */
#ifndef MPU_GUARD_H
#define MPU_GUARD_H

#include <stdint.h>

struct mpu_guard;

/* Starts the guard's thread.  server_sock and uffd stay the caller's: the
 * guard neither closes nor reads them.  server: the pidfd WELCOME brought
 * (the guard keeps a dup; -1: none, and the guard opens one for the
 * socket's peer, where it can).  Without a pidfd, a lost connection is
 * taken for a dead server.  NULL with errno set on failure. */
struct mpu_guard *mpu_guard_start(int server_sock, int uffd, int server);

/* Guards [addr, addr + len), a mapping of the file open on file_fd (dup'ed
 * and kept; the caller may close its own).  file_fd -1: there is no file
 * (a remote object): should the server go, the range becomes inaccessible,
 * a SIGSEGV where a read would wait for ever.  -ENOTCONN once the guard
 * has fallen back: the server is gone, do not register the range. */
int mpu_guard_add(struct mpu_guard *g, uint64_t addr, uint64_t len, int file_fd);

/* The same for a range that may write: file_fd open for reading and
 * writing, memfd the region's buffer (both dup'ed and kept). */
int mpu_guard_add_writable(struct mpu_guard *g, uint64_t addr, uint64_t len, int file_fd,
                           int memfd);

/* Forgets the range that starts at addr and closes its kept descriptor;
 * -ENOENT when there is none.  Call it before munmap. */
int mpu_guard_remove(struct mpu_guard *g, uint64_t addr);

/* 1 once the server was lost and the ranges were replaced, else 0 (waits
 * while a fallback is under way). */
int mpu_guard_fell_back(struct mpu_guard *g);

/* Stops and joins the thread, closes the kept descriptors, frees g.  The
 * ranges stay as they are.  NULL is a no-op. */
void mpu_guard_stop(struct mpu_guard *g);

/* In a child forked while g was running: closes the guard's descriptors and
 * frees g without touching the parent's thread (which the child does not
 * have).  The ranges are PROT_NONE placeholders in the child (a fork
 * handler put them there): unmapping them there harms nothing.  NULL is a
 * no-op. */
void mpu_guard_abandon(struct mpu_guard *g);

#endif
