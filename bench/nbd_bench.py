#!/usr/bin/env python3
"""NBD benchmark: `tcmu-obd serve` vs nbdkit's C `file` plugin, same bytes.

Our server is measured three ways: serving the raw file itself (`--raw`, the frontend
alone), and serving overlaybd images built from that raw file with `tcmu-obd build` — a
plain LSMT layer and a ZFile-zstd layer — which is what users serve.

    .venv/bin/python bench/nbd_bench.py [--size-mib 512] [--repeat 3] [--json out.json]

Measures, for each server, warm (page cache) reads of the same raw file:
- whole-device sequential read with `nbdcopy URI null:` (its default: 4 connections
  when the server offers multi-conn, 64 requests in flight each, 256 KiB requests);
- 4 KiB read IOPS with `qemu-img bench -t none -s 4k -d 32` and a large odd step
  (-S), which scatters reads across the device.
Best of --repeat runs after one untimed warm-up each.  Prints a table and writes JSON.
Needs nbdkit, nbdcopy (libnbd-bin) and qemu-img (qemu-utils).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def make_data(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        for i in range(size // len(block)):
            # vary each block cheaply so nothing is trivially compressible or dedupable
            f.write(i.to_bytes(8, "little") + block[8:])


def wait_socket(path: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Poll (benchmark harness only) until an NBD client can connect."""
    deadline = time.monotonic() + timeout
    uri = f"nbd+unix:///?socket={path}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        if os.path.exists(path) and subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{path}: server did not start")


def start_ours(data: Path, sock: str) -> subprocess.Popen:
    what = ["--raw", str(data)] if data.suffix == ".raw" else [str(data)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcmu_obd.tools.serve", *what, "--read-only", "--nbd", f"unix:{sock}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"tcmu-obd serve did not start: {line!r}")
    return proc


def start_nbdkit(data: Path, sock: str) -> subprocess.Popen:
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-r", "-U", sock, "file", str(data)])
    wait_socket(sock, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_nbdcopy(uri: str, repeat: int, warm: bool = True) -> float:
    if warm:
        subprocess.run(["nbdcopy", uri, "null:"], check=True)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", uri, "null:"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def iops_qemu_bench(uri: str, count: int, size: int, repeat: int) -> float:
    step = 1024 * 1024 + 4096 * 37  # odd stride: scattered 4 KiB reads
    cmd = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-s", "4096", "-d", "32", "-c", str(count), "-S", str(step), uri]
    subprocess.run(cmd, check=True, capture_output=True)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        m = re.search(r"Run completed in ([0-9.]+) seconds", out)
        if not m:
            raise RuntimeError(f"unexpected qemu-img bench output: {out!r}")
        best = min(best, float(m.group(1)))
    return count / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--iops-count", type=int, default=20000)
    ap.add_argument("--workdir", default=None, help="where the raw data file lives (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write results here too")
    args = ap.parse_args(argv)
    for tool in ("nbdkit", "nbdcopy", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"nbd_bench: {tool} not found", file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        data = work / f"bench-{args.size_mib}M.raw"
        size = args.size_mib * MiB
        make_data(data, size)
        configs = {}
        for name, flags in (("tcmu-obd lsmt", []), ("tcmu-obd zstd", ["-z", "--algorithm", "zstd"])):
            layer = Path(tmp) / f"layer-{name.split()[1]}"
            subprocess.run([str(REPO / ".venv" / "bin" / "tcmu-obd"), "build", *flags, str(data), str(layer)],
                           check=True, capture_output=True)
            configs[name] = Path(tmp) / f"{name.split()[1]}.config.json"
            configs[name].write_text(json.dumps({"lowers": [{"file": str(layer)}]}))
        servers = {}
        try:
            for name, start, what in (("tcmu-obd", start_ours, data), ("tcmu-obd lsmt", start_ours, configs["tcmu-obd lsmt"]),
                                      ("tcmu-obd zstd", start_ours, configs["tcmu-obd zstd"]),
                                      ("nbdkit-file", start_nbdkit, data)):
                sock = str(Path(tmp) / f"{name.replace(' ', '-')}.sock")
                servers[name] = (start(what, sock), f"nbd+unix:///?socket={sock}")
            # Interleaved (ours, theirs, ours, ...) and best-of, so load from other
            # processes on the machine hits both sides alike.
            secs = {name: float("inf") for name in servers}
            cpu = {name: 0.0 for name in servers}
            iops = {name: 0.0 for name in servers}
            for name, (_, uri) in servers.items():
                time_nbdcopy(uri, 0)  # warm-up (page cache, server pools)
            for _ in range(args.repeat):
                for name, (proc, uri) in servers.items():
                    c0 = cpu_seconds(proc.pid)
                    secs[name] = min(secs[name], time_nbdcopy(uri, 1, warm=False))
                    cpu[name] += cpu_seconds(proc.pid) - c0
            for _ in range(args.repeat):
                for name, (_, uri) in servers.items():
                    iops[name] = max(iops[name], iops_qemu_bench(uri, args.iops_count, size, 1))
        finally:
            for proc, _ in servers.values():
                stop(proc)
        results = {
            name: {
                "nbdcopy_seconds": secs[name],
                "nbdcopy_MiB_per_s": size / MiB / secs[name],
                # server CPU (user+sys, all threads) per GiB copied: independent of load
                "server_cpu_s_per_GiB": cpu[name] / (args.repeat * size / (1 << 30)),
                "read4k_iops": iops[name],
            }
            for name in servers
        }

    ours, ref = results["tcmu-obd"], results["nbdkit-file"]
    image_ratios = {
        name: {"nbdcopy": r["nbdcopy_MiB_per_s"] / ref["nbdcopy_MiB_per_s"], "read4k_iops": r["read4k_iops"] / ref["read4k_iops"]}
        for name, r in results.items() if name.startswith("tcmu-obd ")
    }
    summary = {
        "size_bytes": size,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "results": results,
        "ratio_nbdcopy_throughput": ours["nbdcopy_MiB_per_s"] / ref["nbdcopy_MiB_per_s"],
        "ratio_read4k_iops": ours["read4k_iops"] / ref["read4k_iops"],
        "ratio_server_cpu_per_GiB": ours["server_cpu_s_per_GiB"] / ref["server_cpu_s_per_GiB"],
        "loadavg_1min": os.getloadavg()[0],
        "goal_nbdcopy_ratio": 0.5,
        "image_ratios": image_ratios,
    }
    summary["goal_met"] = all(r["nbdcopy"] >= summary["goal_nbdcopy_ratio"] for r in image_ratios.values())
    print(f"{'server':<16}{'nbdcopy MiB/s':>14}{'CPU s/GiB':>12}{'4k read IOPS':>16}")
    for name, r in results.items():
        print(f"{name:<16}{r['nbdcopy_MiB_per_s']:>14.0f}{r['server_cpu_s_per_GiB']:>12.2f}{r['read4k_iops']:>16.0f}")
    for name, r in [("tcmu-obd (raw)", {"nbdcopy": summary["ratio_nbdcopy_throughput"],
                                        "read4k_iops": summary["ratio_read4k_iops"]}), *image_ratios.items()]:
        print(f"{'ratio ' + name:<28}{r['nbdcopy']:>6.2f}{'':>12}{r['read4k_iops']:>10.2f}")
    print(f"(goal: overlaybd images nbdcopy >= 0.5 x nbdkit: {'met' if summary['goal_met'] else 'MISSED'};"
          f" load average {summary['loadavg_1min']:.1f} on {os.cpu_count()} CPUs)")
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
