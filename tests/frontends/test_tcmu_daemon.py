"""daemon.py / `tcmu-obd run`: startup errors, cfgstring, attach/detach, lifecycle.

libtcmu's netlink half needs the kernel, so the lifecycle tests use `FakeLib`, which calls
`added`/`removed` the way libtcmu 1.5.4 does (synchronously, from whatever thread runs
tcmulib_initialize / tcmulib_master_fd_ready / tcmulib_close). The ring itself is covered
over the real library in test_tcmu_binding.py; the real kernel path by the VM rig.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import threading

import pytest

from tcmu_obd import cli
from tcmu_obd.config import GlobalConfig
from tcmu_obd.errors import ConfigError
from tcmu_obd.frontends.tcmu import binding as real_binding
from tcmu_obd.frontends.tcmu import daemon as daemon_mod
from tcmu_obd.frontends.tcmu.daemon import KMOD_MISSING, Daemon, DaemonConfig, TcmuUnavailable, parse_cfgstring
from tcmu_obd.image.memory import MemoryImage

BS = 512


# -- startup without the kernel module ------------------------------------------------------------


def test_cli_run_without_kernel_module(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(daemon_mod, "_kmod_loaded", lambda path: seen.append(path) and False)
    rc = cli.main(["run"])
    assert seen == ["/sys/module/target_core_user"]
    err = capsys.readouterr().err
    assert rc == 3
    assert "target_core_user kernel module is not loaded (modprobe target_core_user)" in err


def test_cli_run_rejects_bad_timeouts(capsys):
    assert cli.main(["run", "--read-timeout", "0"]) == 3
    assert "--read-timeout must be > 0" in capsys.readouterr().err


async def test_serve_without_kernel_module_raises(tmp_path):
    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path / "absent")), global_config=object())
    with pytest.raises(TcmuUnavailable, match="modprobe target_core_user"):
        await d.serve()
    assert str(KMOD_MISSING) == "target_core_user kernel module is not loaded (modprobe target_core_user)"


async def test_serve_when_tcmulib_initialize_fails(tmp_path):
    lib = FakeLib(fail_init=True)
    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path)), global_config=object(), binding=lib)
    with pytest.raises(TcmuUnavailable, match="TCM-USER"):
        await d.serve()
    assert lib.params == [("block_netlink", 1), ("reset_netlink", 1), ("block_netlink", 0)]


async def test_serve_propagates_global_config_errors(tmp_path):
    bad = tmp_path / "overlaybd.json"
    bad.write_text("{not json")
    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path), global_config_path=str(bad)), binding=FakeLib())
    with pytest.raises(ConfigError):
        await d.serve()


# -- cfgstring ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,expected",
    [
        ("overlaybd//var/lib/a/config.v1.json", ("/var/lib/a/config.v1.json", None)),
        ("overlaybd//var/lib/a/config.v1.json;dev1", ("/var/lib/a/config.v1.json", "dev1")),
        ("overlaybd/rel/config.json", ("rel/config.json", None)),
        ("overlaybd//a;b;c", ("/a", "b;c")),
        ("overlaybd//a;", ("/a", None)),
        ("x//p/q", ("/p/q", None)),
    ],
)
def test_parse_cfgstring(cfg, expected):
    assert parse_cfgstring(cfg) == expected


@pytest.mark.parametrize("cfg", ["overlaybd", "overlaybd/", "overlaybd/;dev", ""])
def test_parse_cfgstring_rejects(cfg):
    with pytest.raises(ValueError):
        parse_cfgstring(cfg)


# -- fakes ----------------------------------------------------------------------------------------


class FakeHandle:
    """Stands in for binding.Device: a device whose ring stays empty."""

    _next = 1

    def __init__(self, cfgstring: str):
        self.cfgstring = cfgstring
        self.key = FakeHandle._next
        FakeHandle._next += 1
        self.uio_name = f"uio{self.key}"
        self._a, self._b = socket.socketpair()
        self.fd = self._a.fileno()
        self.geometry = None

    def configure(self, **kw):
        self.geometry = kw

    def wwn(self):
        return "5001405"

    def processing_start(self):
        pass

    def next_command(self):
        return None

    def processing_complete(self):
        pass

    def complete(self, cmd, status, sense):
        raise AssertionError("no commands expected")

    def close(self):
        self._a.close()
        self._b.close()


class FakeCmd:
    def __init__(self, cdb):
        self.cdb = cdb
        self.data_length = 255

    def read_data_out(self, n):
        return b""


class TrackingImage(MemoryImage):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.closed = False

    async def aclose(self):
        self.closed = True


class Opener:
    def __init__(self, images=None, fail=()):
        self.images = images or {}
        self.fail = set(fail)
        self.calls = []

    async def __call__(self, config_path, global_config, *, scheduler=None):
        self.calls.append((config_path, scheduler))
        await asyncio.sleep(0)  # a real opener awaits I/O
        if config_path in self.fail:
            raise ConfigError(f"cannot open {config_path}")
        img = self.images.get(config_path) or TrackingImage(64 * BS)
        self.images[config_path] = img
        return img


def daemon(tmp_path, opener, **kw):
    return Daemon(DaemonConfig(sys_module_dir=str(tmp_path), **kw), opener=opener, global_config={"g": 1})


# -- attach / detach --------------------------------------------------------------------------------


async def test_attach_configures_like_upstream_dev_open(tmp_path):
    op = Opener({"/c.json": TrackingImage(100 * BS + 100, read_only=True)})
    d = daemon(tmp_path, op)
    d._loop = asyncio.get_running_loop()
    h = FakeHandle("overlaybd//c.json")
    assert await d.attach(h) == 0
    assert h.geometry == {"block_size": 512, "num_lbas": 100, "unmap": True, "write_cache": False}
    dev = d.devices[h.key]
    assert dev.processor.info.read_only and dev.processor.info.num_lbas == 100
    assert dev.processor.info.cfgstring == "overlaybd//c.json"
    r = dev.processor.submit(FakeCmd(bytes([0x12, 1, 0x80, 0, 255, 0])))
    assert r.data[4:] == b"5001405\0"
    assert op.calls == [("/c.json", None)]
    await d.detach(h)
    assert op.images["/c.json"].closed and not d.devices
    h.close()


async def test_attach_failures_return_eperm(tmp_path):
    op = Opener(fail={"/bad.json"})
    d = daemon(tmp_path, op)
    d._loop = asyncio.get_running_loop()
    assert await d.attach(FakeHandle("overlaybd//bad.json")) == -errno.EPERM
    assert await d.attach(FakeHandle("overlaybd")) == -errno.EPERM
    assert await d.attach(FakeHandle("overlaybd/")) == -errno.EPERM
    assert not d.devices


async def test_duplicate_dev_id_rejected_and_released_on_detach(tmp_path):
    d = daemon(tmp_path, Opener())
    d._loop = asyncio.get_running_loop()
    h1, h2, h3 = FakeHandle("overlaybd//a.json;id1"), FakeHandle("overlaybd//b.json;id1"), FakeHandle("overlaybd//c.json;id2")
    assert await d.attach(h1) == 0
    assert await d.attach(h2) == -errno.EPERM
    assert await d.attach(h3) == 0
    await d.detach(h1)
    assert await d.attach(h2) == 0
    for h in (h1, h2, h3):
        await d.detach(h)
        h.close()


async def test_failed_open_releases_dev_id(tmp_path):
    d = daemon(tmp_path, Opener(fail={"/a.json"}))
    d._loop = asyncio.get_running_loop()
    assert await d.attach(FakeHandle("overlaybd//a.json;x")) == -errno.EPERM
    h = FakeHandle("overlaybd//b.json;x")
    assert await d.attach(h) == 0
    await d.detach(h)
    h.close()


async def test_open_timeout(tmp_path):
    class Slow:
        async def __call__(self, *a, **kw):
            await asyncio.Event().wait()

    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path), open_timeout=0.05), opener=Slow(), global_config={})
    d._loop = asyncio.get_running_loop()
    assert await d.attach(FakeHandle("overlaybd//slow.json")) == -errno.EPERM


async def test_read_write_image_flushed_on_detach(tmp_path):
    op = Opener()
    d = daemon(tmp_path, op)
    d._loop = asyncio.get_running_loop()
    h = FakeHandle("overlaybd//rw.json")
    await d.attach(h)
    await d.detach(h)
    img = op.images["/rw.json"]
    assert img.flushes == 1 and img.closed
    await d.detach(h)  # unknown now: no-op
    h.close()


async def test_added_from_a_lane_thread_waits_for_the_open(tmp_path):
    d = daemon(tmp_path, Opener())
    d._loop = asyncio.get_running_loop()
    d._loop_thread = threading.get_ident()
    h = FakeHandle("overlaybd//t.json")
    rc = await asyncio.to_thread(d.on_added, h)
    assert rc == 0 and h.key in d.devices
    await asyncio.to_thread(d.on_removed, h)
    assert not d.devices
    h.close()


async def test_added_on_the_loop_thread_refuses_instead_of_deadlocking(tmp_path):
    d = daemon(tmp_path, Opener())
    d._loop = asyncio.get_running_loop()
    d._loop_thread = threading.get_ident()
    assert d.on_added(FakeHandle("overlaybd//t.json")) == -errno.EPERM


# -- full lifecycle with a libtcmu stand-in ---------------------------------------------------------


class FakeContext:
    def __init__(self, lib, target):
        self.lib = lib
        self.target = target
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self.master_fd = self._r.fileno()
        self.closed = False

    def master_fd_ready(self):
        """Like libtcmu: handle queued netlink events, calling added/removed synchronously."""
        assert threading.current_thread() is not threading.main_thread()
        try:
            self._r.recv(4096)
        except BlockingIOError:
            pass
        while self.lib.events:
            kind, h = self.lib.events.pop(0)
            if kind == "add":
                rc = self.target.on_added(h)
                self.lib.results.append((h.cfgstring, rc))
                if rc == 0:
                    self.lib.live.append(h)
            else:
                self.lib.live.remove(h)
                self.target.on_removed(h)
        self.lib.processed.set()

    def kernel_event(self, kind, h):
        self.lib.events.append((kind, h))
        self._w.send(b"x")

    def close(self):
        assert threading.current_thread() is not threading.main_thread()
        for h in list(self.lib.live):
            self.lib.live.remove(h)
            self.target.on_removed(h)
        self.closed = True
        self._r.close()
        self._w.close()


class FakeLib:
    """The slice of binding.py the daemon uses, with libtcmu's callback behaviour."""

    TcmuError = real_binding.TcmuError

    def __init__(self, existing=(), fail_init=False):
        self.existing = list(existing)
        self.fail_init = fail_init
        self.params = []
        self.events = []
        self.results = []
        self.live = []
        self.ctx = None
        self.processed = None

    def require_binding(self):
        pass

    def set_module_param(self, name, value):
        self.params.append((name, value))
        return True

    def initialize(self, target):
        assert threading.current_thread() is not threading.main_thread()
        if self.fail_init:
            raise real_binding.TcmuError("tcmulib_initialize failed: TCM-USER netlink family missing")
        self.ctx = FakeContext(self, target)
        for h in self.existing:  # re-attach devices that already exist
            rc = target.on_added(h)
            self.results.append((h.cfgstring, rc))
            if rc == 0:
                self.live.append(h)
        return self.ctx


