"""`tcmu-obd zfile`: compress, decompress, verify and tar-wrap ZFiles (the job of upstream's
overlaybd-zfile), plus the functions `commit -z/-t` builds on.

Everything streams: input is read in 1 MiB chunks, compressed or decompressed by a small
thread pool a few chunks ahead (lz4/zstd/crc32c release the GIL), and written in order, so
memory stays bounded whatever the file size. Output goes to a temporary file beside the
destination, fsynced and renamed into place, so a failed or interrupted run never leaves a
half-written file under the final name.

Output format: `compress_file` defaults to what `overlaybd-commit -z` writes (header rewritten
with the index info, flags 0x1B); the `zfile` subcommand writes what `overlaybd-zfile` writes
(flags 0x13, index info only in the trailer), byte for byte when the compressor agrees.
"""

from __future__ import annotations

import argparse
import errno
import os
import tempfile
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from ..errors import FormatError, ImageIOError, ObdError
from ..format import tar as tarfmt
from ..format import zfile as zf

CHUNK = 1 << 20  # bytes read/written per step (a multiple of every block size)
BLOCK_SIZES_KB = (4, 8, 16, 32, 64)


class ZFileToolError(ObdError):
    """Bad arguments or an input that cannot be processed as asked."""


def _workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _pipeline(items: Iterator, fn: Callable, pool: Executor, depth: int) -> Iterator:
    """fn(item) for every item, in order, at most `depth` in flight (bounds memory)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _read_full(f: BinaryIO, n: int) -> bytes:
    """Up to n bytes; short only at EOF (pipes and slow devices may return less per read)."""
    parts = []
    got = 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


@contextmanager
def _atomic_output(dst: str | os.PathLike) -> Iterator[BinaryIO]:
    dst = Path(dst)
    if dst.is_dir():
        raise ZFileToolError(f"{dst} is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent or ".")
    except OSError as e:
        raise ImageIOError(f"cannot create {dst}: {e.strerror}", e.errno or errno.EIO) from e
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, dst)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, ObdError):
            # disk full, I/O error: a clean error, not a traceback
            raise ImageIOError(f"writing {dst}: {e.strerror or e}", e.errno or errno.EIO) from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_input(src: str | os.PathLike) -> BinaryIO:
    try:
        return open(src, "rb")
    except OSError as e:
        raise ImageIOError(f"cannot open {src}: {e.strerror}", e.errno or errno.EIO) from e


def _check_same(src, dst) -> None:
    try:
        if os.path.samefile(src, dst):
            raise ZFileToolError(f"source and destination are the same file: {dst}")
    except FileNotFoundError:
        pass


# -- compress --------------------------------------------------------------------------------


def compress_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    algorithm: str = "lz4",
    block_size: int = 4096,
    tar: bool = False,
    verify: bool = True,
    overwrite_header: bool = True,
) -> int:
    """Compress `src` into a ZFile at `dst` (tar-wrapped when `tar`). Returns bytes written.

    Raises ZFileToolError for bad parameters, ImageIOError when src cannot be read.
    """
    if algorithm not in zf.ALGORITHMS:
        raise ZFileToolError(f"unknown algorithm {algorithm!r} (lz4 or zstd)")
    if block_size not in zf.WRITER_BLOCK_SIZES:
        raise ZFileToolError(f"block size {block_size} not one of {zf.WRITER_BLOCK_SIZES}")
    _check_same(src, dst)
    writer = zf.ZFileWriter(algorithm, block_size, verify, overwrite_header=overwrite_header)
    algo = writer.algo

    def compress_chunk(chunk: bytes) -> list[tuple[bytes, int]]:
        mv = memoryview(chunk)
        return [(zf.compress_block(mv[i:i + block_size], algo), min(block_size, len(mv) - i))
                for i in range(0, len(mv), block_size)]

    with _open_input(src) as fin, _atomic_output(dst) as fout:
        base = tarfmt.PAX_PAYLOAD_OFFSET if tar else 0
        if tar:
            fout.write(bytes(base))  # rewritten once the payload size is known
        fout.write(writer.header_placeholder())
        total = 0

        def chunks() -> Iterator[bytes]:
            nonlocal total
            while True:
                chunk = _read_full(fin, CHUNK)
                if not chunk:
                    return
                total += len(chunk)
                yield chunk

        workers = _workers()
        with ThreadPoolExecutor(workers, thread_name_prefix="zfile-compress") as pool:
            for blocks in _pipeline(chunks(), compress_chunk, pool, depth=2 * workers):
                for compressed, raw_len in blocks:
                    fout.write(writer.add_compressed(compressed, raw_len))
        tail, header = writer.finish(total)
        fout.write(tail)
        zsize = fout.tell() - base
        if tar:
            fout.write(tarfmt.wrapper_tail(zsize))
        end = fout.tell()
        fout.seek(base)
        fout.write(header)
        if tar:
            fout.seek(0)
            fout.write(tarfmt.build_wrapper_header(zsize))
    return end


def tar_wrap_file(src: str | os.PathLike, dst: str | os.PathLike, *, mode: int = 0o644) -> int:
    """Wrap `src` in overlaybd's one-file tar (PAX size record, name overlaybd.commit).
    Returns bytes written."""
    _check_same(src, dst)
    with _open_input(src) as fin, _atomic_output(dst) as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.write(tarfmt.build_wrapper_header(size, mode=mode))
        copied = 0
        while True:
            chunk = _read_full(fin, CHUNK)
            if not chunk:
                break
            copied += len(chunk)
            fout.write(chunk)
        if copied != size:
            raise ImageIOError(f"{src} changed size while being wrapped ({size} -> {copied} bytes)")
        fout.write(tarfmt.wrapper_tail(size))
        return fout.tell()


# -- reading ---------------------------------------------------------------------------------


class _Blob:
    """A window of a local file (the whole file, or a tar payload) read with pread."""

    def __init__(self, f: BinaryIO, name: str, base: int, size: int):
        self.f, self.name, self.base, self.size = f, name, base, size

    def pread(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise FormatError(f"read of {n} bytes at {offset} past end of blob (size {self.size})",
                              source=self.name, offset=offset)
        data = os.pread(self.f.fileno(), n, self.base + offset)
        while len(data) < n:  # pread may return short on some filesystems
            more = os.pread(self.f.fileno(), n - len(data), self.base + offset + len(data))
            if not more:
                raise ImageIOError(f"{self.name}: short read at {self.base + offset + len(data)}")
            data += more
        return data


def _unwrap(f: BinaryIO, name: str, tar: bool | None) -> tuple[_Blob, tarfmt.TarPayload | None]:
    size = os.fstat(f.fileno()).st_size
    blob = _Blob(f, name, 0, size)
    payload = None
    if tar is not False:
        payload = tarfmt.detect(blob.pread(0, min(size, tarfmt.DETECT_BYTES)), blob_size=size, source=name)
        if payload is None and tar:
            raise FormatError("not a tar-wrapped file (no ustar header)", source=name, offset=0)
        if payload is not None:
            blob = _Blob(f, name, payload.offset, payload.size)
    return blob, payload


def _load(blob: _Blob) -> tuple[zf.ZFileHeader, zf.ZFileHeader | None, zf.JumpTable]:
    """Header, trailer and jump table with every check ZFileSource.open makes."""
    if blob.size < zf.HEADER_SIZE:
        raise FormatError(f"{blob.size} bytes is too small for a zfile header", source=blob.name, offset=0)
    header = zf.parse_header_trailer(blob.pread(0, zf.HEADER_SIZE), source=blob.name)
    zf.check_header(header, source=blob.name)
    trailer = None
    if zf.needs_trailer(header):
        if blob.size < 2 * zf.HEADER_SIZE:
            raise FormatError(f"zfile of {blob.size} bytes has no room for a trailer",
                              source=blob.name, offset=blob.size)
        toff = blob.size - zf.HEADER_SIZE
        trailer = zf.parse_header_trailer(blob.pread(toff, zf.HEADER_SIZE), source=blob.name, offset=toff)
    start, n = zf.index_location(header, trailer, blob.size, source=blob.name)
    jt = zf.JumpTable.from_index(blob.pread(start, 4 * n), header, zf.index_info(header, trailer),
                                 source=blob.name, index_offset=start)
    return header, trailer, jt


def _decoder(blob: _Blob, header: zf.ZFileHeader, jt: zf.JumpTable):
    def decode(batch: zf.ReadBatch) -> bytes:
        stored = memoryview(blob.pread(batch.offset, batch.length))
        out = []
        for i in batch.blocks:
            off, ln = jt.block_range(i)
            out.append(zf.decode_block(
                stored[off - batch.offset:off - batch.offset + ln], algo=header.algo, verify=header.verify,
                block_size=header.block_size, expected_len=jt.raw_len(i), source=blob.name, offset=off,
                index=i))
        return b"".join(out)
    return decode


def decompress_file(src: str | os.PathLike, dst: str | os.PathLike, *, tar: bool | None = None) -> int:
    """Decompress the ZFile `src` (tar-wrapped or not: `tar=None` detects) into `dst`.
    Returns the decompressed size. Raises FormatError/ChecksumError naming src for bad input."""
    _check_same(src, dst)
    name = os.fspath(src)
    with _open_input(src) as fin:
        blob, _ = _unwrap(fin, name, tar)
        header, _, jt = _load(blob)
        decode = _decoder(blob, header, jt)
        with _atomic_output(dst) as fout:
            workers = _workers()
            with ThreadPoolExecutor(workers, thread_name_prefix="zfile-decompress") as pool:
                for data in _pipeline(iter(jt.plan_reads(range(jt.n_blocks), CHUNK)), decode, pool,
                                      depth=2 * workers):
                    fout.write(data)
            if fout.tell() != jt.original_size:  # cannot happen unless decode_block lied
                raise FormatError(f"decoded {fout.tell()} bytes, expected {jt.original_size}", source=name)
    return jt.original_size


@dataclass
class BadBlock:
    index: int
    offset: int
    error: str


@dataclass
class VerifyReport:
    """Result of `verify_file`; truthy when the file is valid."""

    path: str
    ok: bool
    error: str | None = None  # a failure before any block could be checked
    tar_payload: tuple[int, int] | None = None
    algorithm: str | None = None
    block_size: int | None = None
    blocks: int = 0
    original_size: int = 0
    crc: bool = False
    header_flags: int | None = None
    bad_blocks: list[BadBlock] = field(default_factory=list)

    max_bad_listed = 100

    def __bool__(self) -> bool:
        return self.ok

    def lines(self) -> list[str]:
        out = [f"{self.path}: {'valid' if self.ok else 'INVALID'}"]
        if self.error:
            out.append(f"  error: {self.error}")
        if self.tar_payload:
            out.append(f"  tar payload: {self.tar_payload[1]} bytes at {self.tar_payload[0]}")
        if self.algorithm:
            out.append(f"  {self.algorithm}, block size {self.block_size}, {self.blocks} blocks, "
                       f"original size {self.original_size}, per-block CRC {'on' if self.crc else 'off'}, "
                       f"header flags {self.header_flags:#x}")
        for b in self.bad_blocks:
            out.append(f"  bad block {b.index} at offset {b.offset}: {b.error}")
        return out


def verify_file(src: str | os.PathLike, *, tar: bool | None = None) -> VerifyReport:
    """Check everything: header/trailer digests, index CRC and bounds, and every block's CRC,
    decompression and size. Never raises for bad content; the report says what is wrong."""
    name = os.fspath(src)
    report = VerifyReport(name, ok=False)
    with _open_input(src) as fin:
        try:
            blob, payload = _unwrap(fin, name, tar)
            if payload:
                report.tar_payload = (payload.offset, payload.size)
            header, _, jt = _load(blob)
        except FormatError as e:
            report.error = str(e)
            return report
        report.algorithm = header.algorithm_name
        report.block_size = header.block_size
        report.blocks = jt.n_blocks
        report.original_size = jt.original_size
        report.crc = bool(header.verify)
        report.header_flags = header.flags
        bad_count = 0
        decode_one = _decoder(blob, header, jt)

        def check(batch: zf.ReadBatch) -> list[BadBlock]:
            try:
                decode_one(batch)
                return []
            except FormatError:
                pass
            bad = []  # find which blocks of the batch are bad
            for i in batch.blocks:
                off, ln = jt.block_range(i)
                try:
                    decode_one(zf.ReadBatch(off, ln, range(i, i + 1)))
                except FormatError as e:
                    bad.append(BadBlock(i, off, e.message))
            return bad

        workers = _workers()
        with ThreadPoolExecutor(workers, thread_name_prefix="zfile-verify") as pool:
            for bad in _pipeline(iter(jt.plan_reads(range(jt.n_blocks), CHUNK)), check, pool, 2 * workers):
                bad_count += len(bad)
                room = VerifyReport.max_bad_listed - len(report.bad_blocks)
                report.bad_blocks.extend(bad[:max(room, 0)])
        if bad_count > len(report.bad_blocks):
            report.error = f"{bad_count} bad blocks ({len(report.bad_blocks)} listed)"
        report.ok = bad_count == 0
    return report


# -- command line ---------------------------------------------------------------------------


def _handler(args: argparse.Namespace) -> int:
    if args.verify:
        report = verify_file(args.src, tar=True if args.tar else None)
        for line in report.lines():
            print(line)
        return 0 if report.ok else 1
    if args.dst is None:
        raise ZFileToolError("DST is required unless --verify")
    if args.extract:
        decompress_file(args.src, args.dst, tar=True if args.tar else None)
        return 0
    if args.bs not in BLOCK_SIZES_KB:
        raise ZFileToolError(f"--bs must be one of {', '.join(map(str, BLOCK_SIZES_KB))} (KiB)")
    compress_file(args.src, args.dst, algorithm=args.algorithm, block_size=args.bs * 1024, tar=args.tar,
                  verify=not args.no_crc, overwrite_header=args.overwrite_header)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "zfile",
        help="compress/decompress/verify a ZFile (like overlaybd-zfile)",
        description="Compress SRC into a ZFile at DST, or with -x decompress it, or with --verify check "
                    "every header, index and block CRC of SRC. Output is byte-identical to "
                    "overlaybd-zfile's for the same input.",
    )
    p.add_argument("--algorithm", choices=sorted(zf.ALGORITHMS), default="lz4", help="compression (default lz4)")
    p.add_argument("--bs", type=int, default=4, metavar="KB",
                   help="block size in KiB: 4, 8, 16, 32 or 64 (default 4)")
    p.add_argument("-t", "--tar", action="store_true",
                   help="tar-wrap the output (with -x/--verify: require a tar-wrapped input)")
    p.add_argument("-x", "--extract", action="store_true", help="decompress SRC into DST")
    p.add_argument("--verify", action="store_true", help="check SRC; exit 1 if it is invalid")
    p.add_argument("--no-crc", action="store_true", help="write no per-block CRC (upstream always writes one)")
    p.add_argument("--overwrite-header", action="store_true",
                   help="rewrite the header with the index info at the end, as overlaybd-commit -z does")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", nargs="?")
    p.set_defaults(func=_handler)
