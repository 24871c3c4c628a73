"""A real OCI registry for tests: Debian's `docker-registry` (distribution 2.8) on 127.0.0.1.

Usage. In a test module, import the fixtures you need (pytest picks up imported fixtures):
``from tests.support.registry import registry, registry_htpasswd, registry_token, hello_world``.
``registry`` is a session-scoped anonymous registry (a `RegistryProcess`: ``.url`` is
``http://127.0.0.1:PORT``, ``.root`` the filesystem-driver storage dir); ``registry_htpasswd``
needs Basic auth (``.username`` / ``.password``); ``registry_token`` uses distribution's bearer
token auth with an in-process `TokenIssuer` (``.issuer``: counts token requests in
``.issuer.requests``; ``.issuer.expires_in`` is what clients are told; ``.issuer.issue_expired(n)``
makes the next n tokens already expired in the registry's eyes, so the registry answers 401 to a
token the client believes valid — the "401 in the middle of a fill" case). Push data with
``digest = push_blob(reg.url, "test/repo", b"..." or Path, auth=reg.auth)`` (``reg.auth`` is None
or ``(user, password)``; files are streamed, never loaded whole) and get the blob URL with
``blob_url(reg.url, repo, digest)``; ``push_oci_layout(reg.url, repo, layout_dir, tag)`` pushes
one manifest of an OCI image layout with its blobs; the ``hello_world`` fixture pushes
../shared fixtures' hello-world-oci tag ``amd64-converted`` to ``registry`` and returns a
`PushedImage` (``.repo_blob_url``, ``.layers`` digests, ``.blob_path(digest)`` local bytes).
``RegistryProcess(tls=True)`` serves
HTTPS with a self-signed cert for 127.0.0.1 (``.ca_path``; ``client_ca=`` also demands client
certificates). For a private registry in one test use ``with RegistryProcess(tmp_path, auth=...) as reg:``
(or the ``registry_factory`` fixture, which stops everything it started). Faults (503/429,
resets, slow bodies, redirects to a presigned-URL storage host, injected 401s, 416) come from
`tests.support.faultproxy.FaultProxy`, put in front of any of these. Everything runs on
loopback; processes are always stopped by the fixtures' finalizers; waits poll a real condition.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tcmu_obd.remote.auth import parse_challenge
from tests.support.paths import FIXTURES_UPSTREAM

DOCKER_REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
HTPASSWD = shutil.which("htpasswd") or "/usr/bin/htpasswd"
SERVICE = "tcmu-obd-test-registry"
ISSUER = "tcmu-obd-test-issuer"
CHUNK = 8 << 20  # streaming block size for uploads from disk

Auth = tuple[str, str] | None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float, what: str, interval: float = 0.02):
    """Poll `cond()` until it returns a truthy value; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# token issuer (distribution "token" auth: RS256 JWT, signing cert in the registry's rootcertbundle)