async def test_lifecycle_reattach_add_remove_and_sigterm(tmp_path):
    existing = FakeHandle("overlaybd//old.json")
    lib = FakeLib(existing=[existing])
    lib.processed = asyncio.Event()
    op = Opener(fail={"/bad.json"})
    ready_file = tmp_path / "ready"
    d = Daemon(
        DaemonConfig(sys_module_dir=str(tmp_path), ready_file=str(ready_file)),
        opener=op,
        global_config={},
        binding=lib,
    )
    ready = asyncio.Event()
    serving = asyncio.ensure_future(d.serve(on_ready=lambda _: ready.set()))
    await ready.wait()
    assert ready_file.read_text().strip() == str(os.getpid())
    assert lib.results == [("overlaybd//old.json", 0)] and existing.key in d.devices
    assert lib.params == [("block_netlink", 1), ("reset_netlink", 1), ("block_netlink", 0)]

    new, bad = FakeHandle("overlaybd//new.json;n1"), FakeHandle("overlaybd//bad.json")
    lib.ctx.kernel_event("add", new)
    lib.ctx.kernel_event("add", bad)
    while len(lib.results) < 3:
        lib.processed.clear()
        await lib.processed.wait()
    assert lib.results[1:] == [("overlaybd//new.json;n1", 0), ("overlaybd//bad.json", -errno.EPERM)]
    assert set(d.devices) == {existing.key, new.key}

    lib.ctx.kernel_event("remove", existing)
    while existing.key in d.devices:
        lib.processed.clear()
        await lib.processed.wait()
    assert op.images["/old.json"].closed

    os.kill(os.getpid(), signal.SIGTERM)
    assert await serving == 0
    assert lib.ctx.closed and not d.devices
    assert op.images["/new.json"].closed and op.images["/new.json"].flushes == 1
    assert not ready_file.exists()
    for h in (existing, new, bad):
        h.close()


