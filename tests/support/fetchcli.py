"""`tcmu-obd fetch` in tests: configs for a list of remote blobs, the command line, its final line."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DONE = re.compile(r"^fetch: done blobs=(\d+) fetched_bytes=(\d+) requests=(\d+)", re.M)


def write_configs(tmp_path: Path, repo_blob_url: str, blobs: list[tuple[str, int]],
                  **global_extra) -> tuple[Path, Path]:
    """overlaybd.json (file cache under tmp_path, plus `global_extra` keys) and a config.v1.json
    whose lowers are the given (digest, size) blobs, each with a layer dir (so a verified blob
    ends as <dir>/overlaybd.commit)."""
    gconf = tmp_path / "overlaybd.json"
    gconf.write_text(json.dumps({
        "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"), "cacheSizeGB": 1},
        "credentialConfig": {"mode": "file", "path": str(tmp_path / "cred.json")},
        "enableAudit": False,
        **global_extra,
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
