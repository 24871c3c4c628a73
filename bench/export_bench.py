#!/usr/bin/env python3
"""Export throughput of compressed layers: MB/s of decompressed data and CPU seconds per GB.

Builds a raw disk image of mixed content (incompressible, compressible text-like, and zero
runs), turns it into committed layers with the project's writer (plain LSMT, ZFile lz4 and
zstd), then runs `tcmu-obd export` on each in a child process and reads its CPU time from
the kernel (RUSAGE_CHILDREN). Decompressed bytes = the layer's mapped data bytes.

    .venv/bin/python bench/export_bench.py [--size-mib 512] [--out bench/export-results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TCMU_OBD = str(REPO / ".venv" / "bin" / "tcmu-obd")


def make_raw(path: Path, size: int) -> None:
    rnd = random.Random(20261128)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 10))) for _ in range(4000)]
    chunk = 1 << 20
    with open(path, "wb") as f:
        for i in range(size // chunk):
            kind = i % 4
            if kind == 0:
                f.write(rnd.randbytes(chunk))  # incompressible (binaries, compressed files)
            elif kind in (1, 2):
                text = b" ".join(rnd.choice(words) for _ in range(chunk // 5))
                f.write((text + b"\n" * chunk)[:chunk])  # text-like, compresses ~3x
            else:
                f.seek(chunk, os.SEEK_CUR)  # free space: never mapped
        f.truncate(size)


def run_export(config: Path, out: Path) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    subprocess.run([TCMU_OBD, "export", "--no-progress", str(config), str(out)], check=True)
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--out", default=str(REPO / "bench" / "export-results.json"))
    args = ap.parse_args()
    size = args.size_mib << 20
    rows = []
    with tempfile.TemporaryDirectory(prefix="obd-export-bench-") as tmp:
        tmp = Path(tmp)
        raw = tmp / "disk.raw"
        make_raw(raw, size)
        for name, flags in [("lsmt", []), ("lz4", ["-z", "--algorithm", "lz4"]), ("zstd", ["-z", "--algorithm", "zstd"])]:
            layer = tmp / f"layer.{name}"
            subprocess.run([TCMU_OBD, "build", *flags, str(raw), str(layer)], check=True)
            info = json.loads(subprocess.run([TCMU_OBD, "inspect", "--json", str(layer)], check=True,
                                             capture_output=True, text=True).stdout)
            data_bytes = info["lsmt"]["data_bytes"]
            config = tmp / f"{name}.json"
            config.write_text(json.dumps({"lowers": [{"file": str(layer)}]}))
            out = tmp / f"out.{name}.raw"
            wall, cpu = run_export(config, out)
            same = subprocess.run(["cmp", str(raw), str(out)]).returncode == 0
            out.unlink()
            gb = data_bytes / 1e9
            rows.append({
                "layer": name, "blob_bytes": layer.stat().st_size, "data_bytes": data_bytes,
                "export_s": round(wall, 2), "MBps_decompressed": round(data_bytes / 1e6 / wall, 1),
                "cpu_s": round(cpu, 2), "cpu_s_per_GB": round(cpu / gb, 2), "bit_exact": same,
            })
            print(f"{name:5s} blob {layer.stat().st_size / 1e6:7.1f} MB  data {data_bytes / 1e6:7.1f} MB  "
                  f"export {wall:6.2f} s  {data_bytes / 1e6 / wall:7.1f} MB/s  "
                  f"{cpu / gb:5.2f} CPU-s/GB  bit-exact {same}", flush=True)
    result = {"virtual_size": size, "cpus": os.cpu_count(), "python": sys.version.split()[0], "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