async def test_new_devices_refused_while_stopping(tmp_path):
    lib = FakeLib()
    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path)), opener=Opener(), global_config={}, binding=lib)
    ready = asyncio.Event()
    serving = asyncio.ensure_future(d.serve(on_ready=lambda _: ready.set()))
    await ready.wait()
    d.request_stop()
    assert await serving == 0
    assert await d.attach(FakeHandle("overlaybd//late.json")) == -errno.EPERM


async def test_failures_in_the_daemon_write_the_result_file(tmp_path):
    result = tmp_path / "result"
    cfg = tmp_path / "config.v1.json"
    cfg.write_text('{"lowers": [{"file": "layer"}], "resultFile": "result"}')

    class Slow:
        async def __call__(self, *a, **kw):
            await asyncio.Event().wait()

    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path), open_timeout=0.05), opener=Slow(), global_config=None)
    d._loop = asyncio.get_running_loop()
    assert await d.attach(FakeHandle(f"overlaybd/{cfg}")) == -errno.EPERM
    assert result.read_text() == "failed:open timed out after 0.05s"

    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path)), opener=Opener(), global_config=GlobalConfig())
    d._loop = asyncio.get_running_loop()
    h = FakeHandle(f"overlaybd/{tmp_path}/other.json;same")
    assert await d.attach(h) == 0
    assert await d.attach(FakeHandle(f"overlaybd/{cfg};same")) == -errno.EPERM
    assert result.read_text() == "failed:dev_id same is already in use"
    await d.detach(h)
    h.close()


