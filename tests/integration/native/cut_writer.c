/*
 * cut_writer FILE OFFSET: maps FILE read-write with the plain C library
 * call (served by the preload library), reads the byte at OFFSET (so that
 * its page is in the buffer, write-protected) and says "ready".  On "write"
 * from stdin, a thread writes 'W' there (a write fault, which the server
 * answers) and the main thread says "writing"; on "cut", the main thread
 * munmaps the first system page of the mapping (the rest of it becomes a
 * plain mapping of the file), waits for the thread's write, msyncs what is
 * left and says "done".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

static volatile char *at;

static void *write_there(void *unused)
{
    (void)unused;
    *at = 'W';
    return NULL;
}

static int said(const char *want)
{
    char line[32];
    return fgets(line, sizeof line, stdin) && strncmp(line, want, strlen(want)) == 0;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    int fd = open(argv[1], O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        return 2;
    char *m = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    long page = sysconf(_SC_PAGESIZE);
    at = m + atol(argv[2]);
    printf("ready %d\n", *at);
    fflush(stdout);
    pthread_t writer;
    if (!said("write") || pthread_create(&writer, NULL, write_there, NULL) != 0)
        return 1;
    printf("writing\n");
    fflush(stdout);
    if (!said("cut") || munmap(m, (size_t)page) < 0) {
        perror("munmap");
        return 1;
    }
    pthread_join(writer, NULL);
    if (msync(m + page, (size_t)st.st_size - (size_t)page, MS_SYNC) < 0) {
        perror("msync");
        return 1;
    }
    printf("done\n");
    return 0;
}
