"""Where the native parts are, and how to use them.

- ``include_dir()``: the folder that holds ``umap/umap-client.h``.
- ``client_library()`` / ``preload_library()``: libmpumapclient.so (MP-UMap's
  client API in C) and libmpumappreload.so (serves an unmodified program's
  read-only mmap() of chosen files through mpumap).
- ``cflags()`` / ``libs()``: what ``mpumap-client config --cflags --libs``
  prints, so that ``cc prog.c $(mpumap-client config --cflags --libs)``
  builds a client that runs without LD_LIBRARY_PATH.
- ``preload_env(patterns, socket_path=None)``: the environment that makes a
  command's mmap() of files matching the patterns go through the server.
"""
import os
import shlex

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CLIENT_LIBRARY = "libmpumapclient.so"
PRELOAD_LIBRARY = "libmpumappreload.so"
HEADER = os.path.join("umap", "umap-client.h")
PRELOAD_PATTERNS_VARIABLE = "MPUMAP_PRELOAD_MAP"


class NativeMissing(RuntimeError):
    """The native libraries or the header are not where the package is."""


def _library(name):
    path = os.path.join(PACKAGE_DIR, name)
    if not os.path.exists(path):
        raise NativeMissing(f"{path} is missing: reinstall mpumap (pip install -e .) "
                            "with a C compiler at hand")
    return path


def client_library():
    """The path of libmpumapclient.so."""
    return _library(CLIENT_LIBRARY)


def preload_library():
    """The path of libmpumappreload.so."""
    return _library(PRELOAD_LIBRARY)


def include_dir():
    """The folder to give the compiler with -I: it holds umap/umap-client.h.

    An installed package carries it in mpumap/include; an editable install
    (or a source checkout) has it in c/include."""
    for folder in (os.path.join(PACKAGE_DIR, "include"),
                   os.path.join(os.path.dirname(PACKAGE_DIR), "c", "include")):
        if os.path.exists(os.path.join(folder, HEADER)):
            return folder
    raise NativeMissing(f"{HEADER} is missing: reinstall mpumap")


def cflags():
    """Compiler flags for a program that includes <umap/umap-client.h>."""
    return ["-I" + include_dir()]


def libs():
    """Linker flags for libmpumapclient, with an rpath: the program finds the
    library at run time without LD_LIBRARY_PATH."""
    folder = os.path.dirname(client_library())
    return ["-L" + folder, "-Wl,-rpath," + folder, "-lmpumapclient"]


def config_line(cflags_=False, libs_=False):
    """One shell-quoted line of flags, as pkg-config prints them."""
    words = (cflags() if cflags_ else []) + (libs() if libs_ else [])
    return " ".join(shlex.quote(w) for w in words)


def preload_env(patterns, socket_path=None, environ=None):
    """The variables to set so that a command's read-only mmap() of whole
    files whose paths match one of the fnmatch patterns is served by mpumap.

    Returns a dict with LD_PRELOAD (the preload library first, before any
    preload already in environ), MPUMAP_PRELOAD_MAP (the patterns, colon
    separated) and MPUMAP_SOCKET (when socket_path is given; otherwise the
    preload library uses $MPUMAP_SOCKET, else /tmp/mpumap.sock).  Merge it
    into the command's environment: ``{**os.environ, **preload_env(...)}``.

    Patterns are matched against absolute paths (as /proc/self/fd shows
    them), with fnmatch(3) and no flags: ``*`` matches ``/`` too.  A relative
    pattern is made absolute from the current folder, unless it starts with
    ``*`` (which matches any folder already)."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    cleaned = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if not pattern:
            continue
        if ":" in pattern:
            raise ValueError(f"a pattern cannot contain ':' (the separator): {pattern!r}")
        if not pattern.startswith(("/", "*")):
            pattern = os.path.join(os.getcwd(), pattern)
        cleaned.append(pattern)
    if not cleaned:
        raise ValueError("no pattern given")
    environ = os.environ if environ is None else environ
    preload = [preload_library()]
    preload += [p for p in environ.get("LD_PRELOAD", "").replace(":", " ").split()
                if p != preload[0]]
    env = {"LD_PRELOAD": ":".join(preload),
           PRELOAD_PATTERNS_VARIABLE: ":".join(cleaned)}
    if socket_path is not None:
        env["MPUMAP_SOCKET"] = os.path.abspath(os.fspath(socket_path))
    return env
