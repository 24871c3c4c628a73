"""config.v1.json and overlaybd.json: upstream's keys, defaults, resolution order, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest

from tcmu_obd.config import GlobalConfig, load_global_config, load_image_config
from tcmu_obd.errors import ConfigError, FormatError, ObdError
from tcmu_obd.image.stack import open_image
from tests.support.images import image_sha256
from tests.support.paths import FIXTURES_OBD

EXPECTED = json.loads((FIXTURES_OBD / "expected.json").read_text())
P1 = FIXTURES_OBD / "pattern" / "layers" / "P1.lsmt"
P2 = FIXTURES_OBD / "pattern" / "layers" / "P2.lz4.zfile"
P1_SHA = EXPECTED["pattern"]["images"]["p1"]["raw_sha256"]
P12_SHA = EXPECTED["pattern"]["images"]["p12"]["raw_sha256"]


def write(path, obj) -> str:
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


def test_global_defaults_are_upstreams():
    g = GlobalConfig()
    assert g.effective_cache.cache_dir == "/opt/overlaybd/registry_cache"
    assert g.effective_cache.cache_size_gb == 4 and g.effective_cache.refill_size == 262144
    assert g.effective_cache.cache_type == "file"
    d = g.download
    assert (d.enable, d.delay, d.delay_extra, d.max_mbps, d.try_cnt, d.block_size) == (False, 300, 30, 100, 5, 262144)
    assert g.prefetch_config.concurrency == 16
    assert g.p2p_config.address == "http://localhost:9731/accelerator"
    assert g.exporter_config.port == 9863 and g.exporter_config.uri_prefix == "/metrics"
    assert g.effective_credentials.mode == "file" and g.effective_credentials.path == "/opt/overlaybd/cred.json"
    assert g.gzip_cache_config.refill_size == 1048576
    assert g.registry_fs_version == "v2" and g.enable_audit


def test_global_keys_are_read_with_upstream_spelling(tmp_path):
    g = load_global_config(write(tmp_path / "g.json", {
        "cacheConfig": {"cacheType": "file", "cacheDir": "/c", "cacheSizeGB": 9, "refillSize": 1048576},
        "download": {"enable": True, "delay": 0, "delayExtra": 0, "maxMBps": 0, "tryCnt": 2, "blockSize": 8192},
        "credentialConfig": {"mode": "uds", "path": "/run/cred.sock", "timeout": 3},
        "prefetchConfig": {"concurrency": 4},
        "certConfig": {"certFile": "/c.pem", "keyFile": "/k.pem"},
        "p2pConfig": {"enable": True, "address": "http://p2p:1"},
        "exporterConfig": {"enable": True, "port": 1234},
        "mirrors": [{"url": "http://127.0.0.1:5001"}],
        "someFutureKey": {"ignored": True},
    }))
    assert g.effective_cache.cache_dir == "/c" and g.effective_cache.cache_size_gb == 9
    assert g.effective_cache.refill_size == 1 << 20
    assert g.download.max_mbps == 0 and g.download.delay == 0 and g.download.try_cnt == 2
    assert g.effective_credentials.mode == "uds" and g.effective_credentials.timeout == 3
    assert g.prefetch_config.concurrency == 4 and g.cert_config.key_file == "/k.pem"
    assert g.p2p_config.enable and g.exporter_config.port == 1234
    assert g.mirrors[0].url == "http://127.0.0.1:5001"


def test_legacy_top_level_cache_keys(tmp_path):
    g = load_global_config(write(tmp_path / "g.json", {"registryCacheDir": "/old", "registryCacheSizeGB": 2}))
    assert g.effective_cache.cache_dir == "/old" and g.effective_cache.cache_size_gb == 2


@pytest.mark.parametrize("obj,needle", [
    ({"cacheConfig": {"cacheType": "nfs"}}, "cacheType"),
    ({"cacheConfig": {"refillSize": 1000}}, "refillSize"),
    ({"cacheConfig": {"cacheSizeGB": "4"}}, "cacheSizeGB"),
    ({"ioEngine": 3}, "ioEngine"),
    ({"download": {"enable": "yes"}}, "download.enable"),
    ({"download": []}, "download"),
    ({"enableThread": True}, "enableThread"),
    ({"mirrors": [{"url": "ftp://x"}]}, "mirrors[0]"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "object"),
])
def test_bad_global_config_names_the_key(tmp_path, obj, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_global_config(write(tmp_path / "g.json", obj))
    assert needle in str(err.value) and str(tmp_path / "g.json") in str(err.value)


def test_missing_global_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read global config"):
        load_global_config(tmp_path / "nope.json")


def test_image_config_relative_paths_and_download_inheritance(tmp_path):
    g = load_global_config(write(tmp_path / "g.json", {"download": {"enable": True, "delay": 7}}))
    (tmp_path / "sub").mkdir()
    cfg = load_image_config(write(tmp_path / "sub" / "c.json", {
        "repoBlobUrl": "https://r/v2/x/blobs",
        "lowers": [{"file": "../a.lsmt"}, {"dir": "layer", "digest": "sha256:" + "a" * 64, "size": 5}],
        "upper": {"index": "i", "data": "d"},
        "resultFile": "result",
    }), g)
    assert cfg.lowers[0].file == str(tmp_path / "a.lsmt")
    assert cfg.lowers[1].dir == str(tmp_path / "sub" / "layer")
    assert cfg.upper.enabled and cfg.upper.index == str(tmp_path / "sub" / "i")
    assert cfg.result_file == str(tmp_path / "sub" / "result")
    assert cfg.download.delay == 7  # taken whole from the global config
    assert cfg.blob_url("sha256:" + "a" * 64) == "https://r/v2/x/blobs/sha256:" + "a" * 64
    own = load_image_config(write(tmp_path / "c2.json", {"lowers": [{"file": "x"}], "download": {"enable": False}}), g)
    assert own.download.enable is False and own.download.delay == 300  # no per-key merge


@pytest.mark.parametrize("obj,needle", [
    ({"lowers": [{"digest": "sha256:xyz"}]}, "lowers[0].digest"),
    ({"lowers": [{"digest": "md5:" + "a" * 32}]}, "lowers[0].digest"),
    ({"lowers": [{}]}, "lowers[0] has none"),
    ({"lowers": {"file": "x"}}, "lowers must be an array"),
    ({"lowers": [{"file": 3}]}, "lowers[0].file"),
    ({"lowers": [{"file": "x"}] * 256}, "255"),
    ({"lowers": [{"file": "x"}], "accelerationLayer": True, "recordTracePath": "t"}, "accelerationLayer"),
])
def test_bad_image_config_names_the_key(tmp_path, obj, needle):
    with pytest.raises(ConfigError) as err:
        load_image_config(write(tmp_path / "c.json", obj))
    assert needle in str(err.value)


async def test_result_file_success_and_failure(tmp_path):
    ok = write(tmp_path / "ok.json", {"lowers": [{"file": str(P1)}], "resultFile": "ok.result"})
    image = await open_image(ok)
    await image.aclose()
    assert (tmp_path / "ok.result").read_text() == "success"
    bad = write(tmp_path / "bad.json", {"lowers": [{"file": str(P1)}, {"file": "missing.lsmt"}],
                                         "resultFile": "bad.result"})
    with pytest.raises(ObdError) as err:
        await open_image(bad)
    text = (tmp_path / "bad.result").read_text()
    assert text.startswith("failed:failed to open layer 1") and not text.endswith("\n")
    assert "missing.lsmt" in text and "missing.lsmt" in str(err.value)


async def test_remote_layer_without_repo_blob_url_fails_like_upstream(tmp_path):
    cfg = write(tmp_path / "c.json", {"lowers": [{"digest": "sha256:" + "b" * 64, "size": 10}], "resultFile": "r"})
    with pytest.raises(ConfigError, match="empty repoBlobUrl"):
        await open_image(cfg)
    assert "empty repoBlobUrl" in (tmp_path / "r").read_text()


async def test_non_overlaybd_blob_is_a_format_error(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, not a layer" * 1000)
    with pytest.raises(FormatError) as err:
        await open_image(write(tmp_path / "c.json", {"lowers": [{"file": str(junk)}]}))
    assert "junk.bin" in str(err.value) and "not an overlaybd layer" in str(err.value)


@pytest.mark.parametrize("present,expect", [
    (["file", "commit", "dotcommit", "sealed"], "file"),
    (["commit", "dotcommit", "sealed"], "commit"),
    (["dotcommit", "sealed"], "dotcommit"),
    (["sealed"], "sealed"),
])
async def test_lower_resolution_order(tmp_path, present, expect):
    """file → dir/overlaybd.commit → dir/.commit → dir/overlaybd.sealed; the first existing wins.

    Each candidate holds a different image (P1 alone vs P1+P2 as one layer is impossible), so the
    winner is told apart by which lower image reads back: the winning candidate is P2-only-on-P1
    stacks' top layer, the losers are P1.
    """
    d = tmp_path / "layer"
    d.mkdir()
    names = {"file": tmp_path / "f.lsmt", "commit": d / "overlaybd.commit", "dotcommit": d / ".commit",
             "sealed": d / "overlaybd.sealed"}
    for key in present:
        shutil.copy(P2 if key == expect else P1, names[key])
    cfg = write(tmp_path / "c.json", {"lowers": [{"file": str(P1)}, {
        "file": str(names["file"]) if "file" in present else "", "dir": str(d),
        "digest": "sha256:" + "c" * 64}]})
    image = await open_image(cfg)
    try:
        assert await image_sha256(image) == P12_SHA  # P2 on top of P1 only when the winner was picked
    finally:
        await image.aclose()


@pytest.mark.parametrize("lower", [{"file": str(P1), "targetFile": "layer.tar"},
                                   {"file": str(P1), "targetDigest": "sha256:" + "d" * 64}])
async def test_turbo_oci_layers_are_refused_by_name(tmp_path, lower):
    with pytest.raises(ConfigError, match="TurboOCI"):
        await open_image(write(tmp_path / "c.json", {"lowers": [lower]}))
