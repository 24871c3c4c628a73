"""Tar wrapper detection and writing (sans-IO)."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_obd.errors import FormatError
from tcmu_obd.format import tar
from tests.support.paths import FIXTURES_OBD, FIXTURES_UPSTREAM

PLAIN_TAR = FIXTURES_OBD / "zfile/compressed/plain.lz4.tar"
L2_TAR = FIXTURES_OBD / "ext4-chain/layers/L2.lz4.tar"
HELLO = FIXTURES_UPSTREAM / "hello-world-oci/hello-world/blobs/sha256/" \
    "022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"


@pytest.mark.parametrize("path,size", [(PLAIN_TAR, 317723), (L2_TAR, 413416), (HELLO, 639491)])
def test_detect_upstream_wrappers(path, size):
    blob = path.read_bytes()
    p = tar.detect(blob[:1536], blob_size=len(blob))
    assert p == tar.TarPayload(1536, size, "overlaybd.commit", True)
    assert blob[1536:1536 + 24].startswith(b"ZFile\x00\x01\x00")


@pytest.mark.parametrize("path,size", [(PLAIN_TAR, 317723), (L2_TAR, 413416), (HELLO, 639491)])
def test_writer_byte_identical(path, size):
    blob = path.read_bytes()
    assert tar.build_wrapper_header(size) == blob[:1536]
    assert tar.wrapper_tail(size) == blob[1536 + size:]
    assert tar.wrapped_size(size) == len(blob)


def test_detect_whole_bytewise_and_trailing():
    blob = PLAIN_TAR.read_bytes()
    want = tar.detect(blob[:1536])
    assert tar.detect(blob) == want  # trailing data beyond 1536 bytes is ignored
    assert tar.detect(memoryview(blob)[:1536]) == want
    for n in range(0, 512, 64):
        assert tar.detect(blob[:n]) is None  # too short to be a tar header
    for n in range(512, 1536, 128):  # a PAX header whose payload offset is not there yet
        with pytest.raises(FormatError, match="truncated"):
            tar.detect(blob[:n], source="t")


def test_python_tarfile_reads_our_wrapper():
    payload = b"ZFile payload" * 100
    blob = tar.build_wrapper_header(len(payload), mode=0o600) + payload + tar.wrapper_tail(len(payload))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        (m,) = tf.getmembers()
        assert m.name == "overlaybd.commit" and m.size == len(payload) and m.mode & 0o7777 == 0o600
        assert m.uname == "root" and m.mtime == 0
        assert tf.extractfile(m).read() == payload
    assert tar.detect(blob) == tar.TarPayload(1536, len(payload), "overlaybd.commit", True)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_detect_plain_ustar_and_python_pax(fmt):
    payload = bytes(range(256)) * 9
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=fmt) as tf:
        info = tarfile.TarInfo("layer.bin")
        info.size = len(payload)
        if fmt == tarfile.PAX_FORMAT:
            info.pax_headers = {"comment": "x"}
        tf.addfile(info, io.BytesIO(payload))
    blob = bio.getvalue()
    p = tar.detect(blob[:1536], blob_size=len(blob))
    assert p is not None
    assert blob[p.offset:p.offset + p.size] == payload
    assert p.pax == (fmt == tarfile.PAX_FORMAT)


def test_gnu_tar_is_not_a_wrapper():
    # upstream requires ustar version "00"; GNU tar writes "ustar  \0"
    assert tar.detect((FIXTURES_OBD / "ext4-chain/inputs/layer1.tar").read_bytes()[:1536]) is None


def test_signed_checksum_accepted():
    # Old writers summed header bytes as signed chars; upstream accepts either sum.
    payload = b"x" * 10
    h = bytearray(tar.build_wrapper_header(len(payload))[1024:1536])  # the plain header
    h[0:100] = bytes(100)
    h[0:16] = "überlaybd.commi".encode()[:16]  # bytes >= 0x80 make signed and unsigned sums differ
    h[124:136] = b"%011o " % len(payload)
    h[148:156] = b" " * 8
    unsigned = sum(h)
    signed = unsigned - 256 * sum(1 for b in h if b & 0x80)
    assert 0 < signed != unsigned
    h[148:156] = b"%06o\0 " % signed
    p = tar.detect(bytes(h) + payload)
    assert p == tar.TarPayload(512, len(payload), "überlaybd.commi", False)
    h[148:156] = b"%06o\0 " % unsigned
    assert tar.detect(bytes(h) + payload) == p
    h[148:156] = b"%06o\0 " % (unsigned + 1)
    assert tar.detect(bytes(h) + payload) is None


def test_bad_checksum_or_magic_is_not_tar():
    blob = bytearray(PLAIN_TAR.read_bytes()[:1536])
    blob[5] ^= 1
    assert tar.detect(bytes(blob)) is None
    blob = bytearray(PLAIN_TAR.read_bytes()[:1536])
    blob[263:265] = b" \0"
    assert tar.detect(bytes(blob)) is None
    assert tar.detect(bytes(1536)) is None
    zfile = (FIXTURES_OBD / "zfile/compressed/plain.lz4.zfile").read_bytes()
    assert tar.detect(zfile[:1536]) is None


def _repax(records: bytes) -> bytes:
    """A wrapper whose PAX block holds `records` (header checksum fixed up)."""
    head = bytearray(tar.build_wrapper_header(100))
    head[512:1024] = records + bytes(512 - len(records))
    h = head[:512]
    h[124:136] = b"%11o " % len(records)
    h[148:156] = b" " * 8
    h[148:156] = b"%6o \0" % sum(h)
    head[:512] = h
    return bytes(head)


@pytest.mark.parametrize("records", [b"15 size=abcdef\n", b"99 size=1\n", b"x size=1\n", b"9 nosize\n",
                                     b"10 size=10", b"5 size=1\n", b"15 size=-10000\n"])
def test_malformed_pax_records(records):
    with pytest.raises(FormatError):
        tar.detect(_repax(records), source="bad.tar")


def test_pax_without_size_falls_back_to_header_size():
    head = bytearray(_repax(b"12 path=abc\n"))
    plain = head[1024:1536]
    plain[124:136] = b"%11o " % 77
    plain[148:156] = b" " * 8
    plain[148:156] = b"%6o \0" % sum(plain)
    head[1024:1536] = plain
    p = tar.detect(bytes(head))
    assert p == tar.TarPayload(1536, 77, "abc", True)


def test_pax_too_large():
    head = bytearray(tar.build_wrapper_header(100))
    h = head[:512]
    h[124:136] = b"%11o " % 600
    h[148:156] = b" " * 8
    h[148:156] = b"%6o \0" % sum(h)
    head[:512] = h
    with pytest.raises(FormatError, match="larger than one block"):
        tar.detect(bytes(head))


def test_payload_past_blob_end():
    blob = PLAIN_TAR.read_bytes()
    with pytest.raises(FormatError, match="past the end") as ei:
        tar.detect(blob[:1536], blob_size=100000, source="short.tar")
    assert ei.value.source == "short.tar" and ei.value.offset == 1536


def test_base256_size():
    h = bytearray(tar.build_wrapper_header(0)[1024:1536])
    big = 10 * (1 << 33)
    h[124:136] = bytes([0x80]) + big.to_bytes(11, "big")
    h[148:156] = b" " * 8
    h[148:156] = b"%6o \0" % sum(h)
    assert tar.detect(bytes(h)).size == big


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 2**40))
def test_header_roundtrip_any_size(size):
    head = tar.build_wrapper_header(size)
    assert len(head) == 1536
    assert tar.detect(head) == tar.TarPayload(1536, size, "overlaybd.commit", True)
    assert (1536 + size + len(tar.wrapper_tail(size))) % 512 == 0


@settings(max_examples=100, deadline=None)
@given(pos=st.integers(0, 1535), val=st.integers(0, 255))
def test_fuzz_detect_none_payload_or_format_error(pos, val):
    blob = bytearray(PLAIN_TAR.read_bytes()[:1536])
    blob[pos] = val
    try:
        p = tar.detect(bytes(blob), source="fuzz")
    except FormatError:
        return
    assert p is None or p.offset in (512, 1536)
