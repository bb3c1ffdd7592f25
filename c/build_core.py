"""cffi build script for mpumap's C core (API mode, out of line).

Compiled at install time through setup.py's ``cffi_modules``; importing
mpumap never compiles anything.
"""
from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    #define MPU_FREE ...
    #define MPU_FILLING ...
    #define MPU_PRESENT ...
    #define MPU_LEAVING ...
    #define MPU_READ_AHEAD ...
    #define MPU_LATENCY_BUCKETS ...
    #define MPU_CLIENT_SLOTS ...
    #define MPU_ANSWER_COPY ...
    #define MPU_ANSWER_WAKE ...
    #define MPU_UFFD_SYSCALL ...
    #define MPU_UFFD_DEVICE ...
    #define MPU_UFFD_USER_ONLY ...

    struct mpu_page { uint32_t state; uint32_t flags; uint64_t stamp; };
    struct mpu_table {
        uint32_t magic; uint32_t dead; uint64_t npages;
        struct mpu_page pages[];
        ...;
    };
    struct mpu_client_stats {
        uint64_t faults; uint64_t copies; uint64_t wakes; uint64_t bytes;
        uint64_t wait_ns;
        ...;
    };
    struct mpu_header {
        uint32_t magic; uint32_t version;
        uint32_t used; uint32_t limit; uint32_t high; uint32_t low;
        uint32_t evict_wanted;
        uint64_t clock; uint64_t peak_used;
        uint64_t faults; uint64_t fills; uint64_t copies; uint64_t wakes;
        uint64_t evictions; uint64_t bytes_read; uint64_t fill_errors;
        uint64_t full_waits; uint64_t restarts;
        uint64_t readahead_fills; uint64_t readahead_hits; uint64_t prefetch_fills;
        uint64_t monitor_ns; uint64_t queue_ns; uint64_t read_ns; uint64_t copy_ns;
        uint64_t wake_ns; uint64_t cache_bytes;
        uint64_t latency[...];
        struct mpu_client_stats clients[...];
        ...;
    };

    int mpu_uffd_open(int flags, int *how);
    int mpu_uffd_api(int fd, uint64_t features, uint64_t *features_out);
    int mpu_uffd_is_uffd(int fd);
    int mpu_uffd_register(int fd, uint64_t start, uint64_t len);
    int mpu_uffd_wake(int fd, uint64_t start, uint64_t len);

    int mpu_futex_wait(uint32_t *word, uint32_t expected, int timeout_ms);
    int mpu_futex_wake(uint32_t *word, int count);
    uint32_t mpu_load32(uint32_t *word);
    uint64_t mpu_add64(uint64_t *word, int64_t delta);

    int mpu_page_begin_fill(struct mpu_page *page, uint32_t owner,
                            int timeout_ms);
    void mpu_page_end_fill(struct mpu_header *h, struct mpu_table *t,
                           struct mpu_page *page, int present,
                           uint32_t flags);
    int mpu_page_evict(struct mpu_page *page, uint32_t owner,
                       int memfd, uint64_t offset, uint64_t len);
    uint64_t mpu_table_release(struct mpu_header *h, struct mpu_table *t);
    uint64_t mpu_table_count(struct mpu_table *t, uint32_t state);
    uint64_t mpu_table_recover(struct mpu_header *h, struct mpu_table *t,
                               uint32_t owner, int memfd, uint64_t page_size);
    uint64_t mpu_table_oldest(struct mpu_table *t, uint64_t stride,
                              uint64_t phase, uint64_t max,
                              uint64_t *idx_out, uint64_t *stamp_out);
    int mpu_reserve(struct mpu_header *h, const int *evict_fds, int nfds,
                    int timeout_ms);
    void mpu_release(struct mpu_header *h, uint32_t count);
    uint64_t mpu_now_ns(void);
    void mpu_account(struct mpu_header *h, uint32_t slot, uint64_t since_ns,
                     uint64_t bytes, int answer);
    int mpu_die_with_parent(int sig, int parent);
    int mpu_set_name(const char *name);
    """
)

# The fallback guard (c/guard.h): a C thread that maps the files over a
# client's mappings and wakes its faulting threads if the server dies.
ffibuilder.cdef(
    """
    struct mpu_guard;
    struct mpu_guard *mpu_guard_start(int server_sock, int uffd);
    int mpu_guard_add(struct mpu_guard *g, uint64_t addr, uint64_t len,
                      int file_fd);
    int mpu_guard_remove(struct mpu_guard *g, uint64_t addr);
    int mpu_guard_fell_back(struct mpu_guard *g);
    void mpu_guard_stop(struct mpu_guard *g);
    void mpu_guard_abandon(struct mpu_guard *g);
    """
)

# The hot loops of the fault path (c/fastpath.h).
ffibuilder.cdef(
    """
    #define MPU_FAULTS_HEADER ...
    #define MPU_FAULTS_MAX ...
    #define MPU_STORE_DIRECT ...
    #define MPU_STORE_DROP ...
    #define MPU_STORE_CACHED ...
    #define MPU_EVENTS_MAX ...
    #define MPU_EV_STUCK ...
    #define MPU_EV_NO_ROOM ...
    #define MPU_EV_UNFILLED ...
    #define MPU_EV_COPY_FAILED ...
    #define MPU_EV_WAKE_FAILED ...
    #define MPU_EV_STORE_FAILED ...
    #define MPU_EV_SHRANK ...
    #define MPU_EV_NO_POISON ...
    #define MPU_EV_WRITE_FAILED ...

    struct mpu_fault {
        uint32_t client; uint32_t region; uint64_t page; uint64_t address;
        uint64_t read_at; uint32_t ahead; uint32_t pad;
    };
    struct mpu_spinner { uint64_t spin_ns; ...; };
    struct mpu_range { uint64_t start; uint64_t end; uint32_t region; ...; };
    uint32_t mpu_filler_for(uint32_t region, uint64_t page, uint32_t nfillers);
    struct mpu_monitor;
    struct mpu_monitor *mpu_monitor_start(struct mpu_header *h, uint64_t page_size,
                                          uint64_t read_ahead, int nfillers, uint64_t spin_ns);
    int mpu_monitor_add_client(struct mpu_monitor *m, uint32_t slot, int uffd);
    int mpu_monitor_set_ranges(struct mpu_monitor *m, uint32_t slot,
                               const struct mpu_range *ranges, int n);
    int mpu_monitor_remove_client(struct mpu_monitor *m, uint32_t slot);
    void mpu_monitor_set_filler(struct mpu_monitor *m, int index, int fd);
    void mpu_monitor_stop(struct mpu_monitor *m);

    struct mpu_region_slot {
        struct mpu_table *table; int memfd; int store_fd; int store_mode; int cache_fd;
        uint64_t npages; uint64_t size; uint64_t map_length;
        ...;
    };
    struct mpu_client_slot { int uffd; ...; };
    struct mpu_event {
        uint32_t code; uint32_t region; uint64_t page; int64_t err; uint64_t value;
    };
    struct mpu_filler {
        struct mpu_header *h; const int *evict_fds; int nevict; uint32_t pid;
        uint64_t page_size; uint64_t read_ahead; struct mpu_spinner spinner; char *chunk;
        uint64_t max_run;
        struct mpu_region_slot *regions; uint32_t nregions;
        struct mpu_client_slot *clients; uint32_t nclients;
        struct mpu_event events[...]; uint32_t nevents;
        ...;
    };
    int mpu_filler_run(struct mpu_filler *f, int sock, char *buf, int size,
                       int *fds, int *nfds, int maxfds);
    void mpu_filler_prefetch(struct mpu_filler *f, uint32_t region, uint64_t first,
                             uint64_t count, int read_ahead);
    """
)

ffibuilder.set_source(
    "mpumap._core",
    '#include "mpumap_core.h"\n#include "guard.h"\n#include "fastpath.h"',
    # Paths are relative to the project root, where setup.py runs.
    sources=["c/mpumap_core.c", "c/guard.c", "c/fastpath.c"],
    include_dirs=["c"],
    depends=["c/mpumap_core.h", "c/guard.h", "c/mpu_sys.h", "c/fastpath.h"],
    extra_compile_args=["-O2", "-Wall", "-std=gnu11", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
