"""cffi (API mode) builder for tcmu_obd.frontends.tcmu._libtcmu.

Links against the system's libtcmu.so.2 by soname (`-l:libtcmu.so.2`: Debian ships no
unversioned .so symlink and no headers), so the declarations in libtcmu_decls.h are the
contract; tests pin their layout. Used by setup.py (`cffi_modules`) and runnable directly:
`python csrc/build_tcmu.py` builds the module in place.
"""

from __future__ import annotations

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = "tcmu_obd.frontends.tcmu._libtcmu"


def _cdef_text(path: str) -> str:
    """Header text minus preprocessor lines and comments (cffi's cdef takes declarations only)."""
    with open(path) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


CDEF = (
    # sys/uio.h, for cdef only (the C side includes the real header)
    "struct iovec { void *iov_base; size_t iov_len; };\n"
    + _cdef_text(os.path.join(HERE, "libtcmu_decls.h"))
    + _cdef_text(os.path.join(HERE, "obd_tcmu_helpers.h"))
    + """
void free(void *ptr);
extern "Python" int obd_py_added(struct tcmu_device *dev);
extern "Python" void obd_py_removed(struct tcmu_device *dev);
"""
)

with open(os.path.join(HERE, "obd_tcmu_helpers.c")) as _f:
    _HELPERS_C = _f.read()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    MODULE,
    "#include <stdlib.h>\n" + _HELPERS_C,
    include_dirs=[HERE],
    extra_link_args=["-l:libtcmu.so.2"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(HERE), verbose=True)
