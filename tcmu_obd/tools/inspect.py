"""`tcmu-obd inspect BLOB [--json]`: what a layer blob is made of."""

from __future__ import annotations

import asyncio
import json

from ..format import lsmt
from ..image.layers import open_committed_layer
from ..image.source import FileSource


def register(sub) -> None:
    p = sub.add_parser("inspect", help="describe a layer blob: wrapping, sizes, uuids, index, codec")
    p.add_argument("blob", help="layer blob (LSMT, ZFile, tar-wrapped, or sealed)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_main)


async def describe(path: str) -> dict:
    src = FileSource(path)
    layer = await open_committed_layer(src)
    try:
        maps = layer.mappings
        zeroed = sum(1 for m in maps if m.zeroed)
        info: dict = {
            "path": path,
            "blob_size": src.size,
            "wrapping": layer.unwrapped.wrapping,
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
        }
        if layer.unwrapped.tar_payload:
            off, size = layer.unwrapped.tar_payload
            info["tar"] = {"payload_offset": off, "payload_size": size}
        z = layer.unwrapped.zfile
        if z is not None:
            h = z.header
            info["zfile"] = {
                "algorithm": {1: "lz4", 2: "zstd"}.get(h.algo, str(h.algo)),
                "block_size": h.block_size,
                "blocks": z.jump_table.n_blocks,
                "original_size": h.original_file_size,
                "crc": bool(h.verify),
                "digest": bool(h.has_digest),
                "header_overwrite": bool(h.header_overwrite),
                "compressed_size": layer.unwrapped.tar_payload[1] if layer.unwrapped.tar_payload else src.size,
            }
        return info
    finally:
        await layer.aclose()


def _text(tag) -> str:
    if isinstance(tag, bytes):
        return tag.split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(tag).split("\0", 1)[0]


def _main(args) -> int:
    info = asyncio.run(describe(args.blob))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: {' → '.join(info['wrapping'])}, {info['blob_size']} bytes")
    if "tar" in info:
        print(f"  tar:   payload {info['tar']['payload_size']} bytes at {info['tar']['payload_offset']}")
    if "zfile" in info:
        z = info["zfile"]
        print(f"  zfile: {z['algorithm']}, {z['block_size'] // 1024} KiB blocks × {z['blocks']}, "
              f"original {z['original_size']} bytes, crc {'on' if z['crc'] else 'off'}, "
              f"digest {'on' if z['digest'] else 'off'}")
    m = info["lsmt"]
    print(f"  lsmt:  virtual size {m['virtual_size']} bytes, uuid {m['uuid']}, parent {m['parent_uuid']}")
    print(f"         index {m['valid_entries']} entries (+{m['padding_entries']} padding, "
          f"{m['zeroed_entries']} zeroed), data {m['data_bytes']} bytes, flags {m['header_flags']}/{m['trailer_flags']}")
    if m["user_tag"]:
        print(f"         tag: {m['user_tag']}")
    return 0
