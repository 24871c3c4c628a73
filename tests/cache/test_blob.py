"""BlobCache: durability ordering under simulated power cuts, resume, digest check, commit."""

import hashlib
import os
import random

import pytest

from tcmu_obd.cache import BlobCache, FileIO, PresenceMap, SimulatedCrash
from tcmu_obd.cache.presence import PAGE_SIZE


class CrashSimIO(FileIO):
    """FileIO that can simulate a power cut: writes not yet fdatasync'ed/fsync'ed are undone.

    Every pwrite first saves the bytes it overwrites in an undo log for that fd; a sync of
    the fd drops the fd's log (those writes are now durable). `power_cut()` applies each
    fd's undo log in reverse, so the files hold exactly what a disk would after a crash.
    """

    def __init__(self):
        self.undo: dict[int, list[tuple[int, bytes]]] = {}
        self.events: list[tuple[str, int]] = []

    def pwrite_all(self, fd, data, offset):
        data = bytes(data)
        old = os.pread(fd, len(data), offset)
        old = old + bytes(len(data) - len(old))
        self.undo.setdefault(fd, []).append((offset, old))
        self.events.append(("write", fd))
        super().pwrite_all(fd, data, offset)

    def fdatasync(self, fd):
        self.events.append(("sync", fd))
        self.undo.pop(fd, None)

    def fsync(self, fd):
        self.fdatasync(fd)

    def power_cut(self):
        for fd, log in self.undo.items():
            for offset, old in reversed(log):
                os.pwrite(fd, old, offset)
        self.undo.clear()


def _blob_kwargs(tmp_path, data, **kw):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = str(tmp_path / digest)
    return dict(digest=digest, size=len(data), data_path=path, map_path=path + ".map", **kw)


def _check_durable_state(tmp_path, data):
    """Reopen from disk: every page the durable map calls present must hold the right bytes."""
    kw = _blob_kwargs(tmp_path, data)
    m = PresenceMap.load(kw["map_path"], len(data))
    if m is None:
        return 0
    with open(kw["data_path"], "rb") as f:
        disk = f.read()
    for page in range(m.pages):
        if m.test(page):
            a, b = page * PAGE_SIZE, min((page + 1) * PAGE_SIZE, len(data))
            assert disk[a:b] == data[a:b], f"page {page} marked present but holds garbage"
    return m.count_pages()


