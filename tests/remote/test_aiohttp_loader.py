"""aiohttp imported without its two unused default contexts loading the CA file, the
environment left exactly as found, and our own contexts still built from it — down to a real
HTTPS read from docker-registry. Each case runs in a fresh interpreter: the import happens once
per process."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.registry import push_blob, registry_factory  # noqa: F401  (fixture)

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

READ = """
import asyncio, sys
from tcmu_obd.config import CredentialConfig, GlobalConfig
from tcmu_obd.remote.registry import RegistryClient

async def main():
    c = RegistryClient(GlobalConfig(credential_config=CredentialConfig(mode="none")))
    try:
        sys.stdout.buffer.write(await c.read_range(sys.argv[1], 0, 64))
    finally:
        await c.aclose()

asyncio.run(main())
"""


def _env(cert_file: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    if cert_file is not None:
        env["SSL_CERT_FILE"] = cert_file
    # no default CA directory: only the file counts, so the numbers below are exact
    env["SSL_CERT_DIR"] = os.devnull
    return env


def _probe(mode: str, cert_file: str | None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO_ROOT, env=_env(cert_file),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def one_ca_file(tmp_path) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aiohttp_loader test CA")])
    now = dt.datetime.now(dt.timezone.utc)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=5))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    p = tmp_path / "one-ca.pem"
    p.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
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


def test_with_another_thread_alive_the_environment_is_not_touched(one_ca_file):
    got = _probe("second-thread", one_ca_file)
    assert got["aiohttp_verified_ca"] == 1  # plain import: aiohttp loaded the file itself
    assert got["SSL_CERT_FILE"] == one_ca_file
    assert got["ours_ca"] == 1


@pytest.mark.registry
def test_a_fresh_process_reads_over_https_with_the_users_ca_file(registry_factory):
    reg = registry_factory(tls=True)
    data = bytes(range(256)) * 4
    url = reg.blob_url("tls/loader", push_blob(reg.url, "tls/loader", data))

    def read(cert_file: str | None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", READ, url], cwd=REPO_ROOT, env=_env(cert_file),
                              capture_output=True, timeout=120)

    trusted = read(str(reg.ca_path))
    assert trusted.returncode == 0, trusted.stderr.decode()
    assert trusted.stdout == data[:64]
    refused = read(None)  # verification stays on: the registry's own CA is nowhere else
    assert refused.returncode != 0 and b"certificate verif" in refused.stderr