def _libtrust_kid(public_key) -> str:
    """The key id distribution 2.8 looks up in its rootcertbundle (libtrust fingerprint)."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


@dataclass
class TokenRequest:
    service: str | None
    scopes: list[str]
    user: str | None
    status: int


class TokenIssuer:
    """A token server on 127.0.0.1 (own thread). GET /token?service=..&scope=.. with optional Basic.

    users: {name: password}; empty dict = anyone (anonymous included) gets pull+push.
    expires_in: seconds reported to the client (JSON `expires_in`).
    lifetime: seconds the JWT is valid for the registry (distribution 2.8 allows 60 s of leeway
    past `exp`; that is compensated, so `lifetime` is the registry-visible validity).
    """

    REGISTRY_LEEWAY = 60

    def __init__(self, workdir: Path, users: dict[str, str] | None = None, *, expires_in: int = 300,
                 lifetime: int = 300, token_key: str = "token"):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
        import datetime as dt

        self.users = dict(users or {})
        self.expires_in = expires_in
        self.lifetime = lifetime
        self.token_key = token_key  # "token" or "access_token"
        self.delay = 0.0  # seconds to hold each answer (to cancel readers mid token fetch)
        self.requests: list[TokenRequest] = []
        self._expired_left = 0
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.kid = _libtrust_kid(self._key.public_key())
        self.cert_path = Path(workdir) / "token-signing.crt"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    @property
    def realm(self) -> str:
        return self.url + "/token"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def issue_expired(self, n: int = 1) -> None:
        """The next `n` tokens are already expired for the registry (client still told expires_in)."""
        with self._lock:
            self._expired_left = n

    def make_token(self, scopes: list[str], subject: str, *, expired: bool = False) -> str:
        import jwt

        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) >= 3 and parts[0] == "repository":
                access.append({"type": "repository", "name": ":".join(parts[1:-1]),
                               "actions": ["pull", "push", "delete"]})
        now = int(time.time())
        exp = now - 3600 if expired else now + self.lifetime - self.REGISTRY_LEEWAY
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": exp, "nbf": now - 120,
                  "iat": now - 120, "jti": uuid.uuid4().hex, "access": access}
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        u = urllib.parse.urlsplit(h.path)
        if u.path != "/token":
            h.send_error(404)
            return
        q = urllib.parse.parse_qs(u.query)
        service = (q.get("service") or [None])[0]
        scopes = [s for v in q.get("scope", []) for s in v.split(" ") if s]
        user = None
        ok = True
        authz = h.headers.get("Authorization", "")
        if authz.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(authz[6:]).decode().partition(":")
            except Exception:
                user, pw = "?", None
            ok = not self.users or self.users.get(user) == pw
        elif self.users:
            ok = False
        with self._lock:
            expired = ok and self._expired_left > 0
            if expired:
                self._expired_left -= 1
            self.requests.append(TokenRequest(service, scopes, user, 200 if ok else 401))
        if not ok:
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}'
            h.send_response(401)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        if self.delay:
            time.sleep(self.delay)  # this handler's own thread
        tok = self.make_token(scopes, user or "anonymous", expired=expired)
        body = json.dumps({self.token_key: tok, "expires_in": self.expires_in,
                           "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def start(self) -> "TokenIssuer":
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                issuer._handle(self)

            def log_message(self, *a):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-issuer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# ---------------------------------------------------------------------------------------------
# the registry process


class RegistryProcess:
    """One `docker-registry serve` on 127.0.0.1:<free port>, storage in a temp dir.

    auth: None (anonymous), "htpasswd" (Basic; `users`), or "token" (bearer; a TokenIssuer is
    started with `users`, `expires_in`, `lifetime`). `gogc` sets the registry's GOGC (400 by default:
    the registry is CPU-bound on range GETs, link-rig.md §1).
    """

    def __init__(self, workdir: str | os.PathLike | None = None, *, auth: str | None = None,
                 users: dict[str, str] | None = None, expires_in: int = 300, lifetime: int = 300,
                 gogc: int = 400, start_timeout: float = 30.0, tls: bool = False,
                 client_ca: str | os.PathLike | None = None):
        if auth not in (None, "htpasswd", "token"):
            raise ValueError(f"auth must be None, 'htpasswd' or 'token', not {auth!r}")
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="obd-registry-"))
        self.auth_mode = auth
        if auth and users is None:
            users = {"obd": "s3cret"}
        self.users = dict(users or {})
        self.expires_in = expires_in
        self.lifetime = lifetime
        self.gogc = gogc
        self.start_timeout = start_timeout
        self.tls = tls or client_ca is not None
        self.client_ca = client_ca  # PEM CA: with it the registry requires client certificates (mTLS)
        self.ca_path: Path | None = None  # with tls=True: the self-signed server cert (trust it to verify)
        self.root = self.workdir / "storage"
        self.port = 0
        self.url = ""
        self.issuer: TokenIssuer | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    # convenience: the first user, for push helpers and client configs
    @property
    def username(self) -> str | None:
        return next(iter(self.users), None)

    @property
    def password(self) -> str | None:
        return self.users.get(self.username) if self.username else None

    @property
    def auth(self) -> Auth:
        return (self.username, self.password) if self.auth_mode and self.username else None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.root}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: {uuid.uuid4().hex}",
            "  headers:",
            "    X-Content-Type-Options: [nosniff]",
        ]
        if self.tls:
            cert, key = self._make_tls_cert()
            lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
            if self.client_ca:
                lines += ["    clientcas:", f"      - {self.client_ca}"]
        if self.auth_mode == "htpasswd":
            htp = self.workdir / "htpasswd"
            with open(htp, "w") as f:
                for user, pw in self.users.items():
                    out = subprocess.run([HTPASSWD, "-nbB", user, pw], check=True, capture_output=True, text=True)
                    f.write(out.stdout.strip() + "\n")
            lines += ["auth:", "  htpasswd:", f"    realm: {SERVICE}", f"    path: {htp}"]
        elif self.auth_mode == "token":
            self.issuer = TokenIssuer(self.workdir, self.users, expires_in=self.expires_in,
                                      lifetime=self.lifetime).start()
            lines += ["auth:", "  token:", f"    realm: {self.issuer.realm}", f"    service: {SERVICE}",
                      f"    issuer: {ISSUER}", f"    rootcertbundle: {self.issuer.cert_path}"]
        return "\n".join(lines) + "\n"

    def _make_tls_cert(self) -> tuple[Path, Path]:
        import datetime as dt
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                            x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        cert_path, key_path = self.workdir / "tls.crt", self.workdir / "tls.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        self.ca_path = cert_path
        return cert_path, key_path

    def start(self) -> "RegistryProcess":
        if not os.access(DOCKER_REGISTRY, os.X_OK):
            pytest.fail("docker-registry not installed: run scripts/setup.sh (apt-get install -y docker-registry apache2-utils)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        last_err = None
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port()
            self.url = f"{'https' if self.tls else 'http'}://{self.host}"
            cfg = self.workdir / "config.yml"
            cfg.write_text(self._config())
            self._log = open(self.workdir / "registry.log", "ab")
            env = dict(os.environ, GOGC=str(self.gogc))
            env.pop("REGISTRY_HTTP_ADDR", None)
            self._proc = subprocess.Popen([DOCKER_REGISTRY, "serve", str(cfg)], stdout=self._log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            try:
                wait_until(self._ready, self.start_timeout, f"docker-registry on {self.url}/v2/")
                return self
            except RuntimeError as e:  # exited (port race): retry
                last_err = e
                self._reap()
            except BaseException:
                self.stop()
                raise
        self.stop()
        raise RuntimeError(f"docker-registry did not start: {last_err}")

    def _ready(self) -> bool:
        if self._proc.poll() is not None:
            log = (self.workdir / "registry.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"docker-registry exited with {self._proc.returncode}: {log}")
        if self.client_ca:  # mTLS: the probe has no client cert; a listening socket is enough
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                return True
            except OSError:
                return False
        try:
            if self.tls:
                import ssl

                conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=2,
                                                   context=ssl._create_unverified_context())
            else:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
            finally:
                conn.close()
        except OSError:
            return False
        return status in (200, 401)

    def _reap(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        self._reap()
        if self.issuer is not None:
            self.issuer.stop()
            self.issuer = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "RegistryProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver stores a blob's bytes (what an S3 bucket would hold)."""
        algo, hexd = digest.split(":", 1)
        return self.root / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def blob_url(self, repo: str, digest: str) -> str:
        return blob_url(self.url, repo, digest)

    def repo_blob_url(self, repo: str) -> str:
        return f"{self.url}/v2/{repo}/blobs"

    def __repr__(self) -> str:
        return f"<RegistryProcess {self.url or '(stopped)'} auth={self.auth_mode}>"


