"""`tcmu-obd inspect BLOB [--json]`: what a layer blob is made of."""

from __future__ import annotations

import asyncio
import json

from ..errors import FormatError
from ..format import lsmt
from ..image.layers import open_committed_layer, unwrap
from ..image.source import FileSource


def register(sub) -> None:
    p = sub.add_parser("inspect", help="describe a layer blob: wrapping, sizes, uuids, index, codec")
    p.add_argument("blob", help="layer blob (LSMT, ZFile, tar-wrapped, or sealed)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_main)


async def describe(path: str) -> dict:
    try:
        layer = await open_committed_layer(FileSource(path))
    except FormatError as e:
        # A ZFile or tar of something other than an LSMT layer (e.g. an `overlaybd-zfile`
        # of a plain file) is still worth describing; anything else is not a blob we know.
        unwrapped = await unwrap(FileSource(path))
        try:
            if unwrapped.tar_payload is None and unwrapped.zfile is None:
                raise
            info = _wrapping_info(path, unwrapped, unwrapped.outer.size)
            info["wrapping"] = info["wrapping"][:-1]  # what is inside is not LSMT
            info["payload"] = {"size": unwrapped.source.size, "lsmt": False, "note": e.message}
            return info
        finally:
            await unwrapped.source.aclose()
    src = layer.unwrapped.outer
    try:
        maps = layer.mappings
        zeroed = sum(1 for m in maps if m.zeroed)
        info = _wrapping_info(path, layer.unwrapped, src.size)
        info.update({
            "lsmt": {
                "size": layer.source.size,
                "virtual_size": layer.virtual_size,
                "uuid": layer.trailer.uuid or layer.header.uuid,
                "parent_uuid": layer.trailer.parent_uuid or layer.header.parent_uuid,
                "version": f"{layer.header.version}.{layer.header.sub_version}",
                "header_flags": layer.header.flags,
                "trailer_flags": layer.trailer.flags,
                "user_tag": _text(layer.header.user_tag),
                "index_offset": layer.index_offset,
                "index_entries": layer.raw_index_entries,
                "valid_entries": len(maps),
                "padding_entries": layer.raw_index_entries - len(maps),
                "zeroed_entries": zeroed,
                "data_bytes": sum(m.length for m in maps if not m.zeroed) * lsmt.SECTOR,
                "zeroed_bytes": sum(m.length for m in maps if m.zeroed) * lsmt.SECTOR,
                "max_entry_sectors": max((m.length for m in maps), default=0),
            },
        })
        return info
    finally:
        await layer.aclose()


def _wrapping_info(path: str, unwrapped, blob_size: int) -> dict:
    info: dict = {"path": path, "blob_size": blob_size, "wrapping": unwrapped.wrapping}
    if unwrapped.tar_payload:
        off, size = unwrapped.tar_payload
        info["tar"] = {"payload_offset": off, "payload_size": size}
    z = unwrapped.zfile
    if z is not None:
        h = z.header
        info["zfile"] = {
            "algorithm": {1: "lz4", 2: "zstd"}.get(h.algo, str(h.algo)),
            "block_size": h.block_size,
            "blocks": z.jump_table.n_blocks,
            "original_size": z.size,
            "crc": bool(h.verify),
            "digest": bool(h.has_digest),
            "header_overwrite": bool(h.header_overwrite),
            "compressed_size": unwrapped.tar_payload[1] if unwrapped.tar_payload else blob_size,
        }
    return info


def _text(tag) -> str:
    if isinstance(tag, bytes):
        return tag.split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(tag).split("\0", 1)[0]


def _main(args) -> int:
    info = asyncio.run(describe(args.blob))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    wrapping = info["wrapping"] if "lsmt" in info else info["wrapping"] + ["(not LSMT)"]
    print(f"{info['path']}: {' → '.join(wrapping)}, {info['blob_size']} bytes")
    if "tar" in info:
        print(f"  tar:   payload {info['tar']['payload_size']} bytes at {info['tar']['payload_offset']}")
    if "zfile" in info:
        z = info["zfile"]
        print(f"  zfile: {z['algorithm']}, {z['block_size'] // 1024} KiB blocks × {z['blocks']}, "
              f"original {z['original_size']} bytes, crc {'on' if z['crc'] else 'off'}, "
              f"digest {'on' if z['digest'] else 'off'}")
    if "lsmt" not in info:
        print(f"  payload: {info['payload']['size']} bytes, not an LSMT layer ({info['payload']['note']})")
        return 0
    m = info["lsmt"]
    print(f"  lsmt:  virtual size {m['virtual_size']} bytes, uuid {m['uuid']}, parent {m['parent_uuid']}")
    print(f"         index {m['valid_entries']} entries (+{m['padding_entries']} padding, "
          f"{m['zeroed_entries']} zeroed), data {m['data_bytes']} bytes, flags {m['header_flags']}/{m['trailer_flags']}")
    if m["user_tag"]:
        print(f"         tag: {m['user_tag']}")
    return 0
