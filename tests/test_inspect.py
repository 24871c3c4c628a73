"""`tcmu-obd inspect` on every kind of blob, and a clear error on what is not one."""

import json

from tcmu_obd.cli import main
from tests.support.paths import FIXTURES_OBD


def inspect_json(capsys, path):
    assert main(["inspect", "--json", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_plain_compressed_and_tar_layers(capsys):
    layers = FIXTURES_OBD / "ext4-chain" / "layers"
    plain = inspect_json(capsys, layers / "L2.lsmt")
    assert plain["wrapping"] == ["lsmt"] and "zfile" not in plain
    assert plain["lsmt"]["uuid"] == "22222222-2222-4222-8222-222222222222"
    assert plain["lsmt"]["parent_uuid"] == "11111111-1111-4111-8111-111111111111"
    assert plain["lsmt"]["user_tag"] == "obd-fixture layer2"
    assert (plain["lsmt"]["header_flags"], plain["lsmt"]["trailer_flags"]) == (7, 6)
    assert (plain["lsmt"]["valid_entries"] + plain["lsmt"]["padding_entries"]) % 256 == 0
    zstd = inspect_json(capsys, layers / "L2.zstd.zfile")
    assert zstd["wrapping"] == ["zfile", "lsmt"] and zstd["zfile"]["algorithm"] == "zstd"
    assert zstd["zfile"]["original_size"] == (layers / "L2.lsmt").stat().st_size
    assert zstd["lsmt"] == plain["lsmt"]
    tar = inspect_json(capsys, layers / "L2.lz4.tar")
    assert tar["wrapping"] == ["tar", "zfile", "lsmt"] and tar["tar"]["payload_offset"] == 1536


def test_zfile_of_a_plain_file_is_described_not_rejected(capsys):
    info = inspect_json(capsys, FIXTURES_OBD / "zfile" / "compressed" / "plain.zstd-bs16.zfile")
    assert info["wrapping"] == ["zfile"] and info["zfile"]["block_size"] == 16384
    assert info["payload"] == {"size": 1049810, "lsmt": False, "note": info["payload"]["note"]}


def test_not_a_blob_is_a_clear_error(capsys, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 10000)
    assert main(["inspect", str(junk)]) == 1
    err = capsys.readouterr().err
    assert str(junk) in err and "not an overlaybd layer" in err
