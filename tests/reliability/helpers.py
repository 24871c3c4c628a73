"""Shared pieces of the reliability tests: blobs, configs, the `fetch` CLI as a subprocess."""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

from tcmu_obd.cache import PresenceMap
from tcmu_obd.format import zfile as zf

DONE = re.compile(r"^fetch: done blobs=(\d+) fetched_bytes=(\d+) requests=(\d+)", re.M)


def zfile_raw(raw_mib: int, seed: int) -> bytes:
    """`raw_mib` MiB that compress to ~3/4: each 4 KiB is 3 KiB of noise and 1 KiB of zeros."""
    r = random.Random(seed)
    return b"".join(r.randbytes(3072) + bytes(1024) for _ in range(raw_mib * 256))


def zfile_blob(raw_mib: int, seed: int) -> bytes:
    """A ZFile (lz4, 4 KiB blocks, per-block CRC) of zfile_raw(raw_mib, seed)."""
    return zf.compress_bytes(zfile_raw(raw_mib, seed), "lz4", 4096, verify=True)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_configs(tmp_path: Path, repo_blob_url: str, blobs: list[tuple[str, int]]) -> tuple[Path, Path]:
    """overlaybd.json (file cache under tmp_path) and a config.v1.json whose lowers are the
    given (digest, size) blobs, each with a layer dir (so a verified blob ends as
    <dir>/overlaybd.commit)."""
    gconf = tmp_path / "overlaybd.json"
    gconf.write_text(json.dumps({
        "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"), "cacheSizeGB": 1},
        "credentialConfig": {"mode": "file", "path": str(tmp_path / "cred.json")},
        "enableAudit": False,
    }))
    lowers = []
    for i, (digest, size) in enumerate(blobs):
        d = tmp_path / f"layer{i}"
        d.mkdir(exist_ok=True)
        lowers.append({"digest": digest, "size": size, "dir": str(d)})
    conf = tmp_path / "config.v1.json"
    conf.write_text(json.dumps({"repoBlobUrl": repo_blob_url, "lowers": lowers}))
    return gconf, conf


def fetch_cmd(gconf: Path, conf: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tcmu_obd.cli", "fetch", "--global-config", str(gconf), "--progress", "plain",
            "--interval", "0.2", *extra, str(conf)]


def durable_bytes(map_path: Path, size: int) -> int:
    """Bytes the durable presence map says are on disk (0 before it exists)."""
    m = PresenceMap.load(str(map_path), size)
    return m.present_bytes if m is not None else 0
