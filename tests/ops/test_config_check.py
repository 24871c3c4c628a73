"""`tcmu-obd config check`: real fixture layers, a real docker-registry, and every kind of bad input."""

from __future__ import annotations

import json

import pytest

from tcmu_obd.cli import main
from tests.support.paths import FIXTURES_OBD
from tests.support.registry import free_port, push_blob

PATTERN = FIXTURES_OBD / "pattern"
LAYERS = PATTERN / "layers"
P12_ZFILE = PATTERN / "configs" / "p12.lz4.zfile.config.v1.json"
P1_RW_P2 = PATTERN / "configs" / "p1+rw-p2.config.v1.json"
VSIZE = 8 << 20  # the pattern images' virtual size (MANIFEST.md)
MISSING_DIGEST = "sha256:" + "0" * 64


def run_check(capsys, *args) -> tuple[int, str, str]:
    code = main(["config", "check", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *args) -> tuple[int, dict]:
    code, out, _ = run_check(capsys, "--json", *args)
    return code, json.loads(out)


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


@pytest.fixture
def global_config(tmp_path) -> str:
    """A global config whose cache dir does not exist yet (check must not create it)."""
    return write_json(tmp_path / "overlaybd.json", {
        "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"), "cacheSizeGB": 1},
        "credentialConfig": {"mode": "file", "path": str(tmp_path / "cred.json")}})


def remote_config(tmp_path, registry, repo, blobs, **extra) -> str:
    lowers = [{"digest": push_blob(registry.url, repo, b), "size": b.stat().st_size} for b in blobs]
    cfg = {"repoBlobUrl": f"{registry.url}/v2/{repo}/blobs", "lowers": lowers,
           "resultFile": str(tmp_path / "result"), **extra}
    return write_json(tmp_path / "config.v1.json", cfg)


# ---------------------------------------------------------------------------------------------
# what would be served


def test_valid_local_image(capsys, global_config):
    code, out, err = run_check(capsys, "--global-config", global_config, P12_ZFILE)
    assert code == 0, err
    assert f"layer 0: local {LAYERS / 'P1.lz4.zfile'}" in out
    assert f"layer 1: local {LAYERS / 'P2.lz4.zfile'}" in out
    assert "zfile -> lsmt" in out
    assert f"would serve: {VSIZE} bytes (8.0 MiB), read-only, 2 lower(s)" in out
    assert out.rstrip().endswith("ok")


def test_valid_local_image_with_upper_as_json(capsys, global_config):
    code, report = run_json(capsys, "--global-config", global_config, P1_RW_P2)
    assert code == 0 and report["ok"] and report["problems"] == []
    assert report["global_config"] == global_config
    assert [layer["wrapping"] for layer in report["layers"]] == [["lsmt"]]
    assert report["upper"]["data"] == str(PATTERN / "rw" / "p2.data")
    assert report["virtual_size"] == VSIZE and report["read_only"] is False


def test_global_config_alone(capsys, global_config, tmp_path):
    code, report = run_json(capsys, "--global-config", global_config)
    assert code == 0
    assert report["cache"]["dir"] == str(tmp_path / "cache") and report["cache"]["state"] == "will be created"
    assert report["credentials"] == {"mode": "file", "path": str(tmp_path / "cred.json"),
                                     "state": "absent: anonymous, or ~/.docker/config.json"}
    # also accepted before the sub-command
    assert main(["config", "--global-config", global_config, "check"]) == 0


def test_remote_image_on_a_real_registry_creates_nothing(capsys, tmp_path, registry, global_config):
    config = remote_config(tmp_path, registry, "check/remote", [LAYERS / "P1.lz4.zfile", LAYERS / "P2.zstd.zfile"])
    code, report = run_json(capsys, "--global-config", global_config, config)
    assert code == 0, report["problems"]
    cfg = json.loads(open(config).read())
    for layer, lower in zip(report["layers"], cfg["lowers"]):
        assert layer["where"] == "remote"
        assert layer["location"] == f"{cfg['repoBlobUrl']}/{lower['digest']}"
        assert layer["blob_size"] == lower["size"]
        assert layer["wrapping"] == ["zfile", "lsmt"] and layer["virtual_size"] == VSIZE
    assert report["virtual_size"] == VSIZE
    assert not (tmp_path / "cache").exists()  # no cache files
    assert not (tmp_path / "result").exists()  # no resultFile