async def test_opener_timeout_error_is_not_mistaken_for_open_timeout(tmp_path):
    result = tmp_path / "result"
    cfg = tmp_path / "config.v1.json"
    cfg.write_text('{"lowers": [{"file": "layer"}], "resultFile": "result"}')

    async def opener(path, g, *, scheduler=None):
        result.write_text("failed:registry timed out")
        raise TimeoutError("registry timed out")

    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path), open_timeout=30), opener=opener, global_config=None)
    d._loop = asyncio.get_running_loop()
    assert await d.attach(FakeHandle(f"overlaybd/{cfg}")) == -errno.EPERM
    assert result.read_text() == "failed:registry timed out"


async def test_sigterm_during_startup_stops_after_it(tmp_path):
    gate = threading.Event()

    class SlowLib(FakeLib):
        def initialize(self, target):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while devices are being re-attached
            gate.wait(10)
            return super().initialize(target)

    lib = SlowLib()
    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path)), opener=Opener(), global_config={}, binding=lib)
    serving = asyncio.ensure_future(d.serve())
    await asyncio.wait_for(d._stop.wait(), 10)  # the handler ran while startup was in progress
    assert not serving.done()
    gate.set()
    assert await serving == 0
    assert lib.ctx.closed


class FakeScheduler:
    def __init__(self):
        self.closed = False

    async def aclose(self):
        self.closed = True


async def test_scheduler_built_once_at_first_open_passed_to_opener_and_closed(tmp_path):
    made = []

    async def factory(gc):
        made.append(gc)
        return FakeScheduler()

    op = Opener({"/a.json": TrackingImage(8 * BS)})
    lib = FakeLib(existing=[FakeHandle("overlaybd//a.json"), FakeHandle("overlaybd//b.json")])
    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path)), opener=op, scheduler_factory=factory, global_config={"g": 2}, binding=lib)
    ready = asyncio.Event()
    serving = asyncio.ensure_future(d.serve(on_ready=lambda _: ready.set()))
    await ready.wait()
    sched = d.scheduler
    assert made == [{"g": 2}] and isinstance(sched, FakeScheduler)
    assert [s for _, s in op.calls] == [sched, sched]
    d.request_stop()
    assert await serving == 0
    assert sched.closed


async def test_scheduler_factory_failure_still_opens_local_images(tmp_path):
    def factory(gc):
        raise PermissionError("cannot create /opt/overlaybd/registry_cache")

    op = Opener()
    d = Daemon(DaemonConfig(sys_module_dir=str(tmp_path)), opener=op, scheduler_factory=factory, global_config={})
    d._loop = asyncio.get_running_loop()
    h = FakeHandle("overlaybd//local.json")
    assert await d.attach(h) == 0
    assert op.calls == [("/local.json", None)]
    await d.detach(h)
    h.close()


def test_tune_netlink_socket():
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)  # NETLINK_GENERIC, as libnl's
    try:
        ok = daemon_mod._tune_netlink(nl.fileno())
        assert nl.fileno() >= 0  # our socket survives (only a dup was closed)
        if os.geteuid() == 0:
            assert ok
            assert nl.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= daemon_mod.NETLINK_RCVBUF_BYTES
            assert nl.getsockopt(270, 5) == 1  # SOL_NETLINK, NETLINK_NO_ENOBUFS
        else:
            assert not ok
    finally:
        nl.close()
