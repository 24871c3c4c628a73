"""CacheStore: upstream's water marks, LRU eviction of whole unused blobs, adoption at start."""

import hashlib
import os

from tcmu_obd.cache import CacheStore, water_marks

GiB = 1 << 30
KiB = 1024


def test_water_marks_match_upstream_formula():
    # small caches: 90 % / halfway between; big caches: cap − 50 GiB / cap − 5 GiB
    assert water_marks(4 * GiB) == (int(4 * GiB * 0.9), int(4 * GiB * 0.95))
    assert water_marks(100 * GiB) == (90 * GiB, 95 * GiB)
    assert water_marks(1000 * GiB) == (950 * GiB, 995 * GiB)
    cap = 600 * GiB
    water, risk = water_marks(cap)
    assert water == max(cap * 9 // 10, cap - 50 * GiB)
    assert risk == max(cap - 5 * GiB, (water + cap) // 2)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


SIZES = {}


def _digest(i):
    """Real digest of blob i's content (bytes([i]) * size), so the store's check passes."""
    return "sha256:" + hashlib.sha256(bytes([i]) * SIZES.get(i, 0)).hexdigest()


async def _fill(store, i, size, clock):
    SIZES[i] = size
    blob = store.open_blob(_digest(i), size)
    await blob.write(0, bytes([i]) * size)
    await blob.flush()
    clock.t += 1
    await store.release(blob)
    return blob


async def test_lru_eviction_to_water_mark(tmp_path):
    clock = Clock()
    cap = 1000 * KiB
    store = CacheStore(str(tmp_path), cap, clock=clock)
    water, risk = store.marks
    assert (water, risk) == (900 * KiB, 950 * KiB)
    for i in range(4):  # 4 × 200 KiB = 800 KiB: under the water mark
        await _fill(store, i, 200 * KiB, clock)
    assert store.evicted == [] and store.usage_bytes == 800 * KiB
    # touch blob 0 so it becomes most recently used
    b0 = store.open_blob(_digest(0), 200 * KiB)
    clock.t += 1
    await store.release(b0)
    # 5th blob: 1000 KiB ≥ riskMark → evict LRU (1, then 2) until ≤ waterMark
    await _fill(store, 4, 200 * KiB, clock)
    assert store.evicted == [_digest(1)]
    assert store.usage_bytes == 800 * KiB <= water
    assert not os.path.exists(tmp_path / _digest(1))
    assert not os.path.exists(tmp_path / (_digest(1) + ".map"))
    assert os.path.exists(tmp_path / _digest(0))


async def test_blobs_in_use_are_never_evicted(tmp_path):
    clock = Clock()
    store = CacheStore(str(tmp_path), 500 * KiB, clock=clock)
    SIZES.update({i: 200 * KiB for i in range(3)})
    held = [store.open_blob(_digest(i), 200 * KiB) for i in range(3)]
    for i, blob in enumerate(held):
        await blob.write(0, bytes([i]) * 200 * KiB)
        await blob.flush()
    assert store.usage_bytes == 600 * KiB  # above risk, but everything is open
    assert store.evicted == []
    await store.release(held[1])
    # the release re-checks: blob 1 is the only evictable one
    assert store.evicted == [_digest(1)]
    for b in (held[0], held[2]):
        await store.release(b)
    await store.aclose()


async def test_periodic_eviction_above_water_mark(tmp_path):
    clock = Clock()
    store = CacheStore(str(tmp_path), 1000 * KiB, clock=clock)
    for i in range(5):  # 920 KiB: above water (900), below risk (950)
        await _fill(store, i, 184 * KiB, clock)
    assert store.evicted == [] and store.usage_bytes > store.marks[0]
    clock.t += 11  # the 10 s timer is due
    assert store.maybe_evict() == [_digest(0)]


async def test_existing_blobs_are_adopted_oldest_first(tmp_path):
    clock = Clock()
    store = CacheStore(str(tmp_path), 0, clock=clock)  # 0 = unbounded
    for i in range(3):
        await _fill(store, i, 100 * KiB, clock)
    os.utime(tmp_path / (_digest(2) + ".map"), (1, 1))  # blob 2 is the oldest on disk
    os.utime(tmp_path / _digest(2), (1, 1))
    store2 = CacheStore(str(tmp_path), 250 * KiB, clock=clock)
    assert store2.usage_bytes == 300 * KiB
    assert store2.maybe_evict() == [_digest(2)]
