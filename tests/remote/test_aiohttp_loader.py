"""aiohttp imported without its two unused default contexts loading the CA file, the
environment left exactly as found, and our own contexts still built from it. Each case runs in
a fresh interpreter: the import happens once per process."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, ssl, sys, threading
if sys.argv[1] == "second-thread":
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
from tcmu_obd.remote.aiohttp_loader import aiohttp
import aiohttp.connector as connector
print(json.dumps({
    "aiohttp_verified_ca": connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
    "aiohttp_unverified_ca": connector._SSL_CONTEXT_UNVERIFIED.cert_store_stats()["x509_ca"],
    "ours_ca": ssl.create_default_context().cert_store_stats()["x509_ca"],
    "SSL_CERT_FILE": os.environ.get("SSL_CERT_FILE"),
}))
"""


def _first_ca_pem() -> str:
    """One CA certificate from the system trust store, as PEM."""
    paths = ssl.get_default_verify_paths()
    bundle = Path(paths.cafile or paths.openssl_cafile).read_text()
    end = "-----END CERTIFICATE-----"
    return bundle[bundle.index("-----BEGIN CERTIFICATE-----"): bundle.index(end) + len(end)] + "\n"


def _probe(mode: str, cert_file: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    if cert_file is not None:
        env["SSL_CERT_FILE"] = cert_file
    # no default CA directory: only the file counts, so the numbers below are exact
    env["SSL_CERT_DIR"] = os.devnull
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def one_ca_file(tmp_path) -> str:
    p = tmp_path / "one-ca.pem"
    p.write_text(_first_ca_pem())
    return str(p)


def test_import_skips_the_ca_file_and_restores_the_variable(one_ca_file):
    got = _probe("alone", one_ca_file)
    assert got["aiohttp_verified_ca"] == 0 and got["aiohttp_unverified_ca"] == 0
    # the user's setting is back, and contexts made afterwards are built from it
    assert got["SSL_CERT_FILE"] == one_ca_file
    assert got["ours_ca"] == 1


def test_unset_variable_stays_unset():
    got = _probe("alone", None)
    assert got["SSL_CERT_FILE"] is None
    assert got["aiohttp_verified_ca"] == 0
    assert got["ours_ca"] > 0  # OpenSSL's own default file again


def test_with_another_thread_alive_the_environment_is_not_touched(one_ca_file):
    got = _probe("second-thread", one_ca_file)
    assert got["aiohttp_verified_ca"] == 1  # plain import: aiohttp loaded the file itself
    assert got["SSL_CERT_FILE"] == one_ca_file
    assert got["ours_ca"] == 1
