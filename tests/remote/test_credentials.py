"""Pure tests: credential file format, upstream key matching, challenges, header parsing."""

import base64
import json
import time

import pytest

from tcmu_obd.remote.auth import parse_challenge, repository_of
from tcmu_obd.remote.credentials import (
    Credential,
    candidate_keys,
    match_auths,
    match_docker_config,
    normalize_docker_key,
    parse_auths,
)
from tcmu_obd.remote.endpoints import rebase as _rebase
from tcmu_obd.remote.registry import _parse_retry_after, _presigned_expiry

DG = "sha256:" + "ab" * 32
URL = f"https://reg.example.com:5000/v2/team/sub/app/blobs/{DG}"


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_candidate_keys():
    assert candidate_keys(URL) == [
        "reg.example.com:5000",
        "reg.example.com:5000/team",
        "reg.example.com:5000/team/sub",
        "reg.example.com:5000/team/sub/app",
    ]
    assert candidate_keys(f"http://h/v2/x/blobs/{DG}") == ["h", "h/x"]


def test_entry_forms_and_bad_entries():
    obj = {"auths": {
        "a": {"auth": b64("u1:p:with:colons")},
        "b": {"username": "u2", "password": "p2"},
        "c": {"auth": "!!!notbase64"},
        "d": {"auth": b64("nocolon")},
        "e": "string",
        "f": {},
    }}
    got = parse_auths(obj)
    assert got == [("a", Credential("u1", "p:with:colons")), ("b", Credential("u2", "p2"))]
    assert parse_auths({"nope": 1}) == [] and parse_auths([]) == []
    assert "p2" not in repr(got[1][1])


def test_first_exact_match_in_json_order_wins():
    # JSON order, not longest match: "host" listed first beats the more specific key
    obj = json.loads('{"auths": {"reg.example.com:5000": {"auth": "%s"}, '
                     '"reg.example.com:5000/team/sub": {"auth": "%s"}}}' % (b64("short:1"), b64("long:2")))
    assert match_auths(parse_auths(obj), URL) == Credential("short", "1")
    obj = json.loads('{"auths": {"reg.example.com:5000/team/sub": {"auth": "%s"}, '
                     '"reg.example.com:5000": {"auth": "%s"}}}' % (b64("long:2"), b64("short:1")))
    assert match_auths(parse_auths(obj), URL) == Credential("long", "2")


def test_no_partial_or_prefix_matches():
    entries = [("reg.example.com", Credential("noport", "x")),  # port missing
               ("reg.example.com:5000/tea", Credential("prefix", "x")),  # not a whole segment
               ("reg.example.com:5000/team/sub/app/blobs", Credential("blobs", "x")),
               ("https://reg.example.com:5000/v1/", Credential("docker", "x"))]
    assert match_auths(entries, URL) is None


def test_docker_config_fallback_normalises_keys():
    entries = [("https://reg.example.com:5000/v1/", Credential("docker", "x"))]
    assert match_docker_config(entries, URL) == Credential("docker", "x")
    assert normalize_docker_key("https://index.docker.io/v1/") == ["index.docker.io", "registry-1.docker.io"]
    assert match_docker_config([("other:5000", Credential("o", "x"))], URL) is None


def test_parse_challenge():
    s, p = parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                           'scope="repository:library/redis:pull"')
    assert s == "bearer" and p == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                                   "scope": "repository:library/redis:pull"}
    s, p = parse_challenge('Bearer realm=http://x/token, service=svc, scope="repository:a:pull,push"')
    assert p["realm"] == "http://x/token" and p["service"] == "svc" and p["scope"] == "repository:a:pull,push"
    assert parse_challenge('Basic realm="Registry \\"x\\""') == ("basic", {"realm": 'Registry "x"'})
    assert parse_challenge("Basic") == ("basic", {})


def test_repository_of():
    assert repository_of(URL) == "team/sub/app"
    assert repository_of("http://h/v2/a/manifests/latest") == "a"
    assert repository_of("http://h/other") is None


def test_retry_after_and_presigned_expiry():
    assert _parse_retry_after("3") == 3.0
    assert _parse_retry_after(None) is None and _parse_retry_after("soon") is None
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 100))
    assert 90 < _parse_retry_after(when) <= 100
    amz = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    e = _presigned_expiry(f"https://s3/x?X-Amz-Date={amz}&X-Amz-Expires=600&X-Amz-Signature=z")
    assert 590 < e <= 600
    assert 190 < _presigned_expiry(f"https://s/x?Expires={int(time.time()) + 200}") <= 200
    assert _presigned_expiry("https://s/x?a=b") is None


def test_rebase_for_mirrors():
    assert _rebase(URL, "http://127.0.0.1:9000") == f"http://127.0.0.1:9000/v2/team/sub/app/blobs/{DG}"
    assert _rebase(URL, "https://m.example/prefix/") == f"https://m.example/prefix/v2/team/sub/app/blobs/{DG}"


@pytest.mark.parametrize("mode", ["", "bogus"])
async def test_unknown_mode_means_no_credentials(mode, tmp_path):
    from tcmu_obd.config import CredentialConfig
    from tcmu_obd.remote.credentials import CredentialProvider

    p = CredentialProvider(CredentialConfig(mode=mode, path=str(tmp_path / "x")), docker_config=False)
    assert await p.get(URL) is None


async def test_file_mode_rereads_changed_file(tmp_path):
    from tcmu_obd.config import CredentialConfig
    from tcmu_obd.remote.credentials import CredentialProvider

    f = tmp_path / "cred.json"
    f.write_text(json.dumps({"auths": {"reg.example.com:5000": {"username": "a", "password": "1"}}}))
    p = CredentialProvider(CredentialConfig(mode="file", path=str(f)), docker_config=False)
    assert await p.get(URL) == Credential("a", "1")
    f.write_text(json.dumps({"auths": {"reg.example.com:5000": {"username": "bb", "password": "22"}}}))
    assert await p.get(URL) == Credential("a", "1")  # cached
    assert await p.get(URL, refresh=True) == Credential("bb", "22")


async def test_docker_config_used_when_file_has_nothing(tmp_path):
    from tcmu_obd.config import CredentialConfig
    from tcmu_obd.remote.credentials import CredentialProvider

    dc = tmp_path / "config.json"
    dc.write_text(json.dumps({"auths": {"https://reg.example.com:5000/v1/": {"auth": b64("d:x")}}}))
    p = CredentialProvider(CredentialConfig(mode="file", path=str(tmp_path / "missing.json")), docker_config=str(dc))
    assert await p.get(URL) == Credential("d", "x")
