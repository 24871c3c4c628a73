"""WritableLayer: upstream RW fixtures, the ops program, a bytearray model, crash leftovers."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_obd.errors import FormatError
from tcmu_obd.format import lsmt
from tcmu_obd.format.lsmt import Mapping
from tcmu_obd.image.writable import WritableLayer
from tests.format.test_lsmt import P1_SHA, P12_SHA, PATTERN, UUID_A, UUID_B, blob_reader, hash_disk

VSIZE = 8 << 20
P1_RW_UUID = "261045E3-41BC-4189-B790-DFD8A49A8E5E"


def copy_rw(tmp_path, name):
    out = []
    for ext in ("data", "index"):
        dst = tmp_path / f"{name}.{ext}"
        shutil.copyfile(PATTERN / "rw" / f"{name}.{ext}", dst)
        os.chmod(dst, 0o644)
        out.append(dst)
    return out


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ----------------------------------------------------------------------------- the ops program


def pattern_sector(k: int, s: int) -> bytes:
    return (b"W" + bytes([k]) + s.to_bytes(6, "little") + b"OBDPATRN") * 32


def read_ops(name):
    ops = []
    for line in (PATTERN / "ops" / f"{name}.ops").read_text().splitlines():
        f = line.split()
        if f[0] == "W":
            ops.append(("W", int(f[1]), int(f[2]), int(f[3])))
        elif f[0] == "P":
            ops.append(("P", 0, int(f[1]), int(f[2])))
    return ops


def apply_ops(layer: WritableLayer | None, model: bytearray, ops):
    for kind, k, off, length in ops:
        if kind == "W":
            data = b"".join(pattern_sector(k, s) for s in range(off // 512, (off + length) // 512))
            model[off: off + length] = data
            if layer is not None:
                layer.pwrite(off, data)
        else:
            model[off: off + length] = bytes(length)
            if layer is not None:
                layer.discard(off, length)


def test_ops_model_gives_expected_raw():
    model = bytearray(VSIZE)
    apply_ops(None, model, read_ops("p1"))
    assert sha(model) == P1_SHA
    apply_ops(None, model, read_ops("p2"))
    assert sha(model) == P12_SHA


def test_ops_through_log_layer_reproduce_upstream_files(tmp_path):
    layer = WritableLayer.create(tmp_path / "p1.data", tmp_path / "p1.index", VSIZE, uuid=P1_RW_UUID)
    model = bytearray(VSIZE)
    apply_ops(layer, model, read_ops("p1"))
    assert sha(layer.read(0, VSIZE)) == P1_SHA
    layer.fsync()
    layer.commit(tmp_path / "P1.lsmt", uuid=UUID_A, user_tag="pattern p1")
    layer.close()
    # same write sequence, same uuid: the very bytes upstream's library wrote
    assert (tmp_path / "p1.data").read_bytes() == (PATTERN / "rw/p1.data").read_bytes()
    assert (tmp_path / "p1.index").read_bytes() == (PATTERN / "rw/p1.index").read_bytes()
    assert (tmp_path / "P1.lsmt").read_bytes() == (PATTERN / "layers/P1.lsmt").read_bytes()


def test_ops_through_sparse_layer(tmp_path):
    layer = WritableLayer.create(tmp_path / "s.data", tmp_path / "s.index", VSIZE, sparse=True)
    assert layer.sparse and (tmp_path / "s.index").stat().st_size == 0
    assert (tmp_path / "s.data").stat().st_size == VSIZE + 4096
    model = bytearray(VSIZE)
    apply_ops(layer, model, read_ops("p1"))
    assert sha(layer.read(0, VSIZE)) == P1_SHA
    layer.close()
    layer = WritableLayer.open(tmp_path / "s.data", tmp_path / "s.index")
    assert sha(layer.read(0, VSIZE)) == P1_SHA
    # after a reopen the punch is a hole, not a zeroed mapping (upstream behaviour)
    assert not any(m.zeroed for m in layer.segment_map)
    layer.commit(tmp_path / "S.lsmt", uuid=UUID_A)
    layer.close()
    blob = (tmp_path / "S.lsmt").read_bytes()
    c = lsmt.load_committed_layer(blob)
    assert c.header.uuid == UUID_A.upper() and c.header.flags == 7  # sparse bit not carried over
    assert hash_disk(lsmt.merge_stack([c.mappings]), VSIZE, blob_reader([blob])) == P1_SHA


# ----------------------------------------------------------------------------- upstream RW fixtures


def test_open_rw_p1_fixture(tmp_path):
    data, index = copy_rw(tmp_path, "p1")
    before = (data.read_bytes(), index.read_bytes())
    layer = WritableLayer.open(data, index)
    assert not layer.sparse and layer.virtual_size == VSIZE
    assert layer.uuid == P1_RW_UUID and layer.parent_uuid == lsmt.NULL_UUID
    assert Mapping(5120, 32, 2224, True) in layer.segment_map.mappings()
    assert sha(layer.read(0, VSIZE)) == P1_SHA
    layer.close()
    assert (data.read_bytes(), index.read_bytes()) == before  # reading changes nothing


def test_open_read_only_from_fixture_dir():
    layer = WritableLayer.open(PATTERN / "rw/p1.data", PATTERN / "rw/p1.index", read_only=True)
    try:
        assert sha(layer.read(0, VSIZE)) == P1_SHA
        with pytest.raises(ValueError):
            layer.pwrite(0, bytes(512))
    finally:
        layer.close()


def test_p1_plus_rw_p2_stack(tmp_path):
    data, index = copy_rw(tmp_path, "p2")
    p1 = (PATTERN / "layers/P1.lsmt").read_bytes()
    lower = lsmt.load_committed_layer(p1)
    upper = WritableLayer.open(data, index)
    merged = lsmt.merge_stack([lower.mappings, upper.segment_map.mappings()])

    def read(tag, moffset, length):
        return p1[moffset * 512:(moffset + length) * 512] if tag == 0 else upper.read_data(moffset, length)

    assert hash_disk(merged, VSIZE, read) == P12_SHA
    upper.close()


@pytest.mark.parametrize("name, uuid, parent, tag, expected", [
    ("p1", UUID_A, None, "pattern p1", "P1.lsmt"),
    ("p2", UUID_B, UUID_A, b"pattern p2", "P2.lsmt"),
])
def test_commit_rw_fixture_byte_identical(tmp_path, name, uuid, parent, tag, expected):
    data, index = copy_rw(tmp_path, name)
    layer = WritableLayer.open(data, index)
    layer.commit(tmp_path / "out.lsmt", uuid=uuid, parent_uuid=parent, user_tag=tag)
    layer.close()
    assert sha((tmp_path / "out.lsmt").read_bytes()) == sha((PATTERN / "layers" / expected).read_bytes())


def test_commit_defaults_and_refuses_existing(tmp_path):
    data, index = copy_rw(tmp_path, "p1")
    layer = WritableLayer.open(data, index)
    out = tmp_path / "o.lsmt"
    layer.commit(out)
    h = lsmt.load_committed_layer(out.read_bytes()).header
    assert h.uuid == lsmt.NULL_UUID and h.parent_uuid == lsmt.NULL_UUID and h.user_tag == b""
    with pytest.raises(FileExistsError):
        layer.commit(out)
    with pytest.raises(ValueError):
        layer.commit(tmp_path / "o2.lsmt", user_tag=b"x" * 257)
    assert not (tmp_path / "o2.lsmt").exists()
    layer.close()


# ----------------------------------------------------------------------------- model-based

write_op = st.tuples(st.sampled_from(["W", "D"]), st.integers(0, 63), st.integers(1, 24), st.integers(0, 255))


def run_ops(layer, model, ops):
    for kind, sector, count, byte in ops:
        count = min(count, 64 - sector)
        off, n = sector * 512, count * 512
        if kind == "W":
            data = bytes([byte]) * n if byte % 2 else os.urandom(n)
            layer.pwrite(off, data)
            model[off: off + n] = data
        else:
            layer.discard(off, n)
            model[off: off + n] = bytes(n)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops1=st.lists(write_op, max_size=25), ops2=st.lists(write_op, max_size=10), sparse=st.booleans())
def test_random_ops_vs_model(tmp_path_factory, ops1, ops2, sparse):
    d = tmp_path_factory.mktemp("w")
    vsize = 64 * 512
    layer = WritableLayer.create(d / "d", d / "i", vsize, sparse=sparse)
    model = bytearray(vsize)
    run_ops(layer, model, ops1)
    assert layer.read(0, vsize) == model
    layer.close()
    layer = WritableLayer.open(d / "d", d / "i")
    assert layer.read(0, vsize) == model
    run_ops(layer, model, ops2)
    assert layer.read(0, vsize) == model
    layer.fsync()
    layer.commit(d / "c.lsmt", uuid=UUID_A)
    layer.close()
    blob = (d / "c.lsmt").read_bytes()
    c = lsmt.load_committed_layer(blob, source="c.lsmt")
    assert c.header.virtual_size == vsize
    merged = lsmt.merge_stack([c.mappings])
    assert hash_disk(merged, vsize, blob_reader([blob])) == sha(model)


def test_large_write_is_split_into_4mib_pieces(tmp_path):
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", 16 << 20)
    data = os.urandom(9 << 20)
    layer.pwrite(512, data)
    assert [m.length for m in layer.segment_map] == [8192, 8192, 2048]
    assert (tmp_path / "i").stat().st_size == 4096 + 3 * 16
    assert layer.read(512, len(data)) == data
    layer.discard(0, 16 << 20)
    assert all(m.zeroed and m.length <= lsmt.MAX_LENGTH for m in layer.segment_map)
    assert [m.length for m in layer.segment_map] == [16383, 16383, 2]
    layer.close()


def test_alignment_and_bounds(tmp_path):
    layer = WritableLayer.create(tmp_path / "d", tmp_path / "i", 1 << 20)
    for off, n in ((1, 512), (0, 100), (-512, 512)):
        with pytest.raises(ValueError):
            layer.pwrite(off, bytes(n))
        with pytest.raises(ValueError):
            layer.discard(off, n)
    with pytest.raises(ValueError):
        layer.pwrite((1 << 20) - 512, bytes(1024))
    with pytest.raises(ValueError):
        layer.discard((1 << 20) - 512, 1024)
    assert len(layer.segment_map) == 0 and (tmp_path / "i").stat().st_size == 4096
    layer.pwrite(0, b"")
    layer.close()
    layer.close()
    with pytest.raises(ValueError):
        layer.pwrite(0, bytes(512))


def test_set_virtual_size(tmp_path):
    for sparse in (False, True):
        d, i = tmp_path / f"d{sparse}", tmp_path / f"i{sparse}"
        layer = WritableLayer.create(d, i, 0, sparse=sparse)
        assert layer.virtual_size == 0
        layer.set_virtual_size(VSIZE)
        layer.pwrite(VSIZE - 512, b"z" * 512)
        layer.close()
        layer = WritableLayer.open(d, i)
        assert layer.virtual_size == VSIZE
        assert layer.read(VSIZE - 512, 512) == b"z" * 512
        layer.close()
        assert lsmt.parse_header_trailer(d.read_bytes()[:4096]).virtual_size == VSIZE
        if not sparse:
            assert lsmt.parse_header_trailer(i.read_bytes()[:4096]).virtual_size == VSIZE
        else:
            assert d.stat().st_size == VSIZE + 4096


def test_seal_makes_a_readable_committed_layer(tmp_path):
    data, index = copy_rw(tmp_path, "p1")
    layer = WritableLayer.open(data, index)
    layer.seal()
    assert layer.closed
    blob = data.read_bytes()
    c = lsmt.load_committed_layer(blob, source=str(data))
    assert c.header.flags == 3 and c.trailer.flags == 6
    assert c.trailer.index_offset == 1144832 and c.trailer.index_size == 12
    assert c.trailer.uuid == P1_RW_UUID
    assert hash_disk(lsmt.merge_stack([c.mappings]), VSIZE, blob_reader([blob])) == P1_SHA
    # the RW view is still intact (header and index log untouched)
    layer = WritableLayer.open(data, index, read_only=True)
    assert sha(layer.read(0, VSIZE)) == P1_SHA
    layer.close()


# ----------------------------------------------------------------------------- crash leftovers


def test_torn_index_record_is_ignored_and_cut(tmp_path):
    data, index = copy_rw(tmp_path, "p1")
    with open(index, "ab") as f:
        f.write(lsmt.encode_mapping(Mapping(0, 8, 8))[:9])  # a torn 10th record
    layer = WritableLayer.open(data, index)
    assert sha(layer.read(0, VSIZE)) == P1_SHA
    assert index.stat().st_size == 4240  # cut back to whole records
    layer.pwrite(0, b"n" * 512)
    layer.close()
    layer = WritableLayer.open(data, index)
    assert layer.read(0, 512) == b"n" * 512
    layer.close()


def test_unreferenced_partial_data_tail(tmp_path):
    data, index = copy_rw(tmp_path, "p1")
    with open(data, "ab") as f:
        f.write(b"garbage" * 100)  # data of a write whose record never made it
    layer = WritableLayer.open(data, index)
    assert sha(layer.read(0, VSIZE)) == P1_SHA
    layer.pwrite(4096, b"q" * 1024)
    assert layer.read(4096, 1024) == b"q" * 1024
    layer.close()
    layer = WritableLayer.open(data, index)
    assert layer.read(4096, 1024) == b"q" * 1024
    assert all(m.moffset * 512 % 512 == 0 for m in layer.segment_map)
    layer.close()


# ----------------------------------------------------------------------------- bad input


def _expect(tmp_path, data, index, *, names, offset=None, match=None):
    with pytest.raises(FormatError) as ei:
        WritableLayer.open(data, index)
    e = ei.value
    assert e.source == str(names) and str(names) in str(e)
    if offset is not None:
        assert e.offset == offset and f"offset {offset}" in str(e)
    if match:
        assert match in str(e)


def test_bad_data_header(tmp_path):
    data, index = copy_rw(tmp_path, "p1")
    b = bytearray(data.read_bytes())
    b[3] ^= 1
    data.write_bytes(b)
    _expect(tmp_path, data, index, names=data, offset=0, match="magic")
    data.write_bytes(b"")
    _expect(tmp_path, data, index, names=data, offset=0)
    shutil.copyfile(PATTERN / "layers/P1.lsmt", data)
    _expect(tmp_path, data, index, names=data, offset=28, match="sealed")


def test_bad_index_header(tmp_path):
    data, index = copy_rw(tmp_path, "p1")
    orig = index.read_bytes()
    b = bytearray(orig)
    struct.pack_into("<Q", b, 32, 8192)
    index.write_bytes(b)
    _expect(tmp_path, data, index, names=index, offset=32, match="index_offset")
    b = bytearray(orig)
    struct.pack_into("<I", b, 28, 3)  # a data header in the index file
    index.write_bytes(b)
    _expect(tmp_path, data, index, names=index, offset=28)
    b = bytearray(orig)
    struct.pack_into("<I", b, 24, 12)
    index.write_bytes(b)
    _expect(tmp_path, data, index, names=index, offset=24, match="size field")
    index.write_bytes(orig[:100])
    _expect(tmp_path, data, index, names=index, offset=0)


def test_index_entry_out_of_bounds(tmp_path):
    data, index = copy_rw(tmp_path, "p1")
    end = data.stat().st_size // 512
    for m in (Mapping(0, 8, 7), Mapping(0, 8, end - 4), Mapping(0, 8, end + 1, True)):
        with open(index, "r+b") as f:
            f.seek(4096 + 16 * 3)
            f.write(lsmt.encode_mapping(m))
        _expect(tmp_path, data, index, names=index, offset=4096 + 48, match="outside")


def test_index_too_big_is_refused_before_reading(tmp_path):
    data, index = copy_rw(tmp_path, "p1")
    with open(index, "r+b") as f:
        f.truncate(4096 + 16 * (lsmt.MAX_RW_INDEX + 1))  # sparse: no disk used
    _expect(tmp_path, data, index, names=index, match="more than")


def test_sparse_layer_without_index_file(tmp_path):
    layer = WritableLayer.create(tmp_path / "d", None, 1 << 20, sparse=True)
    layer.pwrite(8192, b"a" * 4096)
    layer.discard(8192, 512)
    assert layer.read(8192, 1024) == bytes(512) + b"a" * 512
    layer.fsync()
    layer.close()
    layer = WritableLayer.open(tmp_path / "d", tmp_path / "missing.index")
    assert layer.read(8192, 1024) == bytes(512) + b"a" * 512
    # after a reopen the map comes from SEEK_DATA: whole filesystem blocks
    (m,) = layer.segment_map.mappings()
    assert m.offset <= 17 and m.end >= 24 and m.moffset == m.offset + 8 and not m.zeroed
    layer.close()
    with pytest.raises(ValueError):
        WritableLayer.create(tmp_path / "d2", None, 1 << 20)
    assert not (tmp_path / "d2").exists()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 4240 + 20), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, 40))
def test_fuzz_rw_index_opens_or_raises_format_error(tmp_path_factory, flips, cut):
    d = tmp_path_factory.mktemp("fz")
    data, index = copy_rw(d, "p1")
    b = bytearray(index.read_bytes())
    for pos, val in flips:
        pos = pos if pos < 400 else 4096 + (pos - 400) % (len(b) - 4096)
        b[pos] = val
    index.write_bytes(bytes(b[: len(b) - cut]))
    try:
        layer = WritableLayer.open(data, index)
    except FormatError as e:
        assert e.source in (str(index), str(data))
    else:
        maps = layer.segment_map.mappings()
        assert all(a.end <= c.offset for a, c in zip(maps, maps[1:]))
        layer.read(0, VSIZE)
        layer.close()


def test_crash_at_every_index_byte(tmp_path):
    """Cut the index log at every byte (a crash mid-append): the layer opens and shows exactly
    the writes whose records are whole; the data file may hold more than the log refers to."""
    vsize = 32 * 512
    d, i = tmp_path / "d", tmp_path / "i"
    layer = WritableLayer.create(d, i, vsize)
    model = bytearray(vsize)
    snapshots = [bytes(model)]
    ops = [("W", 0, 4), ("W", 2, 6), ("D", 1, 3), ("W", 30, 2), ("D", 0, 32), ("W", 5, 1)]
    for n, (kind, sector, count) in enumerate(ops):
        off, length = sector * 512, count * 512
        if kind == "W":
            data = bytes([n + 1]) * length
            layer.pwrite(off, data)
            model[off: off + length] = data
        else:
            layer.discard(off, length)
            model[off: off + length] = bytes(length)
        snapshots.append(bytes(model))
    layer.close()
    full_index = i.read_bytes()
    assert len(full_index) == 4096 + 16 * len(ops)
    for cut in range(4096, len(full_index) + 1):
        i.write_bytes(full_index[:cut])
        layer = WritableLayer.open(d, i)
        assert layer.read(0, vsize) == snapshots[(cut - 4096) // 16], cut
        layer.close()
