/*
 * libmpumapclient: MP-UMap's client API, for mpumap servers.
 *
 * Build a client with
 *     cc prog.c $(mpumap-client config --cflags --libs)
 *
 * Unlike MP-UMap's, this library never exits and never prints on stdout on
 * your behalf: a failure returns NULL or -1 with errno set, and writes one
 * line on stderr.  Every function may be called from any thread.
 *
 * A file is mapped read-only, or read-write and shared; the pages come from
 * the server's shared buffer.  If the server dies, the library maps the file
 * itself over each mapping (same address), after writing to the file what
 * the buffer holds of a mapping that writes, and the program goes on through
 * the kernel's page cache.  Mappings are not inherited by fork(): connect
 * again in the child.
 */
#ifndef UMAP_CLIENT_H
#define UMAP_CLIENT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Connects to the server at sock_path (NULL: $MPUMAP_SOCKET, else
 * /tmp/mpumap.sock).  errno is 0 afterwards when connected; on failure it
 * says why, and client_umap() fails with ENOTCONN.  Connecting again while
 * connected does nothing; after the server was lost, it connects anew. */
void init_umap_client(const char *sock_path);

/* Unmaps every mapping and disconnects. */
void close_umap_client(void);

/* Maps the whole file: prot PROT_READ, flags MAP_SHARED or MAP_PRIVATE; or
 * prot PROT_READ | PROT_WRITE with MAP_SHARED (the file is opened read-write:
 * every process that maps it through the server sees a write at once, and
 * the server writes what was written back to the file; MAP_PRIVATE with
 * PROT_WRITE is EINVAL).  A non-NULL addr asks for exactly that address and
 * fails with EEXIST when something is mapped there.  The file is opened with the
 * caller's own rights (ENOENT, EACCES, ...).  filename may be a URL
 * (s3://bucket/key, https://host/path): the server reads that object with
 * its own credentials if its --allow-remote lets it (EACCES otherwise).
 * NULL on failure. */
void *client_umap(const char *filename, int prot, int flags, void *addr);

/* Unmaps what client_umap(filename, ...) mapped: once what it wrote is in
 * the file.  0, or -1 with errno set. */
int client_uunmap(const char *filename);

/* Writes what was written through client_umap(filename, ...) to the file
 * and returns once it is there and synced, as msync(MS_SYNC) does; the
 * mapping stays.  0, or -1 with errno set. */
int client_uflush(const char *filename);

/* The server's settings, as it announced them when this client connected
 * (the buffer size of an adaptive server changes later).  0 with errno set to
 * ENOTCONN when not connected; the system page size is always known. */
long umapcfg_get_system_page_size(void);
uint64_t umapcfg_get_max_pages_in_buffer(void);
uint64_t umapcfg_get_umap_page_size(void);
uint64_t umapcfg_get_num_fillers(void);
uint64_t umapcfg_get_num_evictors(void);
int umapcfg_get_evict_low_water_threshold(void);
int umapcfg_get_evict_high_water_threshold(void);
uint64_t umapcfg_get_max_fault_events(void);

#ifdef __cplusplus
}
#endif

#endif