def test_remote_size_only(capsys, tmp_path, registry, global_config):
    config = remote_config(tmp_path, registry, "check/size-only", [LAYERS / "P1.lsmt"])
    code, report = run_json(capsys, "--global-config", global_config, "--size-only", config)
    assert code == 0
    assert report["layers"][0]["blob_size"] == (LAYERS / "P1.lsmt").stat().st_size
    assert report["layers"][0]["wrapping"] == [] and report["virtual_size"] is None


def test_remote_image_with_basic_auth(capsys, tmp_path, registry_htpasswd, monkeypatch):
    reg = registry_htpasswd
    blob = LAYERS / "P2.lz4.zfile"
    digest = push_blob(reg.url, "check/auth", blob, auth=reg.auth)
    config = write_json(tmp_path / "config.v1.json", {
        "repoBlobUrl": f"{reg.url}/v2/check/auth/blobs", "lowers": [{"digest": digest}]})
    cred = write_json(tmp_path / "cred.json", {"auths": {reg.host: {"username": reg.username,
                                                                    "password": reg.password}}})
    with_cred = write_json(tmp_path / "with.json", {"credentialConfig": {"mode": "file", "path": cred}})
    code, report = run_json(capsys, "--global-config", with_cred, config)
    assert code == 0, report["problems"]
    assert report["credentials"]["state"] == "present"
    assert report["layers"][0]["blob_size"] == blob.stat().st_size
    assert report["layers"][0]["wrapping"] == ["zfile", "lsmt"]

    # the same registry without credentials (and no ~/.docker/config.json): the cause says so
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    no_cred = write_json(tmp_path / "without.json", {"credentialConfig": {"mode": "file",
                                                                          "path": str(tmp_path / "none")}})
    code, out, err = run_check(capsys, "--global-config", no_cred, config)
    assert code == 1
    assert f"problem: {config}: lowers[0]: {digest}: registry refused the credentials: " in out
    assert "1 problem(s)" in err


# ---------------------------------------------------------------------------------------------
# problems: each names the file, the key or layer, and the cause


def test_malformed_image_json(capsys, tmp_path, global_config):
    config = write_json(tmp_path / "config.v1.json", '{"lowers": [ {"file": "x"} ')
    code, out, err = run_check(capsys, "--global-config", global_config, config)
    assert code == 1
    assert f"problem: {config}: not valid JSON" in out
    assert "1 problem(s)" in err


def test_malformed_global_json_and_bad_key(capsys, tmp_path):
    bad = write_json(tmp_path / "overlaybd.json", "{not json")
    code, out, _ = run_check(capsys, "--global-config", bad, P12_ZFILE)
    assert code == 1 and f"{bad}: not valid JSON" in out
    wrong = write_json(tmp_path / "typed.json", {"cacheConfig": {"refillSize": "big"}})
    code, out, _ = run_check(capsys, "--global-config", wrong)
    assert code == 1 and f"{wrong}: cacheConfig.refillSize must be an integer" in out


def test_wrong_type_in_image_config_names_the_key(capsys, tmp_path, global_config):
    config = write_json(tmp_path / "config.v1.json", {"lowers": [{"file": str(LAYERS / "P1.lsmt"), "size": "10"}]})
    code, out, _ = run_check(capsys, "--global-config", global_config, config)
    assert code == 1 and f"{config}: lowers[0].size must be an integer" in out


def test_missing_layer_file(capsys, tmp_path, global_config):
    missing = tmp_path / "gone.lsmt"
    config = write_json(tmp_path / "config.v1.json", {"lowers": [{"file": str(LAYERS / "P1.lsmt")},
                                                                 {"file": str(missing)}]})
    code, out, _ = run_check(capsys, "--global-config", global_config, config)
    assert code == 1
    assert "layer 0: local" in out  # the good layer is still reported
    assert f"problem: {config}: lowers[1]: no local file among ['{missing}'] and no digest to fetch" in out
    assert "would serve" not in out


def test_local_file_that_is_not_a_layer(capsys, tmp_path, global_config):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x42" * 8192)
    config = write_json(tmp_path / "config.v1.json", {"lowers": [{"file": str(junk)}]})
    code, out, _ = run_check(capsys, "--global-config", global_config, config)
    assert code == 1 and f"{config}: lowers[0]: not an overlaybd layer: " in out and str(junk) in out


def test_malformed_digest(capsys, tmp_path, global_config):
    config = write_json(tmp_path / "config.v1.json", {"repoBlobUrl": "http://127.0.0.1:1/v2/x/blobs",
                                                      "lowers": [{"digest": "sha256:abc"}]})
    code, out, _ = run_check(capsys, "--global-config", global_config, config)
    assert code == 1
    assert f"{config}: lowers[0].digest 'sha256:abc' is not sha256:<64 hex digits>" in out