def blob_url(registry_url: str, repo: str, digest: str) -> str:
    return f"{registry_url.rstrip('/')}/v2/{repo}/blobs/{digest}"


# ---------------------------------------------------------------------------------------------
# a small synchronous registry client for pushing (http.client; Basic or Bearer on demand)


class PushError(RuntimeError):
    pass


class _Pusher:
    def __init__(self, registry_url: str, auth: Auth):
        u = urllib.parse.urlsplit(registry_url)
        self.scheme, self.netloc = u.scheme, u.netloc
        self.auth = auth
        self.authz: str | None = None

    def _conn(self, netloc: str | None = None, scheme: str | None = None):
        netloc = netloc or self.netloc
        if (scheme or self.scheme) == "https":
            import ssl

            return http.client.HTTPSConnection(netloc, timeout=120, context=ssl._create_unverified_context())
        return http.client.HTTPConnection(netloc, timeout=120)

    def _basic(self) -> str:
        user, pw = self.auth
        return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()

    def _authenticate(self, challenge: str) -> None:
        scheme, p = parse_challenge(challenge)
        if scheme == "basic":
            if not self.auth:
                raise PushError("registry wants Basic credentials; none given")
            self.authz = self._basic()
        elif scheme == "bearer":
            q = {"service": p.get("service", "")}
            if p.get("scope"):
                q["scope"] = p["scope"]
            url = p["realm"] + "?" + urllib.parse.urlencode(q)
            u = urllib.parse.urlsplit(url)
            c = self._conn(u.netloc, u.scheme)
            try:
                c.request("GET", u.path + "?" + u.query, headers={"Authorization": self._basic()} if self.auth else {})
                r = c.getresponse()
                body = r.read()
            finally:
                c.close()
            if r.status != 200:
                raise PushError(f"token request {url} -> {r.status} {body[:200]!r}")
            j = json.loads(body)
            self.authz = "Bearer " + (j.get("token") or j["access_token"])
        else:
            raise PushError(f"unsupported auth challenge {challenge!r}")

    def request(self, method: str, target: str, body=None, headers: dict | None = None,
                ok=(200, 201, 202, 204)) -> http.client.HTTPResponse:
        """Send; on 401 authenticate per the challenge and resend once (bodies must be rewindable)."""
        for attempt in (0, 1):
            h = dict(headers or {})
            if self.authz:
                h["Authorization"] = self.authz
            if isinstance(body, io.IOBase):
                body.seek(0)
            c = self._conn()
            c.request(method, target, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            c.close()
            r.body = data  # type: ignore[attr-defined]
            if r.status == 401 and attempt == 0 and r.getheader("WWW-Authenticate"):
                self._authenticate(r.getheader("WWW-Authenticate"))
                continue
            if r.status not in ok:
                raise PushError(f"{method} {target} -> {r.status}: {data[:300]!r}")
            return r
        raise AssertionError("unreachable")

    def _target(self, location: str) -> str:
        u = urllib.parse.urlsplit(location)
        return u.path + ("?" + u.query if u.query else "")


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return "sha256:" + h.hexdigest(), n


def push_blob(registry_url: str, repo: str, data: bytes | str | os.PathLike, *, auth: Auth = None,
              digest: str | None = None) -> str:
    """Upload a blob (bytes monolithically; a file streamed in one PATCH, never read whole).

    Returns the digest "sha256:<hex>". Skips the upload when the registry already has it.
    """
    p = _Pusher(registry_url, auth)
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
        size = len(data)
        path = None
    else:
        path = Path(data)
        if digest is None:
            digest, size = _sha256_file(path)
        else:
            size = path.stat().st_size
    head = p.request("HEAD", f"/v2/{repo}/blobs/{digest}", ok=(200, 404))
    if head.status == 200:
        return digest
    r = p.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"}, ok=(202,))
    loc = p._target(r.getheader("Location"))
    sep = "&" if "?" in loc else "?"
    if path is None:
        p.request("PUT", f"{loc}{sep}digest={urllib.parse.quote(digest)}", body=data,
                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)}, ok=(201,))
        return digest
    with open(path, "rb") as f:
        r = p.request("PATCH", loc, body=f, headers={"Content-Type": "application/octet-stream",
                                                       "Content-Length": str(size)}, ok=(202,))
    loc = p._target(r.getheader("Location"))
    sep = "&" if "?" in loc else "?"
    p.request("PUT", f"{loc}{sep}digest={urllib.parse.quote(digest)}", body=b"",
              headers={"Content-Length": "0"}, ok=(201,))
    return digest


