"""LSMT codec: upstream fixtures, byte-identical commits, models, hostile input."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_obd.errors import FormatError
from tcmu_obd.format import lsmt
from tcmu_obd.format.lsmt import Mapping, SegmentMap
from tests.support.paths import FIXTURES_OBD

PATTERN = FIXTURES_OBD / "pattern"
EXT4 = FIXTURES_OBD / "ext4-chain"
EXPECTED = json.loads((FIXTURES_OBD / "expected.json").read_text())
P1_SHA = EXPECTED["pattern"]["images"]["p1"]["raw_sha256"]
P12_SHA = EXPECTED["pattern"]["images"]["p12"]["raw_sha256"]
L1_SHA = EXPECTED["ext4-chain"]["images"]["L1"]["raw_sha256"]
L12_SHA = EXPECTED["ext4-chain"]["images"]["L12"]["raw_sha256"]

UUID_A = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
UUID_B = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
UUID_1 = "11111111-1111-4111-8111-111111111111"
UUID_2 = "22222222-2222-4222-8222-222222222222"

_ZEROS = bytes(1 << 20)


# ----------------------------------------------------------------------------- tiny reader


def hash_disk(merged: SegmentMap, vsize: int, read) -> str:
    """sha256 of a virtual disk: `read(tag, moffset, length)` returns a data mapping's
    bytes; holes and zeroed runs hash as zeros, fed in 1 MiB chunks."""
    h = hashlib.sha256()

    def zeros(n: int) -> None:
        while n > 0:
            k = min(n, len(_ZEROS))
            h.update(_ZEROS[:k])
            n -= k

    sectors = vsize // lsmt.SECTOR
    for off, length, m in merged.lookup(0, sectors):
        if m is None or m.zeroed:
            zeros(length * lsmt.SECTOR)
        else:
            h.update(read(m.tag, m.moffset, m.length))
    return h.hexdigest()


def blob_reader(blobs):
    def read(tag, moffset, length):
        b = blobs[tag][moffset * 512: (moffset + length) * 512]
        assert len(b) == length * 512
        return b

    return read


def load(path):
    blob = path.read_bytes()
    return blob, lsmt.load_committed_layer(blob, source=str(path))


# ----------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize(
    "rel, uuid, parent, tag, valid",
    [
        ("pattern/layers/P1.lsmt", UUID_A, lsmt.NULL_UUID, b"pattern p1", 7),
        ("pattern/layers/P2.lsmt", UUID_B, UUID_A, b"pattern p2", 4),
        ("ext4-chain/layers/L1.lsmt", UUID_1, lsmt.NULL_UUID, b"obd-fixture layer1", 13),
        ("ext4-chain/layers/L2.lsmt", UUID_2, UUID_1, b"obd-fixture layer2", 11),
    ],
)
def test_committed_fixture_header_trailer(rel, uuid, parent, tag, valid):
    blob, layer = load(FIXTURES_OBD / rel)
    h, t = layer.header, layer.trailer
    assert h.flags == 7 and t.flags == 6
    assert h.is_header and h.is_data_file and h.is_sealed and not h.is_sparse
    assert t.is_trailer and t.is_data_file and t.is_sealed
    assert h.index_offset == 0 and h.index_size == 0
    assert t.index_size == 256  # padded to a multiple of 256 entries
    assert t.index_offset % 512 == 0
    assert t.index_offset + t.index_size * 16 + 4096 == len(blob)
    for ht in (h, t):
        assert ht.uuid == uuid.upper() and ht.parent_uuid == parent.upper()
        assert ht.user_tag == tag and ht.version == 1 and ht.sub_version == 1
    assert len(layer.mappings) == valid
    assert all(m.tag == 0 for m in layer.mappings)
    # the raw entries past the valid ones are invalid padding
    raw = blob[t.index_offset + valid * 16: t.index_offset + t.index_size * 16]
    assert raw == lsmt.invalid_entries(256 - valid)


def test_p1_index_values():
    _, layer = load(PATTERN / "layers/P1.lsmt")
    assert layer.trailer.index_offset == 1115648
    assert layer.header.virtual_size == 8 << 20
    assert layer.mappings == [
        Mapping(0, 128, 8), Mapping(2049, 8, 136), Mapping(4096, 1024, 144), Mapping(5120, 32, 1168, True),
        Mapping(5152, 1000, 1168), Mapping(10240, 3, 2168), Mapping(16376, 8, 2171),
    ]


def test_pattern_raw_images():
    b1, l1 = load(PATTERN / "layers/P1.lsmt")
    b2, l2 = load(PATTERN / "layers/P2.lsmt")
    vsize = EXPECTED["pattern"]["virtual_size"]
    assert hash_disk(lsmt.merge_stack([l1.mappings]), vsize, blob_reader([b1])) == P1_SHA
    assert hash_disk(lsmt.merge_stack([l1.mappings, l2.mappings]), vsize, blob_reader([b1, b2])) == P12_SHA


def test_ext4_raw_images():
    b1, l1 = load(EXT4 / "layers/L1.lsmt")
    b2, l2 = load(EXT4 / "layers/L2.lsmt")
    vsize = EXPECTED["ext4-chain"]["virtual_size"]
    assert l1.header.virtual_size == l2.header.virtual_size == vsize
    assert max(m.length for m in l1.mappings) == 10496
    assert hash_disk(lsmt.merge_stack([l1.mappings]), vsize, blob_reader([b1])) == L1_SHA
    merged = lsmt.merge_stack([l1.mappings, l2.mappings])
    assert {m.tag for m in merged} == {0, 1}
    assert hash_disk(merged, vsize, blob_reader([b1, b2])) == L12_SHA


@pytest.mark.parametrize("rel", ["pattern/layers/P1.lsmt", "pattern/layers/P2.lsmt",
                                 "ext4-chain/layers/L1.lsmt", "ext4-chain/layers/L2.lsmt"])
def test_recommit_committed_layer_is_identity(rel):
    blob, layer = load(FIXTURES_OBD / rel)
    h = layer.header
    plan = lsmt.plan_commit(layer.mappings)
    header, index, trailer = lsmt.build_committed_layer_parts(
        plan, virtual_size=h.virtual_size, uuid=h.uuid, parent_uuid=h.parent_uuid, user_tag=h.user_tag)
    data = b"".join(blob[m.moffset * 512: (m.moffset + m.length) * 512] for m, _ in plan.copies)
    assert header + data + index + trailer == blob
    assert plan.blob_size == len(blob)


def _rw_maps(name):
    data = (PATTERN / f"rw/{name}.data").read_bytes()
    index = (PATTERN / f"rw/{name}.index").read_bytes()
    dh = lsmt.parse_header_trailer(data[:4096])
    ih = lsmt.parse_header_trailer(index[:4096])
    assert dh.flags == 3 and ih.flags == 1 and ih.index_offset == 4096 and ih.index_size == 0
    return data, dh, lsmt.replay_rw_index(lsmt.decode_mappings(index[4096:]), len(data) // 512)


@pytest.mark.parametrize("name, uuid, parent, tag, expected", [
    ("p1", UUID_A, None, "pattern p1", "P1.lsmt"),
    ("p2", UUID_B, UUID_A, "pattern p2", "P2.lsmt"),
])
def test_commit_rw_fixture_byte_identical(name, uuid, parent, tag, expected):
    data, dh, maps = _rw_maps(name)
    plan = lsmt.plan_commit(maps)
    header, index, trailer = lsmt.build_committed_layer_parts(
        plan, virtual_size=dh.virtual_size, uuid=uuid, parent_uuid=parent or dh.parent_uuid, user_tag=tag)
    body = b"".join(data[m.moffset * 512: (m.moffset + m.length) * 512] for m, _ in plan.copies)
    out = header + body + index + trailer
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256((PATTERN / "layers" / expected).read_bytes()).hexdigest()


def test_rw_p1_punch_is_kept_as_zeroed_mapping():
    # The log-structured layer logs the punch as a zeroed record; commit keeps it with
    # moffset = data cursor (P1.lsmt has {5120, 32, 1168, zeroed}).
    _, _, maps = _rw_maps("p1")
    assert Mapping(5120, 32, 2224, True) in maps


# ----------------------------------------------------------------------------- header codec


def test_header_roundtrip_and_layout():
    b = lsmt.build_header_trailer(flags=7, virtual_size=123 * 512, uuid=UUID_A, parent_uuid=None,
                                  user_tag="hello")
    assert len(b) == 4096
    assert b[:8] == lsmt.MAGIC0 and b[8:24] == lsmt.MAGIC1
    assert struct.unpack_from("<II", b, 24) == (390, 7)
    assert b[56:93] == UUID_A.upper().encode() + b"\0"
    assert b[93:130] == lsmt.NULL_UUID.encode() + b"\0"
    assert b[132:134] == b"\x01\x01" and b[134:139] == b"hello" and b[139:] == bytes(4096 - 139)
    h = lsmt.parse_header_trailer(b)
    assert (h.flags, h.virtual_size, h.uuid, h.parent_uuid, h.user_tag) == (7, 123 * 512, UUID_A.upper(),
                                                                          lsmt.NULL_UUID, b"hello")
    assert not h.has_parent
    # trailing data after the area does not matter
    assert lsmt.parse_header_trailer(b + b"junk") == h


def test_header_rejects_long_tag_and_bad_uuid():
    with pytest.raises(ValueError):
        lsmt.build_header_trailer(flags=7, virtual_size=0, user_tag=b"x" * 257)
    lsmt.build_header_trailer(flags=7, virtual_size=0, user_tag=b"x" * 256)
    with pytest.raises(ValueError):
        lsmt.build_header_trailer(flags=7, virtual_size=0, uuid="not-a-uuid")


def test_header_truncated_at_every_length():
    b = lsmt.build_header_trailer(flags=3, virtual_size=4096)
    for n in range(0, 390):
        with pytest.raises(FormatError):
            lsmt.parse_header_trailer(b[:n], source="x")
    lsmt.parse_header_trailer(b[:390])


# ----------------------------------------------------------------------------- entry codec

mapping_st = st.builds(
    Mapping,
    offset=st.integers(0, lsmt.INVALID_OFFSET - 1),
    length=st.integers(0, lsmt.MAX_LENGTH),
    moffset=st.integers(0, lsmt.MAX_MOFFSET),
    zeroed=st.booleans(),
    tag=st.just(0),
)


@given(st.lists(mapping_st, max_size=20))
def test_entry_roundtrip(maps):
    assert lsmt.decode_mappings(lsmt.encode_mappings(maps)) == maps


def test_entry_bit_layout_matches_spec_examples():
    assert lsmt.decode_mappings(bytes.fromhex("00000000000040810800000000000000")) == [Mapping(0, 8272, 8)]
    assert lsmt.decode_mappings(bytes.fromhex("502000000000e0015820000000008000")) == [
        Mapping(8272, 120, 8280, True)]
    assert lsmt.invalid_entries(1) == bytes.fromhex("ffffffffffff03000000000000000000")
    assert lsmt.decode_mappings(lsmt.invalid_entries(3)) == []
    # on-disk tags are ignored (overlaybd-merge writes non-zero ones)
    raw = bytearray(lsmt.encode_mapping(Mapping(1, 2, 8)))
    raw[15] = 7
    assert lsmt.decode_mappings(bytes(raw)) == [Mapping(1, 2, 8)]


def test_split_extent():
    assert lsmt.split_extent(0, 16383 * 2 + 5, 8) == [
        Mapping(0, 16383, 8), Mapping(16383, 16383, 8 + 16383), Mapping(32766, 5, 8 + 32766)]
    assert lsmt.split_extent(10, 20000, 99, zeroed=True) == [
        Mapping(10, 16383, 99, True), Mapping(16393, 3617, 99, True)]
    assert lsmt.split_extent(0, 0, 8) == []


# ----------------------------------------------------------------------------- SegmentMap model

op_st = st.tuples(st.integers(0, 120), st.integers(1, 40), st.booleans())


def model_apply(model: dict, m: Mapping):
    for s in range(m.offset, m.end):
        model[s] = (m.tag, None if m.zeroed else m.moffset + (s - m.offset), m.zeroed)


def model_of(pieces):
    out = {}
    for off, length, m in pieces:
        if m is None:
            continue
        assert m.offset == off and m.length == length
        for s in range(off, off + length):
            out[s] = (m.tag, None if m.zeroed else m.moffset + (s - off), m.zeroed)
    return out


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, max_size=40), st.integers(0, 170), st.integers(0, 80))
def test_segment_map_vs_model(ops, q_off, q_len):
    sm = SegmentMap()
    model = {}
    moff = 8
    for i, (off, length, zeroed) in enumerate(ops):
        m = Mapping(off, length, moff, zeroed, tag=i % 3)
        moff += length
        sm.insert(m)
        model_apply(model, m)
    maps = sm.mappings()
    assert len(sm) == len(maps)
    for a, b in zip(maps, maps[1:]):
        assert a.end <= b.offset
    assert model_of((m.offset, m.length, m) for m in maps) == model
    pieces = sm.lookup(q_off, q_len)
    pos = q_off
    for off, length, _ in pieces:
        assert off == pos and length > 0
        pos += length
    assert pos == q_off + q_len
    assert model_of(pieces) == {s: v for s, v in model.items() if q_off <= s < q_off + q_len}
    for off, length, m in pieces:
        if m is None:
            assert not any(s in model for s in range(off, off + length))


def test_segment_map_insert_split_and_zeroed_trim():
    sm = SegmentMap([Mapping(0, 100, 8), Mapping(200, 50, 500, True)])
    sm.insert(Mapping(10, 5, 1000))
    sm.insert(Mapping(190, 20, 2000))
    assert sm.mappings() == [Mapping(0, 10, 8), Mapping(10, 5, 1000), Mapping(15, 85, 23),
                             Mapping(190, 20, 2000), Mapping(210, 40, 500, True)]
    assert sm.lookup(95, 10) == [(95, 5, Mapping(95, 5, 103)), (100, 5, None)]
    assert sm.lookup(0, 0) == []


def test_segment_map_large_append_and_lookup_is_fast():
    sm = SegmentMap()
    n = 200_000
    for i in range(n):
        sm.insert(Mapping(i * 2, 1, 8 + i))
    assert len(sm) == n
    assert sm.lookup(2 * 150_000, 2) == [(300000, 1, Mapping(300000, 1, 8 + 150_000)), (300001, 1, None)]


# ----------------------------------------------------------------------------- merge_stack model

layer_st = st.lists(st.tuples(st.integers(0, 100), st.integers(1, 30), st.booleans()), max_size=12)


def _layer(ops, tag_base):
    sm = SegmentMap()
    for k, (off, length, zeroed) in enumerate(ops):
        sm.insert(Mapping(off, length, 8 + tag_base * 1000 + k * 40, zeroed))
    return sm.mappings()


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(layer_st, min_size=1, max_size=5))
def test_merge_stack_vs_model(layer_ops):
    layers = [_layer(ops, i) for i, ops in enumerate(layer_ops)]
    model = {}
    for i, maps in enumerate(layers):  # bottom -> top: later overrides
        for m in maps:
            model_apply(model, m.with_tag(i))
    merged = lsmt.merge_stack(layers)
    maps = merged.mappings()
    for a, b in zip(maps, maps[1:]):
        assert a.end <= b.offset
    assert model_of((m.offset, m.length, m) for m in maps) == model


def test_merge_stack_limits():
    with pytest.raises(ValueError):
        lsmt.merge_stack([[]] * 256)
    assert len(lsmt.merge_stack([])) == 0


# ----------------------------------------------------------------------------- commit planning


def reference_commit_index(maps):
    """Upstream compact(), literally: 32 KiB pieces then the greedy merge."""
    pieces = []
    cursor = 8
    for m in maps:
        if m.zeroed:
            pieces.append(Mapping(m.offset, m.length, cursor, True))
            continue
        done = 0
        while done < m.length:
            n = min(64, m.length - done)
            pieces.append(Mapping(m.offset + done, n, cursor))
            cursor += n
            done += n
    out = []
    for p in pieces:
        if out:
            c = out[-1]
            cmend = c.moffset if c.zeroed else c.moffset + c.length
            if c.end == p.offset and cmend == p.moffset and c.zeroed == p.zeroed and c.length + p.length < 16383:
                out[-1] = Mapping(c.offset, c.length + p.length, c.moffset, c.zeroed)
                continue
        out.append(p)
    return out


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 16383), st.booleans()), max_size=12))
def test_plan_commit_matches_reference(gaps):
    maps = []
    pos = 0
    for gap, length, zeroed in gaps:
        pos += gap
        maps.append(Mapping(pos, length, 8 + pos, zeroed))
        pos += length
    plan = lsmt.plan_commit(maps)
    assert plan.index == reference_commit_index(maps)
    assert plan.data_sectors == sum(m.length for m in maps if not m.zeroed)
    dest = 8
    for m, d in plan.copies:
        assert d == dest and not m.zeroed
        dest += m.length
    assert all(m.length <= lsmt.MAX_LENGTH for m in plan.index)


def test_commit_merge_rule_edges():
    # a full-length mapping comes out as 16320 + 63 (merge stops strictly below 16383)
    assert lsmt.plan_commit([Mapping(0, 16383, 8)]).index == [Mapping(0, 16320, 8), Mapping(16320, 63, 16328)]
    # adjacent zeroed runs merge (zeroed mend == moffset), zeroed never merges with data
    assert lsmt.compact_mappings([Mapping(0, 5, 8, True), Mapping(5, 5, 8, True), Mapping(10, 5, 8)]) == [
        Mapping(0, 10, 8, True), Mapping(10, 5, 8)]
    # an empty layer: no index entries, no padding
    plan = lsmt.plan_commit([])
    header, index, trailer = lsmt.build_committed_layer_parts(plan, virtual_size=4096)
    blob = header + index + trailer
    assert len(blob) == 8192 and index == b""
    layer = lsmt.load_committed_layer(blob)
    assert layer.mappings == [] and layer.trailer.index_offset == 4096


def test_sealed_tail_is_readable_as_committed_layer():
    maps = [Mapping(0, 3, 8), Mapping(5, 2, 11, True)]
    header = lsmt.build_header_trailer(flags=lsmt.FLAGS_RW_DATA, virtual_size=8192, uuid=UUID_A)
    data = header + b"\x01" * 1536
    blob = data + lsmt.build_sealed_tail(maps, len(data), virtual_size=8192, uuid=UUID_A, parent_uuid=None)
    layer = lsmt.load_committed_layer(blob, source="sealed")
    assert layer.mappings == maps
    assert layer.trailer.flags == 6 and layer.trailer.index_size == 2 and layer.trailer.index_offset == len(data)


# ----------------------------------------------------------------------------- hostile input


def _p1():
    return bytearray((PATTERN / "layers/P1.lsmt").read_bytes())


def _expect_error(blob, *, offset=None, match=None):
    with pytest.raises(FormatError) as ei:
        lsmt.load_committed_layer(bytes(blob), source="bad.lsmt")
    e = ei.value
    assert e.source == "bad.lsmt" and "bad.lsmt" in str(e)
    assert e.offset is not None and f"offset {e.offset}" in str(e)
    if offset is not None:
        assert e.offset == offset
    if match is not None:
        assert match in str(e)
    return e


def test_bad_magic_header_and_trailer():
    b = _p1()
    b[0] ^= 0xFF
    _expect_error(b, offset=0, match="magic")
    b = _p1()
    b[len(b) - 4096 + 10] ^= 0x01
    _expect_error(b, offset=len(b) - 4096, match="magic")


def test_wrong_size_field():
    b = _p1()
    struct.pack_into("<I", b, 24, 391)
    _expect_error(b, offset=24, match="size field")


def test_trailer_flags():
    b = _p1()
    t = len(b) - 4096
    struct.pack_into("<I", b, t + 28, 2)  # not sealed
    _expect_error(b, offset=t + 28, match="not sealed")
    struct.pack_into("<I", b, t + 28, 7)  # a header where the trailer belongs
    _expect_error(b, offset=t + 28, match="header")
    struct.pack_into("<I", b, t + 28, 4)  # index-file trailer
    _expect_error(b, offset=t + 28, match="data-file")
    b = _p1()
    struct.pack_into("<I", b, 28, 5)  # header says index file
    _expect_error(b, offset=28, match="index file")


def test_index_size_limits():
    b = _p1()
    t = len(b) - 4096
    struct.pack_into("<Q", b, t + 40, 1_000_001)
    _expect_error(b, offset=t + 40, match="exceeds")
    struct.pack_into("<Q", b, t + 40, 2**63)
    _expect_error(b, offset=t + 40)
    struct.pack_into("<Q", b, t + 40, 257)  # one entry into the trailer
    _expect_error(b, offset=t + 40, match="past the trailer")
    b = _p1()
    struct.pack_into("<Q", b, t + 32, 2**64 - 512)  # index_offset beyond the blob
    _expect_error(b, offset=t + 32)
    struct.pack_into("<Q", b, t + 32, 512)  # inside the header
    _expect_error(b, offset=t + 32)


def test_overlapping_and_unordered_entries():
    b = _p1()
    io = 1115648
    # entry 1 {2049, 8} -> {100, 8} overlaps entry 0 {0, 128}
    b[io + 16: io + 32] = lsmt.encode_mapping(Mapping(100, 8, 136))
    _expect_error(b, offset=io + 16, match="overlapping")
    b = _p1()
    b[io + 16: io + 32] = lsmt.encode_mapping(Mapping(127, 8, 136))
    _expect_error(b, offset=io + 16)


def test_moffset_out_of_bounds():
    io = 1115648
    for m in (Mapping(0, 128, 7), Mapping(0, 128, io // 512 - 127), Mapping(0, 128, 2**54),
              Mapping(0, 128, io // 512 + 1, True)):
        b = _p1()
        b[io: io + 16] = lsmt.encode_mapping(m)
        _expect_error(b, offset=io, match="outside")
    b = _p1()
    b[io: io + 16] = lsmt.encode_mapping(Mapping(0, 128, io // 512, True))  # zeroed may sit at the end
    lsmt.load_committed_layer(bytes(b))


def test_truncated_and_empty():
    b = bytes(_p1())
    for n in (0, 1, 4095, 4096, 8191):
        _expect_error(b[:n], offset=0)
    # cut in the middle: the last 4 KiB is not a trailer any more
    _expect_error(b[: len(b) - 100])


def test_decode_committed_index_partial_entry():
    with pytest.raises(FormatError) as ei:
        lsmt.decode_committed_index(b"\0" * 17, 4096, source="x")
    assert ei.value.offset == 4096


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2 ** 31), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_parses_or_raises_format_error(flips):
    small = bytearray((PATTERN / "layers/P2.lsmt").read_bytes())
    for pos, val in flips:
        # aim at the structured areas: header, index, trailer
        areas = [(0, 400), (90112, 90112 + 4096), (len(small) - 4096, len(small) - 4096 + 400)]
        a, z = areas[pos % 3]
        small[a + (pos // 3) % (z - a)] = val
    try:
        layer = lsmt.load_committed_layer(bytes(small), source="fuzz")
    except FormatError as e:
        assert e.source == "fuzz"
    else:
        for a, b in zip(layer.mappings, layer.mappings[1:]):
            assert a.end <= b.offset


def test_replay_rw_log_and_index():
    recs = lsmt.encode_mappings([Mapping(0, 8, 8), Mapping(4, 8, 16)]) + lsmt.invalid_entries(1) + \
        lsmt.encode_mappings([Mapping(2, 1, 30, True), Mapping(0, 1, 100)])
    sm = lsmt.replay_rw_log(recs[:64], 31, source="i")
    assert sm.mappings() == [Mapping(0, 2, 8), Mapping(2, 1, 30, True), Mapping(3, 1, 11), Mapping(4, 8, 16)]
    with pytest.raises(FormatError) as ei:
        lsmt.replay_rw_log(recs, 31, source="i", base_offset=4096)
    assert ei.value.offset == 4096 + 64 and ei.value.source == "i"
    assert lsmt.replay_rw_index(lsmt.decode_mappings(recs[:64]), 31) == sm.mappings()
    with pytest.raises(FormatError):
        lsmt.replay_rw_index([Mapping(0, 8, 4)], 31)
    # a torn trailing record is ignored by the decoder
    assert lsmt.replay_rw_log(recs[:40], 31).mappings() == [Mapping(0, 4, 8), Mapping(4, 8, 16)]
