/*
 * cut_mapper FILE: maps FILE read-write with the plain C library call
 * (served by the preload library), says "ready", then does what each line
 * of stdin says and answers one line:
 *
 *     cut OFFSET LENGTH     munmap that part of the mapping: "ok", or the error
 *     fixed OFFSET LENGTH   an anonymous mapping there (MAP_FIXED), holding 'F': "ok"
 *     rawfixed OFFSET LENGTH  the same by the system call, as a program that
 *                           does not map through the C library would
 *     write OFFSET CHAR     store CHAR there: "ok"
 *     twrite OFFSET CHAR    the same, on a new thread: "writing"
 *     join                  wait for that thread: "ok"
 *     read OFFSET           the byte there, or "segv"
 *     sync OFFSET LENGTH    msync of that part: "ok", or the error
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>

static char *map;
static volatile char *there;
static volatile char what;
static sigjmp_buf probing;

static void *write_there(void *unused)
{
    (void)unused;
    *there = what;
    return NULL;
}

static void on_segv(int sig)
{
    (void)sig;
    siglongjmp(probing, 1);
}

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    int fd = open(argv[1], O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        return 2;
    size_t size = (size_t)st.st_size;
    map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    signal(SIGSEGV, on_segv);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    pthread_t writer;
    char line[128], c;
    unsigned long offset, length;
    while (fgets(line, sizeof line, stdin)) {
        if (sscanf(line, "cut %lu %lu", &offset, &length) == 2) {
            if (munmap(map + offset, length) < 0)
                printf("%s\n", strerror(errno));
            else
                printf("ok\n");
        } else if (sscanf(line, "fixed %lu %lu", &offset, &length) == 2
                   || sscanf(line, "rawfixed %lu %lu", &offset, &length) == 2) {
            int prot = PROT_READ | PROT_WRITE, how = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED;
            char *p = line[0] == 'r'
                ? (char *)syscall(SYS_mmap, map + offset, length, prot, how, -1, 0)
                : mmap(map + offset, length, prot, how, -1, 0);
            if (p == MAP_FAILED) {
                printf("%s\n", strerror(errno));
            } else {
                memset(p, 'F', length);
                printf("ok\n");
            }
        } else if (sscanf(line, "write %lu %c", &offset, &c) == 2) {
            map[offset] = c;
            printf("ok\n");
        } else if (sscanf(line, "twrite %lu %c", &offset, &c) == 2) {
            there = map + offset;
            what = c;
            if (pthread_create(&writer, NULL, write_there, NULL) != 0)
                return 1;
            printf("writing\n");
        } else if (strncmp(line, "join", 4) == 0) {
            pthread_join(writer, NULL);
            printf("ok\n");
        } else if (sscanf(line, "read %lu", &offset) == 1) {
            if (sigsetjmp(probing, 1))
                printf("segv\n");
            else
                printf("%d\n", ((volatile unsigned char *)map)[offset]);
        } else if (sscanf(line, "sync %lu %lu", &offset, &length) == 2) {
            if (msync(map + offset, length, MS_SYNC) < 0)
                printf("%s\n", strerror(errno));
            else
                printf("ok\n");
        } else {
            return 2;
        }
    }
    return 0;
}
