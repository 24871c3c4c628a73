"""`tcmu-obd demo` end to end (small image, short RTT): exit 0, every check passed, both layers
fetched completely and verified, and nothing left behind (temp dir, child processes, sockets).

Run in-process through the CLI entry point, so leftover children and sockets would be ours."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tcmu_obd import cli
from tcmu_obd.demo.registry import find_docker_registry

SMALL = ["--size-mib", "6", "--rtt-ms", "20", "--rate-mbps", "400", "--baseline-s", "1", "--plain"]


def children() -> set[int]:
    """pids whose parent is this process."""
    me = str(os.getpid())
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.add(int(d))
    return out


def sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def run_demo_cli(tmp_path: Path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "result.json"
    before_children, before_sockets = children(), sockets()
    rc = cli.main(["demo", *SMALL, "--json", str(out), *extra])
    assert children() - before_children == set(), "the demo left child processes running"
    assert sockets() <= before_sockets, "the demo left sockets open"
    return rc, json.loads(out.read_text())


def check_result(rc: int, res: dict) -> None:
    assert rc == 0, res
    assert res["ok"] is True
    assert res["checks"] == {"files": True, "layers": True, "bit_exact": True, "foreground_reads": True}
    assert res["foreground"]["error_count"] == 0
    assert res["bit_exact"] and res["export_sha256"] == res["raw_sha256"]
    assert len(res["layers"]) == 2
    for layer in res["layers"]:
        assert layer["complete"] and layer["verified"] and layer["commit_sha256_ok"], layer
    assert res["fill"]["fetched_bytes"] >= res["fill"]["blob_bytes"] == sum(x["size"] for x in res["layers"])
    assert [f["ok"] for f in res["files"]] == [True] * len(res["files"]) and res["files"]
    assert res["upstream"]["bytes"] > 0 and res["upstream"]["requests"] > 0
    # nothing left on disk
    assert res["workdir_removed"] is True
    assert not Path(res["workdir"]).exists()


@pytest.mark.skipif(find_docker_registry() is None, reason="docker-registry not installed")
def test_demo_with_docker_registry(tmp_path):
    rc, res = run_demo_cli(tmp_path)
    check_result(rc, res)
    assert res["registry"] == "docker-registry"
    assert res["hash_client"] in ("nbdcopy", "built-in NBD client")


def test_demo_with_in_process_registry(tmp_path):
    rc, res = run_demo_cli(tmp_path, "--no-docker-registry")
    check_result(rc, res)
    assert res["registry"] == "in-process aiohttp"


def test_demo_keep_dir_is_kept_and_must_be_empty(tmp_path):
    keep = tmp_path / "kept"
    rc, res = run_demo_cli(tmp_path, "--no-docker-registry", "--keep", str(keep))
    assert rc == 0 and res["ok"] and res["kept"]
    assert (keep / "config.v1.json").exists()
    for layer in res["layers"]:
        assert Path(layer["commit_file"]).exists()
    assert not (keep / "nbd.sock").exists()  # the server is gone, its socket too
    rc = cli.main(["demo", *SMALL, "--keep", str(keep)])
    assert rc == 1  # not empty: refused before doing anything


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [str(pid)]
    while todo:
        parent = todo.pop()
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == parent:
                        out.add(int(d))
                        todo.append(d)
            except OSError:
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_demo_ctrl_c_leaves_nothing(tmp_path):
    """SIGINT while the fill runs: exit 130, its processes gone, its temp dir removed."""
    import signal
    import subprocess
    import sys

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-c", "import sys; from tcmu_obd.cli import main; sys.exit(main())",
            "demo", "--size-mib", "6", "--rtt-ms", "200", "--rate-mbps", "10", "--plain"]
    # SIGINT must not be ignored in the child (it is for background jobs of some shells)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in proc.stdout:  # wait for a real event: the fill is running
            seen.append(line)
            if line.startswith("== 5."):
                break
        assert any(line.startswith("== 5.") for line in seen), "".join(seen)
        helpers = _descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        rest = proc.stdout.read()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130, "".join(seen) + rest
    assert "interrupted" in rest
    assert [p for p in helpers if _alive(p)] == []
    assert list(tmpdir.iterdir()) == []
