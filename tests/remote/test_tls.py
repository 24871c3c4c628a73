"""TLS: verification on by default, insecure mirrors, trusted CA, certConfig client certificates."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tcmu_obd.config import CertConfig, GlobalConfig, Mirror
from tcmu_obd.errors import RemoteError
from tcmu_obd.remote import CredentialProvider, RegistryClient
from tests.remote.helpers import FAST_RETRY, client
from tests.support.registry import push_blob, registry_factory  # noqa: F401

pytestmark = pytest.mark.registry
DATA = bytes(range(256)) * 64


async def test_verification_on_by_default(registry_factory):
    reg = registry_factory(tls=True)
    d = push_blob(reg.url, "tls/x", DATA)
    url = reg.blob_url("tls/x", d)
    async with client() as c:
        with pytest.raises(RemoteError, match="certificate verif") as ei:
            await c.read_range(url, 0, 10)
        assert url in str(ei.value) and c.stats.retries == 0
    async with client(mirrors=[Mirror(url=reg.url, insecure=True)]) as c:  # insecure for that host only
        assert await c.read_range(url, 0, 10) == DATA[:10]


async def test_trusted_ca(registry_factory, monkeypatch):
    reg = registry_factory(tls=True)
    d = push_blob(reg.url, "tls/x", DATA)
    monkeypatch.setenv("SSL_CERT_FILE", str(reg.ca_path))  # the system bundle, as far as ssl knows
    async with client() as c:
        assert await c.read_range(reg.blob_url("tls/x", d), 100, 10) == DATA[100:110]


def _client_pki(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test client CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=5))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "obd")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=5))
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "client.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    return tmp_path / "ca.pem", tmp_path / "client.crt", tmp_path / "client.key"


async def test_cert_config_client_certificate(registry_factory, tmp_path, monkeypatch):
    ca, crt, key = _client_pki(tmp_path)
    reg = registry_factory(client_ca=ca)
    monkeypatch.setenv("SSL_CERT_FILE", str(reg.ca_path))
    url = reg.blob_url("tls/x", "sha256:" + "0" * 64)
    async with client() as c:  # no client cert: the handshake is refused
        with pytest.raises(RemoteError):
            await c.read_range(url, 0, 10)
    cfg = GlobalConfig(cert_config=CertConfig(cert_file=str(crt), key_file=str(key)))
    c = RegistryClient(cfg, retry=FAST_RETRY, credentials=CredentialProvider(cfg.credential_config, docker_config=False))
    try:
        with pytest.raises(RemoteError, match="blob not found"):  # got through TLS to the registry
            await c.read_range(url, 0, 10)
    finally:
        await c.aclose()
