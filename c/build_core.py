"""cffi build script for mpumap's C core (API mode, out of line).

Compiled at install time through setup.py's ``cffi_modules``; importing
mpumap never compiles anything.  The declarations are the headers' own:
each Python-facing header is read as it is, less the preprocessor lines
cffi does not take, so that nothing is written twice (what only C calls
lives in the *_internal.h headers, which this script does not read).
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# What Python uses, in the order they include one another.
HEADERS = ["mpu_wire.h", "mpumap_core.h", "guard.h", "fastpath.h"]

_DEFINE = re.compile(r"#\s*define\s+(\w+)(\([^)]*\))?\s*(.*)")
_NUMBER = re.compile(r"(0x[0-9a-fA-F]+|\d+)[uUlL]*")
_STRING = re.compile(r'"[^"\\]*"')


def declarations(text):
    """A header as cffi's cdef reads it: comments and include guards,
    includes and function-like macros go; a #define of a plain number stays
    (cffi checks it against the compiler), one of a string becomes a
    constant char pointer (lib.NAME, a cdata for ffi.string), any other
    #define is left to the compiler to fill in (`...`)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            lines.append(line)
            continue
        define = _DEFINE.match(stripped)
        if not define or define.group(2) or not define.group(3):
            continue  # #include, #ifndef, #endif, a guard, a macro with arguments
        name, value = define.group(1), define.group(3).strip()
        if _STRING.fullmatch(value):
            lines.append(f"static char *const {name};")
            continue
        number = _NUMBER.fullmatch(value)
        lines.append(f"#define {name} {number.group(1) if number else '...'}")
    return "\n".join(lines)


def cdef_text():
    parts = []
    for name in HEADERS:
        with open(os.path.join(HERE, name)) as f:
            parts.append(declarations(f.read()))
    return "\n".join(parts)


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "mpumap._core",
    "".join(f'#include "{name}"\n' for name in HEADERS),
    # Paths are relative to the project root, where setup.py runs.
    sources=["c/mpumap_core.c", "c/pbm.c", "c/guard.c", "c/fastpath.c"],
    include_dirs=["c"],
    depends=[f"c/{name}" for name in HEADERS]
    + ["c/mpumap_core_internal.h", "c/mpu_sys.h", "c/build_core.py"],
    extra_compile_args=["-O2", "-Wall", "-std=gnu11", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
