"""The few blocking file calls the cache makes, behind one object so tests can simulate crashes.

`FileIO` is what production uses (plain os calls). A test substitutes an object with the same
methods that remembers which writes a power cut would lose (tests/cache/crashsim.py).
"""

from __future__ import annotations

import os


class FileIO:
    def pwrite_all(self, fd: int, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)

    def pread_into(self, fd: int, buf: memoryview, offset: int) -> int:
        """Fill buf from offset; returns bytes read (short only at EOF)."""
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


DEFAULT_IO = FileIO()
