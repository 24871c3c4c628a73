"""config.v1.json and overlaybd.json: any file content ends in ConfigError naming the file,
never a crash. Seeds: the shared fixture configs; damage is structural (any JSON value put
anywhere in the tree) and textual (bytes of the file flipped, cut, spliced)."""

from __future__ import annotations

import functools
import json
import os
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_obd.config import load_global_config, load_image_config
from tcmu_obd.errors import ConfigError
from tests.support.paths import FIXTURES_OBD

from .mutate import fuzz_settings, mutants, only


@functools.lru_cache(maxsize=None)
def _image_seeds() -> tuple[bytes, ...]:
    files = sorted((FIXTURES_OBD / "pattern" / "configs").glob("*.json"))
    extra = {"repoBlobUrl": "https://registry.example/v2/lib/img/blobs",
             "lowers": [{"digest": "sha256:" + "ab" * 32, "size": 4096, "dir": "layer0"}],
             "resultFile": "result", "download": {"enable": True, "delay": 1}, "recordTracePath": ""}
    return tuple(f.read_bytes() for f in files) + (json.dumps(extra).encode(),)


@functools.lru_cache(maxsize=None)
def _global_seeds() -> tuple[bytes, ...]:
    extra = {"cacheConfig": {"cacheType": "file", "refillSize": 262144, "blockSize": 65536},
             "mirrors": [{"url": "http://127.0.0.1:1", "insecure": True}], "prefetchConfig": {"concurrency": 4},
             "credentialConfig": {"mode": "file", "path": "cred.json"}, "exporterConfig": {"port": 1}}
    return ((FIXTURES_OBD / "svc.overlaybd.json").read_bytes(), json.dumps(extra).encode())


# Scalars JSON allows, including the ones Python's json module adds (NaN, Infinity) and
# numbers too large for any field.
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.sampled_from([0, -1, 1 << 63, 2 ** 64]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", "..", "/", "sha256:", "sha256:" + "0" * 64 + "\n", "file", "ocf", "../../etc"]),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) |
                       st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def structural(draw, seeds):
    obj = json.loads(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(_paths(obj))))
        value = draw(_values)
        if not where:
            obj = value
            continue
        parent = obj
        for k in where[:-1]:
            parent = parent[k]
        parent[where[-1]] = value
        if isinstance(parent, dict) and draw(st.booleans()):  # also: a known key next to it
            parent[draw(st.sampled_from(["file", "dir", "digest", "size", "lowers", "cacheType",
                                          "refillSize", "blockSize", "mirrors", "upper"]))] = draw(_values)
    return json.dumps(obj, allow_nan=True).encode()


def _load(loader, text: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.json")
        with open(path, "wb") as f:
            f.write(text)
        _, err = only((ConfigError,), loader, path)
        if err is not None:
            assert path in str(err), f"error does not name the file: {err}"


@fuzz_settings(150)
@given(structural(_image_seeds()))
def test_image_config_structural(text):
    _load(load_image_config, text)


@fuzz_settings(100)
@given(structural(_global_seeds()))
def test_global_config_structural(text):
    _load(load_global_config, text)


@fuzz_settings(100)
@given(mutants(_image_seeds() + _global_seeds()), st.booleans())
def test_config_bytes_damaged(case, image):
    _, text = case
    _load(load_image_config if image else load_global_config, text)


@pytest.mark.parametrize("text", [
    b"[" * 100_000 + b"]" * 100_000,  # json recursion limit
    b'{"lowers": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"lowers": [{"file": "a", "size": Infinity}]}',
    b'{"lowers": [{"file": "a", "size": NaN}]}',
    b'{"cacheConfig": {"refillSize": -Infinity}}',
    b'{"lowers": [{"file": "a", "size": 1e400}]}',
    b'{"lowers": [{"file": "a", "size": ' + b"9" * 5000 + b"}]}",  # past int's digit limit
    b"\xff\xfe{}",
    b'{"lowers": [{"file": "a\\u0000b"}]}',
], ids=["deep", "deep-lowers", "inf", "nan", "-inf", "1e400", "5000-digits", "bad-utf8", "nul-in-path"])
def test_config_edge_values(text):
    """Regressions: deep nesting raised RecursionError and Infinity/NaN raised
    OverflowError/ValueError out of the loaders."""
    _load(load_image_config, text)
    _load(load_global_config, text)
