"""Host side of the VM rig: build it, prepare the scratch dir, boot the guest test, read results.

Usable from pytest (tests/vm/test_vm.py) and by hand:

    .venv/bin/python tests/vm/rig.py            # build if needed, boot once, print results
    .venv/bin/python tests/vm/rig.py --build    # only build the rig (kernel + initramfs)

Layout (all under RIG_DIR, default <repo>/rig, git-ignored, cached between runs):
    kernel/ vmlinux initramfs.img      from build-rig.sh
    scratch/                           shared with the guest (9p, writable, same path)
        backing.raw                    64 MiB random (tcmu-runner baseline), kept
        L12.raw                        raw export of the L12 image (runner benchmark), kept
        expected.env expected-L12.*    expectations written from expected.json each run
        rw/                            fresh writable upper each run
        results.json results.jsonl bench.json console.log logs/   outputs of the last run
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RIG_DIR = Path(os.environ.get("RIG_DIR", REPO / "rig")).resolve()
SCRATCH = RIG_DIR / "scratch"
VENV_BIN = REPO / ".venv" / "bin"
OBD = VENV_BIN / "tcmu-obd"

sys.path.insert(0, str(REPO))
from tests.support.paths import FIXTURES_OBD  # noqa: E402

BACKING_SIZE = 64 << 20
RW_VSIZE_GB = 1
VM_TIMEOUT = int(os.environ.get("RIG_VM_TIMEOUT", "780"))  # hard qemu limit, seconds
BENCH_RAND_SECS = int(os.environ.get("RIG_BENCH_RAND_SECS", "5"))

L12_CONFIG = FIXTURES_OBD / "ext4-chain/configs/L12.zstd.zfile.config.v1.json"
P12_CONFIG = FIXTURES_OBD / "pattern/configs/p12.lz4.zfile.config.v1.json"
P1_LAYER = FIXTURES_OBD / "pattern/layers/P1.lz4.zfile"

RUN_OUTPUTS = ("results.json", "results.jsonl", "bench.json", "console.log", "guest-rc", "pycache.tar",
               "logs", "rw", "L12.raw.tmp", "expected.env")


class RigError(RuntimeError):
    """The rig could not be built or booted (not a test failure of the product)."""


def _sha256_file(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def build_rig() -> None:
    """Run build-rig.sh (idempotent; downloads the kernel .deb on first use)."""
    p = subprocess.run([str(HERE / "build-rig.sh"), str(RIG_DIR)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RigError(f"tests/vm/build-rig.sh failed (rc={p.returncode}):\n{p.stderr[-3000:]}")


def _write_pyc_tar(dest: Path) -> None:
    """Byte-compile tcmu_obd on the host into a tar of `<abs path>/__pycache__/*.pyc`.

    The host runs with PYTHONDONTWRITEBYTECODE=1, so the package has no .pyc; compiling ~60
    modules in the guest costs ~10 s per cold Python start under TCG. The guest untars this
    onto its tmpfs overlay (never into the host tree). Timestamp-validated like any .pyc, so
    a stale one is simply ignored.
    """
    import importlib.util
    import py_compile
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp, tarfile.open(dest.with_suffix(".tmp"), "w") as tar:
        for src in sorted((REPO / "tcmu_obd").rglob("*.py")):
            cache = Path(importlib.util.cache_from_source(str(src)))
            out = Path(tmp) / cache.relative_to("/")
            try:
                py_compile.compile(str(src), cfile=str(out), dfile=str(src), doraise=True)
            except py_compile.PyCompileError:
                continue  # a file being edited right now: the guest compiles it itself
            tar.add(out, arcname=str(cache.relative_to("/")))
    dest.with_suffix(".tmp").rename(dest)


def _session_lock():
    RIG_DIR.mkdir(parents=True, exist_ok=True)
    f = open(RIG_DIR / "session.lock", "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def prepare_scratch() -> dict:
    """Write the guest's inputs into the scratch dir. Returns notes about what was skipped."""
    notes: dict[str, str] = {}
    SCRATCH.mkdir(parents=True, exist_ok=True)
    for name in RUN_OUTPUTS:
        p = SCRATCH / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    expected = json.loads((FIXTURES_OBD / "expected.json").read_text())
    l12 = expected["ext4-chain"]["images"]["L12"]
    p12 = expected["pattern"]["images"]["p12"]
    p1 = expected["pattern"]["images"]["p1"]

    backing = SCRATCH / "backing.raw"
    sha_file = SCRATCH / "backing.sha256"
    if not backing.exists() or backing.stat().st_size != BACKING_SIZE or not sha_file.exists():
        with open(backing, "wb") as f:
            f.write(os.urandom(BACKING_SIZE))
        sha_file.write_text(_sha256_file(backing) + "\n")
    backing_sha = sha_file.read_text().split()[0]

    # raw bytes of L12 for tcmu-runner's side of the benchmark (cached, verified)
    raw = SCRATCH / "L12.raw"
    raw_ok = SCRATCH / "L12.raw.sha256"  # "<sha256> <md5>" once verified
    if raw.exists() and not (raw_ok.exists() and raw_ok.read_text().split()[0] == l12["raw_sha256"]):
        if _sha256_file(raw) == l12["raw_sha256"]:
            raw_ok.write_text(f"{l12['raw_sha256']} {_sha256_file(raw, 'md5')}\n")
        else:
            raw.unlink()
    if not raw.exists():
        p = subprocess.run([str(OBD), "export", "--no-progress", str(L12_CONFIG), str(raw)],
                           capture_output=True, text=True, timeout=300)
        if p.returncode == 0 and raw.exists() and _sha256_file(raw) == l12["raw_sha256"]:
            raw_ok.write_text(f"{l12['raw_sha256']} {_sha256_file(raw, 'md5')}\n")
        else:
            raw.unlink(missing_ok=True)
            notes["L12.raw"] = ("tcmu-obd export failed on the host; the guest makes the copy from "
                                f"its own LUN: {(p.stderr or '').strip()[-300:]}")

    try:
        _write_pyc_tar(SCRATCH / "pycache.tar")
    except Exception as e:  # noqa: BLE001 - an optimisation only
        notes["pycache"] = f"no precompiled tcmu_obd: {e}"

    # ext4 expectations as sha256sum -c input
    (SCRATCH / "expected-L12.sha256").write_text(
        "".join(f"{v['sha256']}  .{path}\n" for path, v in sorted(l12["files"].items())))
    (SCRATCH / "expected-L12.absent").write_text("".join(f"{p}\n" for p in l12.get("absent", [])))
    (SCRATCH / "expected-L12.symlinks").write_text(
        "".join(f"{p} {t}\n" for p, t in sorted(l12.get("symlinks", {}).items())))

    # writable upper: fresh each run
    rw = SCRATCH / "rw"
    rw.mkdir()
    chunk = os.urandom(1 << 20)
    (rw / "chunk.bin").write_bytes(chunk)
    p = subprocess.run([str(OBD), "create", str(rw / "upper.data"), str(rw / "upper.index"), str(RW_VSIZE_GB)],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        reason = f"tcmu-obd create failed (rc={p.returncode}): {(p.stderr or p.stdout).strip()[-300:]}"
        (rw / "SKIP").write_text(reason + "\n")
        notes["rw"] = reason

    raw_md5 = ""
    if raw.exists() and raw_ok.exists():
        fields = raw_ok.read_text().split()
        if len(fields) < 2:
            fields = [fields[0], _sha256_file(raw, "md5")]
            raw_ok.write_text(" ".join(fields) + "\n")
        raw_md5 = fields[1]

    env = {
        "BACKING_SIZE": BACKING_SIZE,
        "BACKING_SHA256": backing_sha,
        "L12_CONFIG": L12_CONFIG,
        "L12_SIZE": l12["raw_size"],
        "L12_SHA256": l12["raw_sha256"],
        "L12_RAW_MD5": raw_md5,
        "P12_CONFIG": P12_CONFIG,
        "P12_SIZE": p12["raw_size"],
        "P12_SHA256": p12["raw_sha256"],
        "P1_LAYER": P1_LAYER,
        "P1_SHA256": p1["raw_sha256"],
        "RW_VSIZE": RW_VSIZE_GB << 30,
        "CHUNK_SHA256": hashlib.sha256(chunk).hexdigest(),
        "BENCH_RAND_SECS": BENCH_RAND_SECS,
    }
    for k in ("OBD_RUN_ARGS", "OBD_VERBOSE", "OBD_MAX_DATA_AREA_MB", "DAEMON_START_TIMEOUT"):
        if k in os.environ:
            env[k] = os.environ[k]
    (SCRATCH / "expected.env").write_text(
        "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in env.items()))
    return notes


def run_guest(timeout: int = VM_TIMEOUT) -> dict:
    """Build (if needed), prepare, boot once; returns a summary dict (see keys below)."""
    with _session_lock():
        build_rig()
        notes = prepare_scratch()
        t = time.monotonic()
        p = subprocess.run([str(HERE / "run-vm.sh"), str(SCRATCH), str(HERE / "guest-test.sh"), str(timeout)],
                           capture_output=True, text=True)
        wall = time.monotonic() - t
        results = None
        rpath = SCRATCH / "results.json"
        if rpath.exists():
            results = json.loads(rpath.read_text())
        elif (SCRATCH / "results.jsonl").exists():  # guest died before assembling results.json
            checks = {}
            for line in (SCRATCH / "results.jsonl").read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                checks[r.pop("name")] = r
            results = {"checks": checks, "bench": {}, "partial": True}
        console = (SCRATCH / "console.log").read_text(errors="replace") if (SCRATCH / "console.log").exists() else ""
        summary = {
            "rc": p.returncode, "wall_seconds": round(wall, 1), "run_vm_stderr": p.stderr[-2000:],
            "results": results, "notes": notes, "console_tail": console[-6000:],
            "scratch": str(SCRATCH),
        }
        (SCRATCH / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def main(argv: list[str]) -> int:
    if "--build" in argv:
        with _session_lock():
            build_rig()
        print(f"rig ready in {RIG_DIR}")
        return 0
    s = run_guest()
    res = s["results"] or {}
    for name, r in sorted((res.get("checks") or {}).items(), key=lambda kv: kv[1].get("t", 0)):
        print(f"{r['status']:5} {name}: {r['detail']}")
    print("bench:", json.dumps(res.get("bench", {}), sort_keys=True))
    print("notes:", json.dumps(s["notes"]))
    print(f"rc={s['rc']} wall={s['wall_seconds']}s  (details: {SCRATCH}/summary.json, console.log, logs/)")
    return 0 if s["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
