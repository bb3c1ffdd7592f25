"""The native libraries, built by setup.py's build_ext next to mpumap/_core:

- mpumap/libmpumapclient.so: MP-UMap's client API in C (umap/umap-client.h),
- mpumap/libmpumappreload.so: the LD_PRELOAD library that serves an
  unmodified program's read-only file mappings through mpumap.

Neither is a Python extension: they link no libpython and are named
lib*.so, so that ``cc prog.c -lmpumapclient`` finds the first one (see
``mpumap-client config``).  Both are compiled at install time; importing
mpumap compiles nothing.  setup.py uses ``setup_args()``.
"""
import os
import shutil

from setuptools import Extension
from setuptools.command.build_ext import build_ext as _build_ext

# Paths are relative to the project root, where setup.py runs.
HEADER = "c/include/umap/umap-client.h"
CLIENT_SOURCES = ["c/umap_client.c", "c/guard.c", "c/mpumap_core.c"]
DEPENDS = [HEADER, "c/umap_client_internal.h", "c/guard.h", "c/mpu_sys.h",
           "c/mpu_wire.h", "c/mpumap_core.h", "c/mpumap_core_internal.h"]
CFLAGS = ["-O2", "-Wall", "-std=gnu11", "-fvisibility=hidden", "-pthread"]
LDFLAGS = ["-pthread", "-Wl,-z,defs"]  # a symbol missing is an error here, not at run time


class NativeLibrary(Extension):
    """A plain shared library, built by build_ext as lib<name>.so."""


def extensions():
    common = dict(include_dirs=["c", "c/include"], depends=DEPENDS,
                  extra_compile_args=CFLAGS)
    return [
        NativeLibrary("mpumap.libmpumapclient", sources=CLIENT_SOURCES,
                      extra_link_args=LDFLAGS + ["-Wl,-soname,libmpumapclient.so"],
                      **common),
        # The client compiled in and hidden (MPU_API empty): the library
        # exports mmap, mmap64 and munmap only, and needs nothing at run time.
        NativeLibrary("mpumap.libmpumappreload", sources=["c/preload.c"] + CLIENT_SOURCES,
                      define_macros=[("MPU_API", "")], libraries=["dl"],
                      extra_link_args=LDFLAGS + ["-Wl,-soname,libmpumappreload.so"],
                      **common),
    ]


class build_ext(_build_ext):
    def _native(self, name):
        return isinstance(self.ext_map.get(name), NativeLibrary)

    def get_ext_filename(self, fullname):
        if self._native(fullname):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def get_libraries(self, ext):
        if isinstance(ext, NativeLibrary):
            return list(ext.libraries)
        return super().get_libraries(ext)

    def get_export_symbols(self, ext):
        if isinstance(ext, NativeLibrary):
            return []
        return super().get_export_symbols(ext)

    def run(self):
        super().run()
        # The header travels with the package (mpumap/include) in a wheel; an
        # editable install finds it in c/include.
        target = os.path.join(self.build_lib, "mpumap", "include", "umap")
        os.makedirs(target, exist_ok=True)
        shutil.copy(HEADER, target)


def setup_args():
    return {"ext_modules": extensions(), "cmdclass": {"build_ext": build_ext}}
