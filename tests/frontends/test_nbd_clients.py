"""`tcmu-obd serve` as a subprocess, driven by real NBD clients: qemu-img, qemu-io, nbdcopy, nbdinfo.

The server runs as `python -m tcmu_obd.tools.serve` (the `serve` subcommand on its own); each
test waits for its "listening on" line rather than sleeping, and stops it (SIGTERM) after.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tcmu_obd.frontends.nbd import protocol as p

from .test_nbd_protocol import client_flags, go_data, opt, req

TOOLS = ["qemu-img", "qemu-io", "nbdcopy", "nbdinfo"]
MiB = 1 << 20
SIZE = 8 * MiB
START_TIMEOUT = 60


def test_client_tools_are_installed():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"install qemu-utils and libnbd-bin: missing {missing}"


class Served:
    """A running `serve` subprocess; `uri` is the address it printed."""

    def __init__(self, args: list[str], cwd: Path, *, full_cli: bool = False):
        # full_cli: through tcmu_obd.cli (what the `tcmu-obd` script runs), which imports
        # every tool module; otherwise the serve module alone.
        entry = ["-m", "tcmu_obd.cli", "serve"] if full_cli else ["-m", "tcmu_obd.tools.serve"]
        self.proc = subprocess.Popen(
            [sys.executable, *entry, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(Path(__file__).resolve().parents[2]),
            text=True,
        )
        self.line = self._read_line(START_TIMEOUT)
        self.uri = self.line.split("listening on ", 1)[1].split()[0] if "listening on" in self.line else ""

    def _read_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                return self.proc.stdout.readline()
        return ""

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, err


@pytest.fixture
def serve(tmp_path):
    started: list[Served] = []

    def start(*args: str, full_cli: bool = False) -> Served:
        s = Served(list(args), tmp_path, full_cli=full_cli)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def sparse_raw(path: Path) -> bytes:
    """8 MiB: data at [0,1M) and [3M,4M), holes elsewhere. Returns the full contents."""
    a = os.urandom(MiB)
    b = bytes(range(256)) * 4096
    with open(path, "wb") as f:
        f.write(a)
        f.seek(3 * MiB)
        f.write(b)
        f.truncate(SIZE)
    return a + bytes(2 * MiB) + b + bytes(4 * MiB)


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r


def test_qemu_img_convert_compare_and_nbdcopy(serve, tmp_path):
    raw = tmp_path / "disk.raw"
    contents = sparse_raw(raw)
    s = serve("--raw", str(raw), "--read-only", "--nbd", f"unix:{tmp_path}/s.sock", full_cli=True)
    assert s.uri == f"nbd+unix:///?socket={tmp_path}/s.sock", s.line
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri, str(tmp_path / "out1.raw"))
    assert (tmp_path / "out1.raw").read_bytes() == contents
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, str(raw))
    run("nbdcopy", s.uri, str(tmp_path / "out2.raw"))
    assert (tmp_path / "out2.raw").read_bytes() == contents
    run("nbdcopy", "--connections=4", "--requests=16", s.uri, "null:")
    code, out, err = s.stop()
    assert code == 0, err
    assert "stopped" in out
    assert not (tmp_path / "s.sock").exists()


def test_nbdinfo_map_matches_holes(serve, tmp_path):
    raw = tmp_path / "disk.raw"
    sparse_raw(raw)
    s = serve("--raw", str(raw), "--read-only", "--export-name", "img", "--nbd", f"unix:{tmp_path}/s.sock")
    assert s.uri.startswith("nbd+unix:///img?socket=")
    info = json.loads(run("nbdinfo", "--json", s.uri).stdout)
    export = info["exports"][0]
    assert export["export-size"] == SIZE and export["is_read_only"] is True
    assert export["can_multi_conn"] is True and "base:allocation" in export["contexts"]
    assert export["block_size_maximum"] == 32 * MiB
    entries = json.loads(run("nbdinfo", "--map", "--json", s.uri).stdout)
    got = [(e["offset"], e["length"], e["type"]) for e in entries]
    assert got == [(0, MiB, 0), (MiB, 2 * MiB, 3), (3 * MiB, MiB, 0), (4 * MiB, 4 * MiB, 3)]
    # nbdinfo --list goes through NBD_OPT_LIST then NBD_OPT_ABORT
    listing = run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={tmp_path}/s.sock").stdout
    assert [e["export-name"] for e in json.loads(listing)["exports"]] == ["img"]


def test_qemu_io_writes_reach_the_file(serve, tmp_path):
    raw = tmp_path / "disk.raw"
    contents = bytearray(sparse_raw(raw))
    s = serve("--raw", str(raw), "--nbd", f"unix:{tmp_path}/s.sock")
    io = ["qemu-io", "-f", "raw", s.uri]
    run(*io, "-c", "write -P 0xab 0 64k", "-c", "write -z 128k 64k", "-c", "discard 3M 4k", "-c", "flush")
    run(*io, "-c", "read -P 0xab 0 64k", "-c", "read -P 0 128k 64k", "-c", "read -P 0 3M 4k")
    contents[0 : 64 * 1024] = b"\xab" * 65536
    contents[128 * 1024 : 192 * 1024] = bytes(65536)
    contents[3 * MiB : 3 * MiB + 4096] = bytes(4096)
    run("qemu-io", "-f", "raw", s.uri, "-c", "write -P 0xcd 7M 1M")
    contents[7 * MiB : 8 * MiB] = b"\xcd" * MiB
    code, _, err = s.stop(signal.SIGINT)
    assert code == 0, err
    assert raw.read_bytes() == bytes(contents)


def test_many_concurrent_clients(serve, tmp_path):
    raw = tmp_path / "disk.raw"
    contents = sparse_raw(raw)
    s = serve("--raw", str(raw), "--read-only", "--nbd", f"unix:{tmp_path}/s.sock")

    def one(i: int) -> bytes:
        out = tmp_path / f"c{i}.raw"
        if i % 2:
            run("nbdcopy", s.uri, str(out))
        else:
            run("qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri, str(out))
        return out.read_bytes()

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    assert all(r == contents for r in results)


def test_client_vanishing_mid_request_does_not_hurt_others(serve, tmp_path):
    raw = tmp_path / "disk.raw"
    contents = sparse_raw(raw)
    s = serve("--raw", str(raw), "--nbd", f"unix:{tmp_path}/s.sock")
    for _ in range(5):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(tmp_path / "s.sock"))
        sock.recv(18)
        sock.sendall(client_flags() + opt(p.OPT_STRUCTURED_REPLY) + opt(p.OPT_GO, go_data()))
        # pipeline big reads and a half-sent write, then vanish without NBD_CMD_DISC
        sock.sendall(b"".join(req(p.CMD_READ, i * MiB, MiB, cookie=i) for i in range(8)))
        sock.sendall(req(p.CMD_WRITE, 0, MiB, cookie=99) + b"\xee" * 1000)
        sock.close()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, str(raw))
    assert raw.read_bytes() == contents  # the partial write never landed
    code, _, err = s.stop()
    assert code == 0, err


def test_tcp_listen(serve, tmp_path):
    raw = tmp_path / "disk.raw"
    contents = sparse_raw(raw)
    s = serve("--raw", str(raw), "--read-only", "--nbd", "tcp:127.0.0.1:0")
    assert s.uri.startswith("nbd://127.0.0.1:") and not s.uri.endswith(":0/"), s.line
    run("nbdcopy", s.uri, str(tmp_path / "out.raw"))
    assert (tmp_path / "out.raw").read_bytes() == contents


def test_stale_socket_is_replaced(serve, tmp_path):
    raw = tmp_path / "disk.raw"
    sparse_raw(raw)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "s.sock"))
    stale.close()
    s = serve("--raw", str(raw), "--nbd", f"unix:{tmp_path}/s.sock")
    assert "listening on" in s.line
    run("nbdinfo", s.uri)


@pytest.mark.parametrize(
    "args",
    [
        ["--raw", "/nonexistent/disk.raw", "--nbd", "unix:{tmp}/s.sock"],
        ["--raw", "{tmp}/disk.raw", "--nbd", "unix:{tmp}/regular-file"],
        ["--raw", "{tmp}/disk.raw", "--nbd", "bogus:address"],
        ["--raw", "{tmp}/disk.raw", "--nbd", "tcp:127.0.0.1:99999"],
        ["{tmp}/config.json", "--raw", "{tmp}/disk.raw", "--nbd", "unix:{tmp}/s.sock"],
    ],
)
def test_startup_failure_exit_code(serve, tmp_path, args):
    sparse_raw(tmp_path / "disk.raw")
    (tmp_path / "regular-file").write_text("not a socket")
    s = serve(*[a.format(tmp=tmp_path) for a in args])
    code, out, err = s.stop()
    assert code == 3, (out, err)
    assert "listening" not in s.line
    assert (tmp_path / "regular-file").read_text() == "not a socket"


def test_server_survives_protocol_garbage(serve, tmp_path):
    raw = tmp_path / "disk.raw"
    sparse_raw(raw)
    s = serve("--raw", str(raw), "--read-only", "--nbd", f"unix:{tmp_path}/s.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(tmp_path / "s.sock"))
    sock.settimeout(30)
    sock.recv(18)
    sock.sendall(client_flags() + struct.pack(">QII", 0xDEAD, 1, 0))
    assert sock.recv(100) == b""
    sock.close()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, str(raw))


# --- real overlaybd fixture images through the lead's open_image ------------------------

FIXTURE_IMAGES = [
    ("pattern", "p12", "pattern/configs/p12.lz4.zfile.config.v1.json"),
    ("ext4-chain", "L12", "ext4-chain/configs/L12.zstd.zfile.config.v1.json"),
]


@pytest.mark.parametrize("group, image, config", FIXTURE_IMAGES, ids=[i[1] for i in FIXTURE_IMAGES])
def test_fixture_image_reads_bit_exact(serve, tmp_path, group, image, config):
    import hashlib

    from tests.support.paths import FIXTURES_OBD

    expected = json.loads((FIXTURES_OBD / "expected.json").read_text())[group]["images"][image]
    s = serve(str(FIXTURES_OBD / config), "--read-only", "--nbd", f"unix:{tmp_path}/s.sock")
    assert "read-only" in s.line, s.line
    out = tmp_path / "out.raw"
    run("nbdcopy", s.uri, str(out), timeout=300)  # sparse output: holes are skipped
    assert out.stat().st_size == expected["raw_size"]
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    assert h.hexdigest() == expected["raw_sha256"]
    # block status agrees with the data: every "hole,zero" extent reads as zeroes
    entries = json.loads(run("nbdinfo", "--map", "--json", s.uri).stdout)
    assert sum(e["length"] for e in entries) == expected["raw_size"]
    with open(out, "rb") as f:
        for e in entries:
            if e["type"] & 2 and e["length"] <= 64 * MiB:
                f.seek(e["offset"])
                assert f.read(e["length"]) == bytes(e["length"]), e
    code, _, err = s.stop()
    assert code == 0, err


def test_listen_address_parsing():
    from tcmu_obd.tools.serve import Listen, nbd_uri

    assert Listen.parse("unix:/run/x.sock") == Listen("unix", path="/run/x.sock")
    assert Listen.parse("tcp:127.0.0.1:10809") == Listen("tcp", host="127.0.0.1", port=10809)
    assert Listen.parse("tcp:[::1]:0") == Listen("tcp", host="::1", port=0)
    assert Listen.parse("tcp::10809").host == "localhost"
    for bad in ("unix:", "tcp:host", "tcp:host:port", "tcp:h:70000", "file:/x", ""):
        with pytest.raises(ValueError):
            Listen.parse(bad)
    assert nbd_uri(Listen("unix", path="/s"), "img") == "nbd+unix:///img?socket=/s"
    assert nbd_uri(Listen("tcp", host="::1", port=0), "", 1234) == "nbd://[::1]:1234/"


def test_writable_fixture_image_persists_writes(serve, tmp_path):
    """p1 + writable upper p2 (a copy): writes over NBD survive a restart of the server."""
    import hashlib

    from tests.support.paths import FIXTURES_OBD

    work = tmp_path / "pattern"
    shutil.copytree(FIXTURES_OBD / "pattern", work)
    for path in [work, *work.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    config = str(work / "configs" / "p1+rw-p2.config.v1.json")
    expected = json.loads((FIXTURES_OBD / "expected.json").read_text())["pattern"]["images"]["p12"]

    s = serve(config, "--nbd", f"unix:{tmp_path}/s.sock")
    assert "listening on" in s.line and "read-only" not in s.line, s.line
    run("nbdcopy", s.uri, str(tmp_path / "before.raw"))
    before = bytearray((tmp_path / "before.raw").read_bytes())
    assert hashlib.sha256(before).hexdigest() == expected["raw_sha256"]
    run("qemu-io", "-f", "raw", s.uri, "-c", "write -P 0xab 1M 64k", "-c", "write -z 2M 64k", "-c", "flush")
    before[MiB : MiB + 65536] = b"\xab" * 65536
    before[2 * MiB : 2 * MiB + 65536] = bytes(65536)
    code, _, err = s.stop()
    assert code == 0, err

    s = serve(config, "--read-only", "--nbd", f"unix:{tmp_path}/s2.sock")
    run("nbdcopy", s.uri, str(tmp_path / "after.raw"))
    assert (tmp_path / "after.raw").read_bytes() == bytes(before)
