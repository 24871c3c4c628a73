"""Layer tools: `create`, `commit` (and `--seal`) and `build`, the jobs of upstream's
overlaybd-create / overlaybd-commit, plus building a committed layer from a raw disk image."""

from __future__ import annotations

import argparse
import errno
import logging
import os
from pathlib import Path

from ..errors import FormatError, ObdError
from ..format import lsmt
from ..format.lsmt import HT_SIZE, SECTOR, Mapping
from ..image.writable import WritableLayer, wrap_committed_blob

log = logging.getLogger(__name__)

GIB = 1 << 30
BUILD_BLOCK = 4096  # `build` skips all-zero blocks of this size
BUILD_CHUNK = 4 << 20  # raw image is streamed in pieces of this size


class LayerToolError(ObdError):
    """A layer tool was asked for something it cannot do (bad argument, file exists, ...)."""


def register(subparsers) -> None:
    p = subparsers.add_parser("create", help="create a writable (RW) LSMT layer (overlaybd-create)")
    p.add_argument("-s", "--sparse", action="store_true", help="sparse RW layer (data file 1:1, no index log)")
    p.add_argument("-u", "--parent-uuid", dest="parent_uuid", help="parent layer uuid")
    p.add_argument("--uuid", help="uuid of the new layer (default: random)")
    p.add_argument("data", help="data file to create")
    p.add_argument("index", help="index file to create")
    p.add_argument("vsize_gb", type=int, metavar="VSIZE_GB", help="virtual size in GiB")
    p.set_defaults(func=cmd_create)

    p = subparsers.add_parser("commit", help="commit an RW layer into a read-only layer blob (overlaybd-commit)")
    _add_output_options(p)
    p.add_argument("--seal", action="store_true",
                   help="seal in place: append index + trailer to DATA (OUT is not used)")
    p.add_argument("data", help="RW data file")
    p.add_argument("index", help="RW index file")
    p.add_argument("out", nargs="?", help="committed layer to write (must not exist)")
    p.set_defaults(func=cmd_commit)

    p = subparsers.add_parser("build", help="build a committed layer from a raw disk image (zero blocks skipped)")
    _add_output_options(p)
    p.add_argument("raw", help="raw disk image")
    p.add_argument("out", help="committed layer to write (must not exist)")
    p.set_defaults(func=cmd_build)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-z", dest="compress", action="store_true", help="compress the layer into a zfile")
    p.add_argument("--algorithm", choices=("lz4", "zstd"), help="zfile algorithm (with -z; default lz4)")
    p.add_argument("--bs", type=int, metavar="KB", help="zfile block size in KiB: 4/8/16/32/64 (with -z; default 4)")
    p.add_argument("-t", dest="tar", action="store_true", help="wrap the output in a tar (overlaybd.commit)")
    p.add_argument("--uuid", help="uuid of the committed layer (default: the null uuid, as upstream)")
    p.add_argument("-p", "--parent-uuid", dest="parent_uuid", help="parent uuid (default: the RW layer's)")
    p.add_argument("-m", dest="message", default="", help="commit message (user tag, at most 256 bytes)")


def _output_codec(args) -> tuple[str | None, int]:
    if not args.compress:
        if args.algorithm or args.bs:
            log.warning("--algorithm and --bs are ignored without -z")
        return None, 4096
    bs = 4 if args.bs is None else args.bs
    if bs not in (4, 8, 16, 32, 64):
        raise LayerToolError(f"invalid --bs {bs} (must be 4, 8, 16, 32 or 64)")
    return args.algorithm or "lz4", bs * 1024


def _uuid_arg(value: str | None, what: str) -> str | None:
    if not value:
        return None
    if not lsmt.is_valid_uuid(value):
        raise LayerToolError(f"invalid {what} {value!r}")
    return value


def _message(args) -> bytes:
    tag = (args.message or "").encode()
    if len(tag) > lsmt.USER_TAG_SIZE:
        raise LayerToolError(f"commit message too long ({len(tag)} > {lsmt.USER_TAG_SIZE} bytes)")
    return tag


def _os_error(e: OSError) -> LayerToolError:
    return LayerToolError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))


def cmd_create(args) -> int:
    if args.vsize_gb < 0:
        raise LayerToolError("VSIZE_GB must not be negative")
    uuid = _uuid_arg(args.uuid, "uuid")
    parent = _uuid_arg(args.parent_uuid, "parent uuid")
    try:
        layer = WritableLayer.create(args.data, args.index, args.vsize_gb * GIB, sparse=args.sparse,
                                     uuid=uuid, parent_uuid=parent)
    except FileExistsError as e:
        raise LayerToolError(f"{e.filename}: already exists") from e
    except OSError as e:
        raise _os_error(e) from e
    layer.close()
    print(f"created {'sparse ' if args.sparse else ''}RW layer {layer.uuid}: {args.data} {args.index}")
    return 0


def cmd_commit(args) -> int:
    try:
        if args.seal:
            layer = WritableLayer.open(args.data, args.index)
            try:
                layer.seal()
            finally:
                layer.close()
            print(f"sealed {args.data}")
            return 0
        if not args.out:
            raise LayerToolError("OUT is required (unless --seal)")
        algorithm, block_size = _output_codec(args)
        uuid = _uuid_arg(args.uuid, "uuid")
        parent = _uuid_arg(args.parent_uuid, "parent uuid")
        tag = _message(args)
        layer = WritableLayer.open(args.data, args.index, read_only=True)
        try:
            layer.commit(args.out, uuid=uuid, parent_uuid=parent, user_tag=tag, algorithm=algorithm,
                         block_size=block_size, tar=args.tar)
        finally:
            layer.close()
    except FileExistsError as e:
        raise LayerToolError(f"{e.filename}: already exists") from e
    except OSError as e:
        raise _os_error(e) from e
    except ValueError as e:
        raise LayerToolError(str(e)) from e
    print(f"committed {args.data} -> {args.out}")
    return 0


