"""Python face of the C core: every call checked, failures raised as OSError.

The fault path itself (reading faults, copying, waking) is C through and
through (c/fastpath.c); uffd_wake, used when the server wakes a client's
waiting threads, returns the errno instead of raising: a client that is
gone (ESRCH, ENOENT) is an ordinary outcome there.
"""
import errno
import os

from mpumap._core import ffi, lib

FREE = lib.MPU_FREE
FILLING = lib.MPU_FILLING
PRESENT = lib.MPU_PRESENT
LEAVING = lib.MPU_LEAVING
STATE_NAMES = {FREE: "FREE", FILLING: "FILLING", PRESENT: "PRESENT", LEAVING: "LEAVING"}

UFFD_HOW = {
    lib.MPU_UFFD_SYSCALL: "syscall",
    lib.MPU_UFFD_DEVICE: "/dev/userfaultfd",
    lib.MPU_UFFD_USER_ONLY: "user-mode-only",
}


def check(result, what):
    """Raise OSError for a negative errno from the C core, else pass it on."""
    if result < 0:
        code = -result
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def uffd_open():
    """A new userfaultfd for this process, by the first way that works here.

    Returns (fd, how), how naming the way: the plain system call, the
    /dev/userfaultfd device, or user-mode-only faults (unprivileged).
    """
    how = ffi.new("int *")
    fd = check(lib.mpu_uffd_open(os.O_CLOEXEC | os.O_NONBLOCK, how), "userfaultfd")
    features = ffi.new("uint64_t *")
    try:
        check(lib.mpu_uffd_api(fd, 0, features), "UFFDIO_API")
    except OSError:
        os.close(fd)
        raise
    return fd, UFFD_HOW[how[0]]


def is_uffd(fd):
    return bool(check(lib.mpu_uffd_is_uffd(fd), "is_uffd"))


def pseudo_fs_of(fd):
    """The name of the file system of the file open on fd if it is one
    whose files the kernel makes for their reader (proc, sysfs, ...), else
    None."""
    name = lib.mpu_pseudo_fs_of(fd)
    return ffi.string(name).decode() if name != ffi.NULL else None


def uffd_register(fd, start, length, writable=False):
    """Register a client's range for missing-page faults, and for a range
    that may write, write-protect faults too (every page protected until
    the server lets the client write it)."""
    check(lib.mpu_uffd_register(fd, start, length, int(writable)), "UFFDIO_REGISTER")


def uffd_wake(fd, start, length):
    """0, or the errno of a failed UFFDIO_WAKE."""
    return -lib.mpu_uffd_wake(fd, start, length)


def leave_server(keep, parent_pid):
    """In a child just forked from the server (a worker, a store's stat):
    close every descriptor but those in `keep`, undo the arbiter's signal
    handling, and die with the server.  The descriptors are the server's
    (its clients' sockets and userfaultfds, the regions' memfds, the
    listening socket): a child that held them would keep the server's
    clients from seeing it die.  The arbiter's handlers write to its wakeup
    pipe."""
    import signal

    from mpumap.stores.files import close_any

    # (A store's descriptor is closed aside: closing asks its file system,
    # which may hang, and the child must start all the same.)
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd not in keep:
            close_any(fd)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    die_with_parent(parent_pid)


def die_with_parent(parent_pid):
    import signal

    check(lib.mpu_die_with_parent(signal.SIGKILL, parent_pid), "PR_SET_PDEATHSIG")


def set_process_title(name, title):
    """Name this process for ps and top: its whole command line where
    setproctitle is installed (as gunicorn does), and its comm (PR_SET_NAME,
    15 bytes) always, last, since setproctitle sets that too."""
    try:
        import setproctitle
    except ImportError:
        pass
    else:
        setproctitle.setproctitle(title)
    check(lib.mpu_set_name(name.encode()[:15]), "PR_SET_NAME")


def address_of(buffer):
    """The address of a buffer-protocol object's first byte."""
    ref = ffi.from_buffer(buffer)
    try:
        return int(ffi.cast("uintptr_t", ref))
    finally:
        ffi.release(ref)


def pointer_to(buffer):
    """A lasting cffi pointer into a buffer (keeps the buffer exported)."""
    return ffi.from_buffer(buffer)


ETIMEDOUT = errno.ETIMEDOUT
