/*
 * lost_flush FILE: maps FILE read-write through the server (client_umap),
 * writes 'a' over its first half and says "wrote"; then, once a line comes
 * on stdin (the server is dead by then), writes 'b' over its second half
 * and makes it durable with client_uflush and client_uunmap, printing what
 * each returned: "flush=R errno=E unmap=R errno=E".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <umap/umap-client.h>

int main(int argc, char **argv)
{
    struct stat st;
    if (argc != 2 || stat(argv[1], &st) < 0)
        return 2;
    size_t half = (size_t)st.st_size / 2;
    init_umap_client(NULL);
    char *m = client_umap(argv[1], PROT_READ | PROT_WRITE, MAP_SHARED, NULL);
    if (!m) {
        perror("client_umap");
        return 1;
    }
    memset(m, 'a', half);
    printf("wrote\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    memset(m + half, 'b', half);
    errno = 0;
    int flushed = client_uflush(argv[1]), flush_errno = errno;
    errno = 0;
    int unmapped = client_uunmap(argv[1]), unmap_errno = errno;
    printf("flush=%d errno=%d unmap=%d errno=%d\n", flushed, flushed ? flush_errno : 0,
           unmapped, unmapped ? unmap_errno : 0);
    return 0;
}