def push_manifest(registry_url: str, repo: str, ref: str, manifest: bytes, media_type: str, *,
                  auth: Auth = None) -> str:
    """PUT a manifest under a tag (or digest); returns its digest."""
    p = _Pusher(registry_url, auth)
    p.request("PUT", f"/v2/{repo}/manifests/{ref}", body=manifest,
              headers={"Content-Type": media_type, "Content-Length": str(len(manifest))}, ok=(201,))
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


@dataclass
class PushedImage:
    registry_url: str
    repo: str
    tag: str
    manifest_digest: str
    config_digest: str
    layers: list[str]
    layer_sizes: list[int]
    layout: Path
    manifest: dict = field(default_factory=dict)

    @property
    def repo_blob_url(self) -> str:
        return f"{self.registry_url}/v2/{self.repo}/blobs"

    def blob_url(self, digest: str) -> str:
        return f"{self.repo_blob_url}/{digest}"

    def blob_path(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.layout / "blobs" / algo / hexd


def push_oci_layout(registry_url: str, repo: str, layout: str | os.PathLike, tag: str, *,
                    auth: Auth = None, push_tag: str | None = None) -> PushedImage:
    """Push the manifest annotated `org.opencontainers.image.ref.name == tag` and its blobs."""
    layout = Path(layout)
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            break
    else:
        raise KeyError(f"{layout}: no manifest tagged {tag!r}")

    def path(d: str) -> Path:
        a, h = d.split(":", 1)
        return layout / "blobs" / a / h

    raw = path(desc["digest"]).read_bytes()
    man = json.loads(raw)
    for d in [man["config"]] + man.get("layers", []):
        push_blob(registry_url, repo, path(d["digest"]), auth=auth, digest=d["digest"])
    mt = man.get("mediaType") or desc["mediaType"]
    mdig = push_manifest(registry_url, repo, push_tag or tag, raw, mt, auth=auth)
    return PushedImage(registry_url=registry_url, repo=repo, tag=push_tag or tag, manifest_digest=mdig,
                       config_digest=man["config"]["digest"], layers=[l["digest"] for l in man["layers"]],
                       layer_sizes=[l["size"] for l in man["layers"]], layout=layout, manifest=man)


HELLO_WORLD_LAYOUT = FIXTURES_UPSTREAM / "hello-world-oci" / "hello-world"


# ---------------------------------------------------------------------------------------------
# pytest fixtures


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """Anonymous docker-registry, shared by the session. Use unique repo names per test."""
    with RegistryProcess(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_htpasswd(tmp_path_factory):
    """docker-registry with htpasswd Basic auth; credentials in .username/.password/.auth."""
    with RegistryProcess(tmp_path_factory.mktemp("registry-htpasswd"), auth="htpasswd") as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory):
    """docker-registry with bearer-token auth; `.issuer` is its TokenIssuer (shared: reset what you
    change, or use registry_factory for a private one)."""
    with RegistryProcess(tmp_path_factory.mktemp("registry-token"), auth="token") as reg:
        yield reg


@pytest.fixture
def registry_factory(tmp_path):
    """Start private registries: `reg = registry_factory(auth="token", expires_in=2)`; all stopped
    at teardown."""
    started: list[RegistryProcess] = []

    def make(**kw) -> RegistryProcess:
        reg = RegistryProcess(tmp_path / f"registry{len(started)}", **kw)
        started.append(reg)
        return reg.start()

    yield make
    for reg in reversed(started):
        reg.stop()


@pytest.fixture(scope="session")
def hello_world(registry) -> PushedImage:
    """hello-world-oci tag amd64-converted (an overlaybd image) pushed to `registry`."""
    return push_oci_layout(registry.url, "library/hello-world", HELLO_WORLD_LAYOUT, "amd64-converted")
