"""Config safety: digests that become file names or URL paths, credentials in URLs.

What is *not* rejected, on purpose, as upstream (format spec §3): layer `file`/`dir` paths and
the upper's paths are taken as given, absolute or relative (here resolved against the config
file's folder), ".." included: the snapshotter writes them and owns those paths. A dev_id never
becomes a path (§8.1: it only names a device for the live-snapshot API), so it is not checked.
"""

from __future__ import annotations

import json
import os

import pytest

from tcmu_obd.cache.store import CacheStore
from tcmu_obd.config import is_digest, load_global_config, load_image_config
from tcmu_obd.errors import ConfigError

GOOD = "sha256:" + "0123456789abcdef" * 4
BAD_DIGESTS = [
    GOOD + "\n",  # "$" matched before a trailing newline
    GOOD.upper().replace("SHA256", "sha256"),
    GOOD[:-1],
    GOOD + "0",
    "sha256:../../../../etc/passwd",
    "sha256:" + "a" * 63 + "/",
    "sha512:" + "0" * 128,
    "sha256:" + "0" * 64 + "\x00",
    "../" + GOOD,
]


def _write(tmp_path, obj, name="config.v1.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_config_rejects_malformed_digest(tmp_path, digest):
    p = _write(tmp_path, {"repoBlobUrl": "http://127.0.0.1:1/v2/x/blobs", "lowers": [{"digest": digest}]})
    with pytest.raises(ConfigError, match=r"lowers\[0\]"):
        load_image_config(p)
    assert not is_digest(digest)


def test_config_accepts_well_formed_digest(tmp_path):
    p = _write(tmp_path, {"repoBlobUrl": "http://127.0.0.1:1/v2/x/blobs", "lowers": [{"digest": GOOD}]})
    assert load_image_config(p).lowers[0].digest == GOOD


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_cache_store_never_makes_a_file_from_a_bad_digest(tmp_path, digest):
    cache = tmp_path / "cache"
    store = CacheStore(str(cache), 1 << 30)
    with pytest.raises(ConfigError, match="digest"):
        store.open_blob(digest, 4096)
    assert os.listdir(cache) == [] and sorted(os.listdir(tmp_path)) == ["cache"]


def test_layer_paths_may_be_relative_absolute_or_climb(tmp_path):
    """Upstream's rule, kept: the snapshotter decides where layers live."""
    sub = tmp_path / "img" / "cfg"
    sub.mkdir(parents=True)
    p = _write(sub, {"lowers": [{"file": "../layers/a.lsmt"}, {"file": str(tmp_path / "b.lsmt")}],
                     "upper": {"index": "../rw/i", "data": "../rw/d"}})
    cfg = load_image_config(p)
    assert cfg.lowers[0].file == str(tmp_path / "img" / "layers" / "a.lsmt")
    assert cfg.lowers[1].file == str(tmp_path / "b.lsmt")
    assert cfg.upper.data == str(tmp_path / "img" / "rw" / "d")


@pytest.mark.parametrize("key", ["file", "dir", "resultFile"])
def test_nul_in_a_path_is_a_config_error(tmp_path, key):
    obj = {"lowers": [{"file": "a"}]}
    if key == "resultFile":
        obj["resultFile"] = "r\x00x"
    else:
        obj["lowers"][0][key] = "a\x00/../../x"
    with pytest.raises(ConfigError, match="NUL"):
        load_image_config(_write(tmp_path, obj))


def test_userinfo_in_repo_blob_url_is_refused_without_echoing_it(tmp_path):
    p = _write(tmp_path, {"repoBlobUrl": "https://bob:hunter2@reg.example/v2/x/blobs", "lowers": [{"digest": GOOD}]})
    with pytest.raises(ConfigError, match="repoBlobUrl.*credential file") as ei:
        load_image_config(p)
    assert "hunter2" not in str(ei.value)


@pytest.mark.parametrize("obj,where", [
    ({"mirrors": [{"url": "http://bob:hunter2@127.0.0.1:5000"}]}, r"mirrors\[0\]\.url"),
    ({"p2pConfig": {"enable": True, "address": "http://bob:hunter2@localhost:9731/accelerator"}}, "p2pConfig"),
])
def test_userinfo_in_global_urls_is_refused(tmp_path, obj, where):
    with pytest.raises(ConfigError, match=where) as ei:
        load_global_config(_write(tmp_path, obj, "overlaybd.json"))
    assert "hunter2" not in str(ei.value)
