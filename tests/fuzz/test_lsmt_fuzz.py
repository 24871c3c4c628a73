"""LSMT: damaged committed layers and RW index logs end in FormatError, never a crash or a
giant allocation. Seeds: a committed layer made by upstream's tools and one made by our writer."""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile

import pytest
from hypothesis import given

from tcmu_obd.errors import FormatError, ObdError
from tcmu_obd.format import lsmt
from tcmu_obd.image.layers import open_committed_layer
from tcmu_obd.image.source import BytesSource
from tcmu_obd.image.writable import WritableLayer
from tests.support.paths import FIXTURES_OBD

from .mutate import Seed, allocation_limit, fuzz_settings, mutants, only, u32le, u64le

HT = lsmt.HT_SIZE


def _header_fields(base: int) -> list:
    # size, flags, index_offset, index_size, virtual_size of a header/trailer area at `base`
    return [u32le(base + 24), u32le(base + 28), u64le(base + 32), u64le(base + 40), u64le(base + 48)]


@functools.lru_cache(maxsize=None)
def _own_layer() -> bytes:
    maps = [lsmt.Mapping(0, 64, 0), lsmt.Mapping(100, 8, 0, zeroed=True), lsmt.Mapping(200, 300, 0)]
    plan = lsmt.plan_commit(maps)
    header, index, trailer = lsmt.build_committed_layer_parts(plan, virtual_size=1 << 20,
                                                              uuid="12345678-1234-1234-1234-123456789abc")
    return header + bytes(plan.data_sectors * lsmt.SECTOR) + index + trailer


@functools.lru_cache(maxsize=None)
def _seeds() -> tuple[bytes, ...]:
    return ((FIXTURES_OBD / "pattern" / "layers" / "P2.lsmt").read_bytes(), _own_layer())


def _committed_seed(seed: bytes) -> Seed:
    n = len(seed)
    t = lsmt.parse_header_trailer(seed[n - HT:])
    fields = _header_fields(0) + _header_fields(n - HT)
    # the first index entries: offset|length and moffset|zeroed words
    fields += [u64le(t.index_offset + 8 * k) for k in range(6)]
    hot = [(24, lsmt.HT_STRUCT_SIZE), (n - HT + 24, n - HT + lsmt.HT_STRUCT_SIZE),
           (t.index_offset, t.index_offset + 16 * 8)]
    return Seed(seed, fields, hot)


COMMITTED = [_committed_seed(s) for s in _seeds()]


def _check_layer(blob: bytes) -> None:
    result, _ = only((FormatError,), lsmt.load_committed_layer, blob, source="fuzz")
    if result is None:
        return
    prev = -1
    for m in result.mappings:  # what was accepted is what the index contract promises
        assert m.offset >= prev and m.length > 0
        assert lsmt.moffset_in_bounds(m, lsmt.DATA_START_SECTOR, result.index_offset // lsmt.SECTOR)
        prev = m.end


@fuzz_settings(300)
@given(mutants(COMMITTED))
def test_damaged_committed_layer(case):
    _, blob = case
    _check_layer(blob)


@fuzz_settings(100)
@given(mutants(COMMITTED))
def test_damaged_committed_layer_through_open_pipeline(case):
    """The detection chain (tar → ZFile → LSMT) over the same damage: only ObdError escapes."""
    _, blob = case

    async def go():
        layer = await open_committed_layer(BytesSource(blob, name="fuzz"))
        await layer.aclose()

    only((ObdError,), asyncio.run, go())


@pytest.mark.parametrize("claimed", [1 << 20, 1 << 40, (1 << 64) - 1])
def test_huge_index_size_is_rejected_before_reading(claimed):
    """A trailer claiming 2^40 index entries is refused against the blob size, with no
    allocation near the claim."""
    blob = bytearray(_own_layer())
    n = len(blob)
    blob[n - HT + 40:n - HT + 48] = claimed.to_bytes(8, "little")
    blob = bytes(blob)
    with allocation_limit(256 << 10):
        with pytest.raises(FormatError, match="index_size|runs past"):
            lsmt.load_committed_layer(blob)

        async def go():
            await open_committed_layer(BytesSource(blob))

        with pytest.raises(FormatError, match="index_size|runs past"):
            asyncio.run(go())


# --- RW (log-structured) layers: data file + index log ----------------------------------


@functools.lru_cache(maxsize=None)
def _rw_seeds() -> tuple[bytes, bytes]:
    rw = FIXTURES_OBD / "pattern" / "rw"
    return (rw / "p2.data").read_bytes(), (rw / "p2.index").read_bytes()


_RECORDS = [u64le(HT + 8 * k) for k in range(8)]
RW = [
    # the index log: its header and first records
    Seed(_rw_seeds()[1], _header_fields(0) + _RECORDS, [(24, lsmt.HT_STRUCT_SIZE), (HT, len(_rw_seeds()[1]))]),
    # the data file's header
    Seed(_rw_seeds()[0][:HT], _header_fields(0), [(24, lsmt.HT_STRUCT_SIZE)]),
]


@fuzz_settings(80)
@given(mutants(RW))
def test_damaged_rw_layer(case):
    which, mutated = case
    data, index = _rw_seeds()
    if which == 0:
        index = mutated
    else:
        data = mutated + data[HT:]
    with tempfile.TemporaryDirectory() as d:
        dp, ip = os.path.join(d, "data"), os.path.join(d, "index")
        with open(dp, "wb") as f:
            f.write(data)
        with open(ip, "wb") as f:
            f.write(index)
        layer, _ = only((ObdError,), WritableLayer.open, dp, ip, read_only=True)
        if layer is not None:
            layer.close()


@fuzz_settings(150)
@given(mutants([Seed(_rw_seeds()[1], _RECORDS, [(HT, len(_rw_seeds()[1]))])]))
def test_rw_log_replay(case):
    _, index = case
    only((FormatError,), lsmt.replay_rw_log, index[HT:], 200, source="fuzz")
