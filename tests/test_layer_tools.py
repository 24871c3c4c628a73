"""`create` / `commit` / `build` through the real CLI entry point."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile

import pytest
import zstandard

from tcmu_obd.cli import main
from tcmu_obd.format import lsmt
from tcmu_obd.image.writable import WritableLayer
from tests.format.test_lsmt import P1_SHA, P12_SHA, PATTERN, UUID_A, UUID_B, blob_reader, hash_disk

VSIZE = 8 << 20


def raw_p1() -> bytes:
    return zstandard.ZstdDecompressor().decompress((PATTERN / "expected/raw.p1.img.zst").read_bytes(),
                                                   max_output_size=VSIZE)


def disk_sha(blob: bytes) -> str:
    c = lsmt.load_committed_layer(blob)
    return hash_disk(lsmt.merge_stack([c.mappings]), c.header.virtual_size, blob_reader([blob]))


def test_create_log_and_sparse(tmp_path):
    d, i = tmp_path / "d", tmp_path / "i"
    assert main(["create", "-u", UUID_A, "--uuid", UUID_B, str(d), str(i), "1"]) == 0
    h = lsmt.parse_header_trailer(d.read_bytes())
    ih = lsmt.parse_header_trailer(i.read_bytes())
    assert (h.flags, ih.flags, ih.index_offset, ih.index_size) == (3, 1, 4096, 0)
    assert h.virtual_size == ih.virtual_size == 1 << 30
    assert h.uuid == ih.uuid == UUID_B.upper() and h.parent_uuid == UUID_A.upper()
    assert d.stat().st_size == 4096 and i.stat().st_size == 4096

    sd, si = tmp_path / "sd", tmp_path / "si"
    assert main(["create", "-s", str(sd), str(si), "1"]) == 0
    with open(sd, "rb") as f:
        h = lsmt.parse_header_trailer(f.read(4096))
    assert h.flags == 0x13 and sd.stat().st_size == (1 << 30) + 4096 and si.stat().st_size == 0
    assert lsmt.is_valid_uuid(h.uuid) and h.uuid == h.uuid.upper()


def test_create_errors(tmp_path, capsys):
    d, i = tmp_path / "d", tmp_path / "i"
    assert main(["create", str(d), str(i), "1"]) == 0
    assert main(["create", str(d), str(tmp_path / "i2"), "1"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "i2").exists()
    assert main(["create", "-u", "nope", str(tmp_path / "x"), str(tmp_path / "y"), "1"]) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name, extra, expected", [
    ("p1", ["--uuid", UUID_A, "-m", "pattern p1"], "P1.lsmt"),
    ("p2", ["-p", UUID_A, "--uuid", UUID_B, "-m", "pattern p2"], "P2.lsmt"),
])
def test_commit_matches_upstream(tmp_path, name, extra, expected):
    out = tmp_path / "out.lsmt"
    args = ["commit", *extra, str(PATTERN / f"rw/{name}.data"), str(PATTERN / f"rw/{name}.index"), str(out)]
    assert main(args) == 0
    assert out.read_bytes() == (PATTERN / "layers" / expected).read_bytes()
    assert main(args) == 1  # refuses to overwrite


def test_commit_errors(tmp_path, capsys):
    rw = PATTERN / "rw"
    assert main(["commit", str(rw / "p1.data"), str(rw / "p1.index")]) == 1
    assert "OUT is required" in capsys.readouterr().err
    assert main(["commit", "-z", "--bs", "3", str(rw / "p1.data"), str(rw / "p1.index"),
                 str(tmp_path / "o")]) == 1
    assert main(["commit", str(rw / "p1.index"), str(rw / "p1.index"), str(tmp_path / "o")]) == 1
    assert "p1.index" in capsys.readouterr().err
    assert main(["commit", str(tmp_path / "missing"), str(rw / "p1.index"), str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists()


def test_create_write_commit_seal_roundtrip(tmp_path):
    d, i = tmp_path / "d", tmp_path / "i"
    assert main(["create", str(d), str(i), "0"]) == 0
    layer = WritableLayer.open(d, i)
    layer.set_virtual_size(VSIZE)
    raw = raw_p1()
    for off in range(0, VSIZE, 1 << 20):
        layer.pwrite(off, raw[off: off + (1 << 20)])
    layer.close()
    out = tmp_path / "c.lsmt"
    assert main(["commit", "-m", "hi", str(d), str(i), str(out)]) == 0
    assert disk_sha(out.read_bytes()) == P1_SHA
    assert lsmt.load_committed_layer(out.read_bytes()).header.user_tag == b"hi"
    assert main(["commit", "--seal", str(d), str(i)]) == 0
    assert disk_sha(d.read_bytes()) == P1_SHA


def test_build_from_raw(tmp_path):
    raw = tmp_path / "raw.img"
    raw.write_bytes(raw_p1())
    out = tmp_path / "b.lsmt"
    assert main(["build", "--uuid", UUID_A, "-p", UUID_B, "-m", "built", str(raw), str(out)]) == 0
    blob = out.read_bytes()
    c = lsmt.load_committed_layer(blob)
    assert c.header.virtual_size == VSIZE and c.header.uuid == UUID_A.upper()
    assert c.header.parent_uuid == UUID_B.upper() and c.header.user_tag == b"built"
    assert disk_sha(blob) == P1_SHA
    # only non-zero 4 KiB blocks carry data
    data_sectors = sum(m.length for m in c.mappings if not m.zeroed)
    assert data_sectors % 8 == 0 and data_sectors * 512 < VSIZE // 4
    assert main(["build", str(raw), str(out)]) == 1


def test_build_odd_sizes(tmp_path):
    for size in (0, 1, 511, 4097, (4 << 20) + 513):
        raw = tmp_path / f"r{size}"
        body = bytearray(size)
        if size:
            body[-1] = 0x5A
        raw.write_bytes(body)
        out = tmp_path / f"o{size}"
        assert main(["build", str(raw), str(out)]) == 0
        blob = out.read_bytes()
        c = lsmt.load_committed_layer(blob)
        vsize = -(-size // 512) * 512
        assert c.header.virtual_size == vsize
        padded = bytes(body) + bytes(vsize - size)
        assert disk_sha(blob) == hashlib.sha256(padded).hexdigest()


def test_stack_of_committed_outputs(tmp_path):
    """Commit p1 and p2 with the CLI and read the stack back: the p12 raw image."""
    for name, extra in (("p1", ["--uuid", UUID_A]), ("p2", ["-p", UUID_A, "--uuid", UUID_B])):
        d, i = tmp_path / f"{name}.data", tmp_path / f"{name}.index"
        shutil.copyfile(PATTERN / f"rw/{name}.data", d)
        shutil.copyfile(PATTERN / f"rw/{name}.index", i)
        os.chmod(d, 0o644)
        assert main(["commit", *extra, str(d), str(i), str(tmp_path / f"{name}.lsmt")]) == 0
    b1, b2 = (tmp_path / "p1.lsmt").read_bytes(), (tmp_path / "p2.lsmt").read_bytes()
    merged = lsmt.merge_stack([lsmt.load_committed_layer(b).mappings for b in (b1, b2)])
    assert hash_disk(merged, VSIZE, blob_reader([b1, b2])) == P12_SHA


@pytest.mark.parametrize("name, extra, expected", [
    ("p1", ["--uuid", UUID_A, "-m", "pattern p1"], "P1.lz4.zfile"),
    ("p1", ["--algorithm", "zstd", "--uuid", UUID_A, "-m", "pattern p1"], "P1.zstd.zfile"),
    ("p2", ["-p", UUID_A, "--uuid", UUID_B, "-m", "pattern p2"], "P2.lz4.zfile"),
    ("p2", ["--algorithm", "zstd", "-p", UUID_A, "--uuid", UUID_B, "-m", "pattern p2"], "P2.zstd.zfile"),
])
def test_commit_zfile_matches_upstream(tmp_path, name, extra, expected):
    out = tmp_path / expected
    rw = PATTERN / "rw"
    assert main(["commit", "-z", *extra, str(rw / f"{name}.data"), str(rw / f"{name}.index"), str(out)]) == 0
    assert out.read_bytes() == (PATTERN / "layers" / expected).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [expected]  # temporary file cleaned up


def test_commit_tar_outputs(tmp_path):
    from tcmu_obd.tools.zfile import decompress_file

    rw = PATTERN / "rw"
    p1 = (PATTERN / "layers/P1.lsmt").read_bytes()
    base = ["--uuid", UUID_A, "-m", "pattern p1", str(rw / "p1.data"), str(rw / "p1.index")]
    assert main(["commit", "-z", "-t", *base[:4], *base[4:], str(tmp_path / "z.tar")]) == 0
    decompress_file(tmp_path / "z.tar", tmp_path / "z.out")
    assert (tmp_path / "z.out").read_bytes() == p1
    assert main(["commit", "-t", *base, str(tmp_path / "plain.tar")]) == 0
    with tarfile.open(tmp_path / "plain.tar") as tf:
        (member,) = tf.getmembers()
        assert member.name == "overlaybd.commit" and member.size == len(p1)
        assert tf.extractfile(member).read() == p1
    assert (tmp_path / "plain.tar").read_bytes()[1536:1536 + len(p1)] == p1


def test_build_compressed(tmp_path):
    from tcmu_obd.tools.zfile import decompress_file

    raw = tmp_path / "raw.img"
    raw.write_bytes(raw_p1())
    assert main(["build", "-z", "--algorithm", "zstd", "--bs", "16", str(raw), str(tmp_path / "b.zfile")]) == 0
    decompress_file(tmp_path / "b.zfile", tmp_path / "b.lsmt")
    assert disk_sha((tmp_path / "b.lsmt").read_bytes()) == P1_SHA
    assert main(["build", "-z", "--bs", "64", "-t", str(raw), str(tmp_path / "b.tar")]) == 0
    decompress_file(tmp_path / "b.tar", tmp_path / "b2.lsmt")
    assert (tmp_path / "b2.lsmt").read_bytes() == (tmp_path / "b.lsmt").read_bytes()


def test_build_sparse_raw_skips_holes(tmp_path):
    raw = tmp_path / "sparse.raw"
    size = 64 << 20
    with open(raw, "wb") as f:
        f.truncate(size)
        for at, blob in ((0, b"boot"), (5 << 20, os.urandom(10000)), ((40 << 20) - 3, b"across"),
                         (size - 1, b"!")):
            f.seek(at)
            f.write(blob)
    out = tmp_path / "s.lsmt"
    assert main(["build", str(raw), str(out)]) == 0
    blob = out.read_bytes()
    assert disk_sha(blob) == hashlib.sha256(raw.read_bytes()).hexdigest()
    c = lsmt.load_committed_layer(blob)
    assert sum(m.length for m in c.mappings) * 512 <= 4 * 4096 + 16384