def cmd_build(args) -> int:
    algorithm, block_size = _output_codec(args)
    uuid = _uuid_arg(args.uuid, "uuid")
    parent = _uuid_arg(args.parent_uuid, "parent uuid")
    tag = _message(args)
    try:
        build_layer_from_raw(args.raw, args.out, uuid=uuid, parent_uuid=parent, user_tag=tag,
                             algorithm=algorithm, block_size=block_size, tar=args.tar)
    except FileExistsError as e:
        raise LayerToolError(f"{e.filename}: already exists") from e
    except OSError as e:
        raise _os_error(e) from e
    print(f"built {args.raw} -> {args.out}")
    return 0


def build_layer_from_raw(raw_path: str | os.PathLike, out_path: str | os.PathLike, *, uuid: str | None = None,
                         parent_uuid: str | None = None, user_tag: bytes | str = b"",
                         algorithm: str | None = None, block_size: int = 4096, tar: bool = False) -> None:
    """Committed layer whose disk equals the raw image (virtual size = raw size rounded up to
    512); all-zero 4 KiB blocks get no mapping. One streaming pass: non-zero blocks are
    written as they are found, in offset order, which is exactly where compaction puts them."""
    raw_path, out_path = Path(raw_path), Path(out_path)
    if out_path.exists():
        raise FileExistsError(errno.EEXIST, "already exists", str(out_path))
    wrapped = algorithm is not None or tar
    dest = out_path.with_name(f".{out_path.name}.{os.getpid()}.lsmt.tmp") if wrapped else out_path
    try:
        with open(raw_path, "rb", buffering=0) as src:
            # lseek rather than fstat: a block device reports st_size 0
            raw_size = os.lseek(src.fileno(), 0, os.SEEK_END)
            vsize = -(-raw_size // SECTOR) * SECTOR
            header = lsmt.build_header_trailer(flags=lsmt.FLAGS_COMMITTED_HEADER, virtual_size=vsize, uuid=uuid,
                                               parent_uuid=parent_uuid, user_tag=user_tag)
            with open(dest, "xb") as out:
                try:
                    out.write(header)
                    maps = _stream_nonzero_blocks(src, out, raw_size)
                    plan = lsmt.plan_commit(maps)
                    if plan.data_sectors * SECTOR + HT_SIZE != out.tell():
                        raise FormatError("raw image changed while building", source=str(raw_path))
                    _, index, trailer = lsmt.build_committed_layer_parts(
                        plan, virtual_size=vsize, uuid=uuid, parent_uuid=parent_uuid, user_tag=user_tag)
                    out.write(index)
                    out.write(trailer)
                except BaseException:
                    out.close()
                    dest.unlink()
                    raise
        if wrapped:
            wrap_committed_blob(dest, out_path, algorithm=algorithm, block_size=block_size, tar=tar)
    finally:
        if wrapped and dest.exists():
            dest.unlink()


def _read_full(f, n: int) -> bytes:
    parts = []
    while n > 0:
        b = f.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def _stream_nonzero_blocks(src, out, raw_size: int) -> list[Mapping]:
    """Copy non-zero BUILD_BLOCK blocks of src to out; return their mappings (moffset = where
    they landed in out, sectors)."""
    zero_chunk = bytes(BUILD_CHUNK)
    zero_block = memoryview(zero_chunk)[:BUILD_BLOCK]
    maps: list[Mapping] = []
    run_start = -1  # first sector of the current run of non-zero data
    run_len = 0
    cursor = lsmt.DATA_START_SECTOR
    pos = 0

    def flush_run() -> None:
        nonlocal run_start, run_len, cursor
        if run_len:
            maps.extend(lsmt.split_extent(run_start, run_len, cursor))
            cursor += run_len
        run_start, run_len = -1, 0

    fd = src.fileno()
    while pos < raw_size:
        # Holes of a sparse raw image read as zeros: skip them without reading.
        try:
            data_at = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # nothing but a hole up to EOF
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data_at = pos  # no hole information: read everything
        data_at -= data_at % BUILD_BLOCK
        if data_at > pos:
            flush_run()
            pos = data_at
        src.seek(pos)
        buf = _read_full(src, min(BUILD_CHUNK, raw_size - pos))
        if not buf:
            raise FormatError(f"raw image shorter than its size ({pos} of {raw_size} bytes)")
        if len(buf) % SECTOR:
            buf += bytes(SECTOR - len(buf) % SECTOR)  # last partial sector reads as zeros
        if buf == zero_chunk[: len(buf)]:
            flush_run()
            pos += len(buf)
            continue
        mv = memoryview(buf)
        for i in range(0, len(buf), BUILD_BLOCK):
            block = mv[i: i + BUILD_BLOCK]
            if block == zero_block[: len(block)]:
                flush_run()
                continue
            sector = (pos + i) // SECTOR
            if run_len == 0:
                run_start = sector
            out.write(block)
            run_len += len(block) // SECTOR
        pos += len(buf)
    flush_run()
    return maps