STAGES = ["before_data_sync", "after_data_sync", "after_map_write"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("crash_at_flush", [0, 1, 3])
async def test_power_cut_never_leaves_garbage_marked(tmp_path, stage, crash_at_flush):
    rnd = random.Random(f"{stage}{crash_at_flush}")
    data = rnd.randbytes(40 * PAGE_SIZE + 123)
    io = CrashSimIO()
    flushes = {"n": 0}

    def hook(s):
        if s == stage and flushes["n"] == crash_at_flush:
            raise SimulatedCrash(s)
        if s == "after_map_write":
            flushes["n"] += 1

    blob = BlobCache(**_blob_kwargs(tmp_path, data), io=io, fault_hook=hook, commit_interval=3600)
    chunks = [(o, min(o + 3 * PAGE_SIZE, len(data))) for o in range(0, len(data), 3 * PAGE_SIZE)]
    rnd.shuffle(chunks)
    durable_before = 0
    with pytest.raises(SimulatedCrash):
        for i, (a, b) in enumerate(chunks):
            await blob.write(a, data[a:b])
            if i % 2 == 1:
                before = blob.durable.count_pages()
                await blob.flush()
                durable_before = blob.durable.count_pages()
                assert durable_before >= before
        raise AssertionError("the fault hook never fired")
    io.power_cut()
    blob.abandon()
    marked = _check_durable_state(tmp_path, data)
    # progress made by completed flushes survives the crash
    assert marked >= durable_before or stage == "after_map_write"
    # and a restart resumes from there: fill the rest and verify
    blob2 = BlobCache(**_blob_kwargs(tmp_path, data))
    assert blob2.presence.count_pages() == marked
    for a, b in blob2.missing_runs():
        await blob2.write(a, data[a:b])
    await blob2.wait_verified()
    assert blob2.verified
    await blob2.aclose()


async def test_crash_simulation_catches_a_wrong_order(tmp_path):
    """Control: a cache that writes its map before syncing the data is caught by the check."""

    class WrongOrder(BlobCache):
        async def flush(self):
            pending, self._pending = self._pending, []
            for a, b in pending:
                self.durable.mark(a, b)
            self._io.pwrite_all(self._map_fd, self.durable.to_bytes(), 0)
            self._io.fsync(self._map_fd)
            raise SimulatedCrash("before data sync")

    data = random.Random(1).randbytes(8 * PAGE_SIZE)
    io = CrashSimIO()
    blob = WrongOrder(**_blob_kwargs(tmp_path, data), io=io, commit_interval=3600)
    await blob.write(0, data)
    with pytest.raises(SimulatedCrash):
        await blob.flush()
    io.power_cut()
    blob.abandon()
    with pytest.raises(AssertionError, match="garbage"):
        _check_durable_state(tmp_path, data)


async def test_sync_precedes_map_write(tmp_path):
    data = random.Random(2).randbytes(16 * PAGE_SIZE)
    io = CrashSimIO()
    blob = BlobCache(**_blob_kwargs(tmp_path, data, verify_digest=False), io=io, commit_interval=3600)
    await blob.write(0, data[: 8 * PAGE_SIZE])
    io.events.clear()
    await blob.flush()
    data_fd, map_fd = blob._fd, blob._map_fd
    assert io.events == [("sync", data_fd), ("write", map_fd), ("sync", map_fd)]
    await blob.aclose()


async def test_writes_are_batched_into_few_syncs(tmp_path):
    data = random.Random(3).randbytes(64 * PAGE_SIZE)
    io = CrashSimIO()
    blob = BlobCache(**_blob_kwargs(tmp_path, data), io=io, commit_interval=3600, commit_bytes=1 << 30)
    for off in range(0, 32 * PAGE_SIZE, PAGE_SIZE):
        await blob.write(off, data[off : off + PAGE_SIZE])
    await blob.flush()
    assert [e for e in io.events if e[0] == "sync" and e[1] == blob._fd] == [("sync", blob._fd)]
    await blob.aclose()


async def test_resume_after_close_and_verified_marker(tmp_path):
    data = random.Random(4).randbytes(10 * PAGE_SIZE + 5)
    kw = _blob_kwargs(tmp_path, data)
    blob = BlobCache(**kw)
    await blob.write(0, data[: 4 * PAGE_SIZE])
    await blob.aclose()
    blob = BlobCache(**kw)
    assert blob.missing_runs() == [(4 * PAGE_SIZE, len(data))]
    await blob.write(4 * PAGE_SIZE, data[4 * PAGE_SIZE :])
    await blob.wait_verified()
    await blob.aclose()
    blob = BlobCache(**kw)
    assert blob.verified and blob.missing_runs() == []
    buf = bytearray(len(data))
    await blob.read_into(0, memoryview(buf))
    assert buf == data
    await blob.aclose()


async def test_digest_mismatch_discards_everything(tmp_path):
    data = random.Random(5).randbytes(6 * PAGE_SIZE)
    events = []
    blob = BlobCache(**_blob_kwargs(tmp_path, data))
    blob.listeners.append(events.append)
    bad = bytearray(data)
    bad[100] ^= 0xFF
    await blob.write(0, bytes(bad))
    while "mismatch" not in events:
        await blob._hash_task
    assert blob.mismatches == 1 and not blob.verified
    assert blob.missing_runs() == [(0, len(data))]
    assert PresenceMap.load(blob.map_path, len(data)).count_pages() == 0
    await blob.write(0, data)
    await blob.wait_verified()
    assert events[-1] == "verified"
    await blob.aclose()


async def test_dir_blob_is_committed_by_rename(tmp_path):
    data = random.Random(6).randbytes(5 * PAGE_SIZE + 77)
    d = tmp_path / "layer"
    d.mkdir()
    kw = dict(
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        size=len(data),
        data_path=str(d / ".download"),
        map_path=str(d / ".download.map"),
        commit_path=str(d / "overlaybd.commit"),
    )
    blob = BlobCache(**kw)
    await blob.write(0, data[:PAGE_SIZE])
    await blob.write(PAGE_SIZE, data[PAGE_SIZE:])
    await blob.wait_verified()
    assert blob.path == kw["commit_path"]
    assert sorted(os.listdir(d)) == ["overlaybd.commit"]
    assert (d / "overlaybd.commit").read_bytes() == data
    await blob.aclose()
    again = BlobCache(**kw)
    assert again.verified
    await again.aclose()


async def test_upstream_download_file_without_map_is_adopted(tmp_path):
    """A `.download` left by upstream overlaybd (no map): its allocated extents are kept,
    the digest check still guards them."""
    data = random.Random(7).randbytes(64 * PAGE_SIZE)
    d = tmp_path / "layer"
    d.mkdir()
    with open(d / ".download", "wb") as f:
        f.truncate(len(data))
        f.seek(0)
        f.write(data[: 16 * PAGE_SIZE])
        f.seek(40 * PAGE_SIZE)
        f.write(data[40 * PAGE_SIZE : 48 * PAGE_SIZE])
    kw = dict(
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        size=len(data),
        data_path=str(d / ".download"),
        map_path=str(d / ".download.map"),
        commit_path=str(d / "overlaybd.commit"),
    )
    blob = BlobCache(**kw)
    if not blob.presence.count_pages():
        blob.abandon()
        pytest.skip("filesystem without SEEK_DATA/SEEK_HOLE")
    assert blob.missing_runs() == [(16 * PAGE_SIZE, 40 * PAGE_SIZE), (48 * PAGE_SIZE, len(data))]
    for a, b in blob.missing_runs():
        await blob.write(a, data[a:b])
    await blob.wait_verified()
    assert (d / "overlaybd.commit").read_bytes() == data
    await blob.aclose()