def test_digest_not_in_registry(capsys, tmp_path, registry, global_config):
    config = remote_config(tmp_path, registry, "check/missing", [LAYERS / "P1.lsmt"])
    cfg = json.loads(open(config).read())
    cfg["lowers"].append({"digest": MISSING_DIGEST})
    write_json(tmp_path / "config.v1.json", cfg)
    code, out, _ = run_check(capsys, "--global-config", global_config, config)
    assert code == 1
    assert f"problem: {config}: lowers[1]: {MISSING_DIGEST}: blob not found in the registry" in out
    assert "lowers[0]" not in out.split("problem:", 1)[1]  # only the bad layer is blamed


def test_size_mismatch(capsys, tmp_path, registry, global_config):
    config = remote_config(tmp_path, registry, "check/size", [LAYERS / "P2.lsmt"])
    cfg = json.loads(open(config).read())
    real = cfg["lowers"][0]["size"]
    cfg["lowers"][0]["size"] = real + 1
    write_json(tmp_path / "config.v1.json", cfg)
    code, out, _ = run_check(capsys, "--global-config", global_config, config)
    assert code == 1
    assert f"lowers[0]: size {real + 1} in the config, but the registry's blob" in out and f"has {real} bytes" in out


def test_unreachable_registry(capsys, tmp_path, global_config):
    port = free_port()  # nothing listens there
    config = write_json(tmp_path / "config.v1.json", {"repoBlobUrl": f"http://127.0.0.1:{port}/v2/x/blobs",
                                                      "lowers": [{"digest": MISSING_DIGEST}]})
    code, out, _ = run_check(capsys, "--global-config", global_config, "--timeout", "5", config)
    assert code == 1
    assert (f"{config}: lowers[0]: {MISSING_DIGEST}: registry unreachable: "
            f"cannot connect to 127.0.0.1:{port} (Connection refused)") in out


def test_turbooci_layer_refused_by_name(capsys, tmp_path, global_config):
    config = write_json(tmp_path / "config.v1.json", {"lowers": [{"file": str(LAYERS / "P1.lsmt"),
                                                                  "targetFile": "fs.meta"}]})
    code, out, _ = run_check(capsys, "--global-config", global_config, config)
    assert code == 1 and f"{config}: lowers[0]: TurboOCI layers (targetFile/targetDigest/gzipIndex)" in out


def test_upper_missing_files(capsys, tmp_path, global_config):
    config = write_json(tmp_path / "config.v1.json", {"lowers": [{"file": str(LAYERS / "P1.lsmt")}],
                                                      "upper": {"index": "rw.index", "data": "rw.data"}})
    code, out, _ = run_check(capsys, "--global-config", global_config, config)
    assert code == 1 and f"{config}: upper.data {tmp_path / 'rw.data'} does not exist" in out


def test_half_an_upper_is_read_only_as_upstream(capsys, tmp_path, global_config):
    config = write_json(tmp_path / "config.v1.json", {"lowers": [{"file": str(LAYERS / "P1.lsmt")}],
                                                      "upper": {"index": "rw.index"}})
    code, out, _ = run_check(capsys, "--global-config", global_config, config)
    assert code == 0
    assert f"note: {config}: upper.data is empty: no writable upper, served read-only (as upstream)" in out
    assert "read-only, 1 lower(s)" in out


def test_nothing_to_serve_and_missing_config(capsys, tmp_path, global_config):
    config = write_json(tmp_path / "config.v1.json", {"lowers": []})
    code, out, _ = run_check(capsys, "--global-config", global_config, config)
    assert code == 1 and f"{config}: no lowers and no upper: nothing to serve" in out
    code, out, _ = run_check(capsys, "--global-config", global_config, tmp_path / "absent.json")
    assert code == 1 and f"cannot read image config {tmp_path / 'absent.json'}" in out


def test_acceleration_layer_is_not_served(capsys, tmp_path, global_config):
    config = write_json(tmp_path / "config.v1.json", {"accelerationLayer": True,
                                                      "lowers": [{"file": str(LAYERS / "P1.lsmt")},
                                                                 {"file": str(LAYERS / "P2.lsmt")}]})
    code, report = run_json(capsys, "--global-config", global_config, config)
    assert code == 0
    assert [layer["role"] for layer in report["layers"]] == ["lower", "trace"]
    assert report["layers"][1]["wrapping"] == []  # the trace layer is not opened as LSMT
    assert report["virtual_size"] == VSIZE
