"""cffi build script for ``minilora._native`` (API mode, compiled at install time).

The C API is ``csrc/minilora.h``: plain C that pycparser accepts, read verbatim into ``cdef``.
Flags: ``-O3 -std=c11``; never ``-ffast-math`` (an oracle must not reassociate or flush subnormals).
SIMD variants are compiled with ``__attribute__((target(...)))`` and chosen at run time, so the build
needs no ``-march=native``.
"""
import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_header():
    with open(os.path.join(HERE, "minilora.h"), encoding="utf-8") as f:
        # cdef takes declarations only: drop preprocessor lines (include guards).
        return "\n".join(line for line in f if not line.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(_read_header())
ffibuilder.set_source(
    "minilora._native",
    '#include <stdint.h>\n#include "minilora.h"',
    sources=sorted(os.path.relpath(p) for p in glob.glob(os.path.join(HERE, "*.c"))),
    include_dirs=[os.path.relpath(HERE)],
    depends=sorted(os.path.relpath(p) for p in glob.glob(os.path.join(HERE, "*.h"))),  # rebuild on header edits
    extra_compile_args=["-O3", "-std=c11", "-fno-fast-math", "-ffp-contract=off", "-D_GNU_SOURCE"],
    libraries=["pthread", "m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
