"""`tcmu-obd zfile` and the functions behind it (compress_file, decompress_file, verify_file,
tar_wrap_file), run in tmp dirs."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile

import pytest

from tcmu_obd.cli import main
from tcmu_obd.errors import ChecksumError, FormatError, ImageIOError
from tcmu_obd.format import tar as tarfmt
from tcmu_obd.format import zfile as zf
from tcmu_obd.tools import zfile as tool
from tests.support.paths import FIXTURES_OBD, FIXTURES_UPSTREAM

ZDIR = FIXTURES_OBD / "zfile"
LAYERS = FIXTURES_OBD / "ext4-chain/layers"
EXPECTED = json.loads((FIXTURES_OBD / "expected.json").read_text())
LZ4_IDENTICAL = zf.lz4_compress_default is not zf._python_lz4_compress


def sha_file(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("args,plain,expected", [
    ([], "plain.bin", "plain.lz4.zfile"),
    (["--algorithm", "lz4"], "tiny.bin", "tiny.lz4.zfile"),
    (["--algorithm", "zstd"], "plain.bin", "plain.zstd.zfile"),
    (["--algorithm", "zstd", "--bs", "16"], "plain.bin", "plain.zstd-bs16.zfile"),
    (["--algorithm", "lz4", "--bs", "32"], "plain.bin", "plain.lz4-bs32.zfile"),
    (["--algorithm", "zstd"], "empty.bin", "empty.zstd.zfile"),
    (["-t"], "plain.bin", "plain.lz4.tar"),
    (["--no-crc"], "plain.bin", "plain.lz4-nocrc.zfile"),
])
def test_cli_compress_byte_identical_to_overlaybd_zfile(tmp_path, args, plain, expected):
    assert LZ4_IDENTICAL  # this host has liblz4: identity is checked for lz4 too
    out = tmp_path / "out"
    assert main(["zfile", *args, str(ZDIR / "plain" / plain), str(out)]) == 0
    assert sha_file(out) == sha_file(ZDIR / "compressed" / expected)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp files left behind


@pytest.mark.parametrize("name", sorted(EXPECTED["zfile"]))
def test_cli_extract_fixtures(tmp_path, name):
    out = tmp_path / "plain"
    assert main(["zfile", "-x", str(ZDIR / name), str(out)]) == 0
    assert sha_file(out) == EXPECTED["zfile"][name]["plain_sha256"]


def test_cli_extract_tar_explicit_and_chain(tmp_path):
    out = tmp_path / "l2.lsmt"
    assert main(["zfile", "-x", "-t", str(LAYERS / "L2.lz4.tar"), str(out)]) == 0
    assert out.read_bytes() == (LAYERS / "L2.lsmt").read_bytes()
    # -t demands a tar wrapper
    assert main(["zfile", "-x", "-t", str(LAYERS / "L2.lz4.zfile"), str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()


def test_compress_file_like_commit_z(tmp_path):
    """commit -z/-t calls compress_file with its defaults: header overwritten like upstream's commit."""
    out = tmp_path / "L2.lz4.zfile"
    tool.compress_file(LAYERS / "L2.lsmt", out, algorithm="lz4")
    assert out.read_bytes() == (LAYERS / "L2.lz4.zfile").read_bytes()
    tool.compress_file(LAYERS / "L2.lsmt", out, algorithm="lz4", tar=True)
    assert out.read_bytes() == (LAYERS / "L2.lz4.tar").read_bytes()
    tool.compress_file(LAYERS / "L1.lsmt", out, algorithm="zstd")
    assert out.read_bytes() == (LAYERS / "L1.zstd.zfile").read_bytes()
    tool.compress_file(LAYERS / "L1.lsmt", out)
    assert out.read_bytes() == (LAYERS / "L1.lz4.zfile").read_bytes()


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("bs_kb", [4, 8, 16, 32, 64])
@pytest.mark.parametrize("verify", [True, False])
def test_roundtrip_files(tmp_path, algorithm, bs_kb, verify):
    bs = bs_kb * 1024
    src = tmp_path / "src"
    dec = tmp_path / "dec"
    z = tmp_path / "z"
    rnd = hashlib.sha512(b"%d" % bs).digest()
    for size in (0, 1, bs - 1, bs, bs + 1, (1 << 20) + bs + 3):
        data = (rnd * (size // 64 + 1))[: size // 2] + bytes(size - size // 2)
        src.write_bytes(data)
        tool.compress_file(src, z, algorithm=algorithm, block_size=bs, verify=verify)
        tool.decompress_file(z, dec)
        assert dec.read_bytes() == data, size
        assert tool.verify_file(z)


def test_bs64_random_blocks_bigger_than_64k(tmp_path):
    # upstream's reader fails on these; we read them
    z = tmp_path / "rand64.lz4-bs64.zfile"
    assert main(["zfile", "--bs", "64", str(ZDIR / "plain/rand64.bin"), str(z)]) == 0
    t = zf.parse_header_trailer(z.read_bytes()[-512:])
    first = int.from_bytes(z.read_bytes()[t.index_offset:t.index_offset + 4], "little")
    assert first == 65798
    out = tmp_path / "out"
    assert main(["zfile", "-x", str(z), str(out)]) == 0
    assert out.read_bytes() == (ZDIR / "plain/rand64.bin").read_bytes()
    assert main(["zfile", "--verify", str(z)]) == 0


def test_tar_wrap_file(tmp_path):
    out = tmp_path / "w.tar"
    n = tool.tar_wrap_file(LAYERS / "L2.lz4.zfile", out)
    assert n == out.stat().st_size
    assert out.read_bytes() == (LAYERS / "L2.lz4.tar").read_bytes()
    with tarfile.open(out) as tf:
        assert tf.getnames() == ["overlaybd.commit"]
    p = tarfmt.detect(out.read_bytes()[:1536])
    assert p.size == (LAYERS / "L2.lz4.zfile").stat().st_size


def test_verify_reports(tmp_path, capsys):
    assert main(["zfile", "--verify", str(ZDIR / "compressed/plain.zstd.zfile")]) == 0
    assert "valid" in capsys.readouterr().out
    hello = FIXTURES_UPSTREAM / "hello-world-oci/hello-world/blobs/sha256/" \
        "022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
    r = tool.verify_file(hello)
    assert r.ok and r.blocks == 17463 and r.tar_payload == (1536, 639491)

    blob = bytearray((ZDIR / "compressed/plain.lz4.zfile").read_bytes())
    h, t = zf.parse_header_trailer(blob[:512]), zf.parse_header_trailer(blob[-512:])
    jt = zf.JumpTable.from_index(blob[t.index_offset:t.index_offset + 4 * t.index_size], h, t)
    for i in (3, 200):
        off, _ = jt.block_range(i)
        blob[off + 1] ^= 0xFF
    bad = tmp_path / "bad.zfile"
    bad.write_bytes(bytes(blob))
    r = tool.verify_file(bad)
    assert not r.ok and [b.index for b in r.bad_blocks] == [3, 200]
    assert r.bad_blocks[0].offset == jt.block_range(3)[0] and "CRC" in r.bad_blocks[0].error
    assert main(["zfile", "--verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "bad block 3" in out and "bad block 200" in out

    # decompress refuses, naming file, block and offset, and leaves no output
    with pytest.raises(ChecksumError) as ei:
        tool.decompress_file(bad, tmp_path / "out")
    assert ei.value.source == str(bad) and "block 3" in str(ei.value)
    assert ei.value.offset == jt.block_range(3)[0]
    assert not (tmp_path / "out").exists()
    assert main(["zfile", "-x", str(bad), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "block 3" in err and str(bad) in err


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b[:100], "too small"),
    (lambda b: bytes(len(b)), "bad magic"),
    (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "digest"),
    (lambda b: b[:-200], "bad magic"),  # trailer cut
])
def test_bad_inputs_clean_errors(tmp_path, capsys, mutate, match):
    src = tmp_path / "in.zfile"
    src.write_bytes(mutate((ZDIR / "compressed/plain.lz4.zfile").read_bytes()))
    r = tool.verify_file(src)
    assert not r.ok and match in r.error and str(src) in r.error
    with pytest.raises(FormatError, match=match):
        tool.decompress_file(src, tmp_path / "o")
    assert main(["zfile", "-x", str(src), str(tmp_path / "o")]) == 1
    assert match in capsys.readouterr().err


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["zfile", str(ZDIR / "plain/tiny.bin")]) == 1  # DST missing
    assert "DST is required" in capsys.readouterr().err
    assert main(["zfile", "--bs", "3", str(ZDIR / "plain/tiny.bin"), str(tmp_path / "o")]) == 1
    assert main(["zfile", str(tmp_path / "missing"), str(tmp_path / "o")]) == 1
    assert "cannot open" in capsys.readouterr().err
    src = tmp_path / "same"
    src.write_bytes(b"abc")
    assert main(["zfile", str(src), str(src)]) == 1
    assert src.read_bytes() == b"abc"
    with pytest.raises(SystemExit):
        main(["zfile", "--algorithm", "lzo", str(src), str(tmp_path / "o")])
    with pytest.raises(ImageIOError):
        tool.compress_file(tmp_path / "missing", tmp_path / "o")


def test_output_mode_and_overwrite(tmp_path):
    out = tmp_path / "o.zfile"
    out.write_bytes(b"old")
    tool.compress_file(ZDIR / "plain/tiny.bin", out)
    assert zf.is_zfile(out.read_bytes())
    assert out.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m
