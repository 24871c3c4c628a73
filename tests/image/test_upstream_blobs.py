"""Blobs published by the upstream projects: the hello-world overlaybd image and the 2021 base layer."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile

import pytest

from tcmu_obd.cli import main
from tcmu_obd.image.stack import open_image
from tests.support.images import image_sha256
from tests.support.paths import FIXTURES_UPSTREAM

HELLO = FIXTURES_UPSTREAM / "hello-world-oci" / "hello-world"
GIB64 = 64 << 30


def hello_layer_path():
    index = json.loads((HELLO / "index.json").read_text())
    (entry,) = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "amd64-converted"]
    manifest = json.loads((HELLO / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())
    (layer,) = manifest["layers"]
    assert layer["annotations"]["containerd.io/snapshot/overlaybd/version"] == "0.1.0"
    return HELLO / "blobs" / "sha256" / layer["digest"].split(":")[1]


def write_config(tmp_path, blob) -> str:
    cfg = tmp_path / "config.v1.json"
    cfg.write_text(json.dumps({"lowers": [{"file": str(blob)}], "resultFile": str(tmp_path / "result")}))
    return str(cfg)


@pytest.fixture(scope="module")
def ext4_64(tmp_path_factory):
    out = tmp_path_factory.mktemp("ext4_64")
    with tarfile.open(FIXTURES_UPSTREAM / "ext4_64.tar.gz") as tf:
        tf.extract("ext4_64", out, filter="data")
    blob = out / "ext4_64"
    assert hashlib.sha256(blob.read_bytes()).hexdigest().startswith("c3a417552a6cf9ff")
    return blob


async def test_hello_world_layer_whole_disk_sha256(tmp_path):
    image = await open_image(write_config(tmp_path, hello_layer_path()))
    try:
        assert image.size == GIB64
        assert await image_sha256(image) == "d9bf7a5f976ade5b2605f04fee24de1d343036e87a74d6b07816eb88bf56fe31"
    finally:
        await image.aclose()
    assert (tmp_path / "result").read_text() == "success"


def test_hello_world_exports_a_mountable_ext4_with_hello(tmp_path):
    raw = tmp_path / "hello.raw"
    assert main(["export", "--no-progress", write_config(tmp_path, hello_layer_path()), str(raw)]) == 0
    assert raw.stat().st_size == GIB64
    out = tmp_path / "hello"
    subprocess.run(["debugfs", "-R", f"dump /hello {out}", str(raw)], check=True, capture_output=True)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == "d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014"
    stat = subprocess.run(["debugfs", "-R", "stat /hello", str(raw)], check=True, capture_output=True, text=True).stdout
    assert "Mode:  0775" in stat and "Size: 13256" in stat


async def test_2021_base_layer_whole_disk_sha256(tmp_path, ext4_64):
    image = await open_image(write_config(tmp_path, ext4_64))
    try:
        assert image.size == GIB64
        assert await image_sha256(image) == "e5f5b67aca37084f505d8af3570668fcf098b96ccb409e87caea98d4056a927d"
    finally:
        await image.aclose()


def test_inspect_describes_every_wrapping(tmp_path, ext4_64, capsys):
    assert main(["inspect", "--json", str(hello_layer_path())]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["wrapping"] == ["tar", "zfile", "lsmt"]
    assert info["tar"]["payload_size"] == 639491
    assert info["zfile"]["algorithm"] == "lz4" and info["zfile"]["block_size"] == 4096
    assert info["zfile"]["blocks"] == 17463 and info["zfile"]["crc"]
    assert info["lsmt"]["uuid"] == "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31"
    assert info["lsmt"]["valid_entries"] == 515 and info["lsmt"]["index_entries"] == 768
    assert main(["inspect", "--json", str(ext4_64)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["wrapping"] == ["zfile", "lsmt"]
    assert info["zfile"]["blocks"] == 132309 and not info["zfile"]["digest"]
    assert info["lsmt"]["valid_entries"] == 8323 and info["lsmt"]["zeroed_entries"] == 8209
    assert info["lsmt"]["max_entry_sectors"] == 16383
