/*
 * url_reader: map URL through the server with MP-UMap's client API and
 * write what the mapping holds to OUT; "errno N" on stdout when the map
 * fails.
 *
 *     url_reader URL SIZE OUT
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include <umap/umap-client.h>

int main(int argc, char **argv)
{
    if (argc != 4) { /* URL, SIZE (bytes to write), OUT */
        fprintf(stderr, "usage: url_reader URL SIZE OUT\n");
        return 2;
    }
    init_umap_client(NULL);
    if (errno)
        return 3;
    char *p = client_umap(argv[1], PROT_READ, MAP_SHARED, NULL);
    if (!p) {
        printf("errno %d\n", errno);
        return 1;
    }
    FILE *out = fopen(argv[3], "wb");
    size_t size = strtoull(argv[2], NULL, 10);
    if (!out || fwrite(p, 1, size, out) != size || fclose(out) != 0)
        return 4;
    client_uunmap(argv[1]);
    close_umap_client();
    printf("ok\n");
    return 0;
}
