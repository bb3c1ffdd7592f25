/*
 * What libmpumapclient offers its siblings (the preload library) beyond the
 * public API of umap/umap-client.h.  Not installed, not exported.
 */
#ifndef UMAP_CLIENT_INTERNAL_H
#define UMAP_CLIENT_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* Writes "prefix: message" and a newline to stderr in one write(2), errno
 * untouched: how the client and the preload library speak. */
void mpu_write_line(const char *prefix, const char *fmt, va_list ap);

/* No messages on stderr from the client: the caller speaks for itself. */
void mpu_client_set_quiet(int quiet);

/* Connects like init_umap_client; 0, or -1 with errno set. */
int mpu_client_connect(const char *sock_path);

/* Maps the whole file open on fd (which stays the caller's), read-only, at
 * the hint addr (fixed: exactly there, never replacing).  name labels the
 * mapping for client_uunmap and messages.  NULL with errno set on failure;
 * *length_out is the mapped length (the file's size in whole pages). */
void *mpu_client_map_fd(int fd, const char *name, void *addr, int fixed, int writable,
                        uint64_t *length_out);

/* msync(addr, len, MS_SYNC) for the client's mappings in the range: their
 * writes are in their files when it returns.  0, or -1 with errno set;
 * *handled is 0 when the range touches no mapping of the client. */
int mpu_client_flush(void *addr, size_t len, int *handled);

/* The number of live mappings (no lock: a quick "nothing to do" test). */
size_t mpu_client_count(void);

/* munmap(addr, len) for a program whose mmap() was served by the client:
 * mappings inside the range are released from the server, one that the range
 * cuts into becomes a plain mapping of its file first.  *handled is 0 (and
 * nothing was done) when the range touches no mapping of the client. */
int mpu_client_munmap(void *addr, size_t len, int *handled);

#endif
