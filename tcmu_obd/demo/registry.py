"""A local registry for the demo's blobs, on 127.0.0.1.

Two implementations, one surface (`url`, `repo`, `repo_blob_url`, `kind`, `async push(path)
-> digest`, `async aclose()`):

* `DockerRegistry`: Debian's `docker-registry` (distribution 2.8) started with a generated
  config and filesystem storage in the demo's temp dir; blobs go in through its upload API
  (POST uploads/ → PATCH the bytes → PUT ?digest=). A real registry, so the client sees real
  redirects-free distribution behaviour, Range answers and headers.
* `InProcessRegistry`: an aiohttp app serving GET/HEAD /v2/<repo>/blobs/<digest> with single
  Range support (206 + Content-Range; 416 + `bytes */size` when unsatisfiable; 200 without
  Range), plus GET /v2/ for the ping. Used when docker-registry is not installed, or forced.

`start_registry` picks one. Both stop everything they started in `aclose()` (idempotent).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

import aiohttp
from aiohttp import web

from ..errors import ObdError

log = logging.getLogger(__name__)

DOCKER_REGISTRY = "/usr/bin/docker-registry"
REPO = "demo/rootfs"
CHUNK = 1 << 20
_BLOB_PATH = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RegistryStartError(ObdError):
    """The local registry could not be started or did not accept a blob."""


def find_docker_registry() -> str | None:
    if os.access(DOCKER_REGISTRY, os.X_OK):
        return DOCKER_REGISTRY
    return shutil.which("docker-registry")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """One `Range: bytes=...` header against a blob of `size` bytes.

    Returns None (no/ignored Range: send the whole blob), (start, end) end-exclusive, or
    "unsatisfiable". Multi-range and malformed headers are ignored, as RFC 9110 allows.
    """
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


class _LoopbackRegistry:
    """What the demo needs of either registry: where it listens and the repo's blob URL."""

    port: int
    repo: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def repo_blob_url(self) -> str:
        return f"{self.url}/v2/{self.repo}/blobs"


class InProcessRegistry(_LoopbackRegistry):
    kind = "in-process aiohttp"

    def __init__(self, repo: str = REPO):
        self.repo = repo
        self.blobs: dict[str, Path] = {}
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> "InProcessRegistry":
        app = web.Application()
        app.router.add_get("/v2/", self._ping)
        app.router.add_route("*", "/v2/{tail:.+}", self._blob)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def push(self, path: str | os.PathLike) -> str:
        path = Path(path)
        digest = await asyncio.to_thread(_sha256, path)
        self.blobs[digest] = path
        return digest

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        m = _BLOB_PATH.match(request.path)
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        if not m or m.group("repo") != self.repo or m.group("digest") not in self.blobs:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]}, status=404)
        digest = m.group("digest")
        path = self.blobs[digest]
        size = path.stat().st_size
        headers = {"Accept-Ranges": "bytes", "Docker-Content-Digest": digest,
                   "Content-Type": "application/octet-stream", "Etag": f'"{digest}"'}
        rng = parse_range(request.headers.get("Range"), size)
        if rng == "unsatisfiable":
            headers["Content-Range"] = f"bytes */{size}"
            return web.Response(status=416, headers=headers)
        if rng is None:
            status, start, end = 200, 0, size
        else:
            status, (start, end) = 206, rng
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "GET":
            fd = os.open(path, os.O_RDONLY)
            try:
                pos = start
                while pos < end:
                    data = os.pread(fd, min(CHUNK, end - pos), pos)
                    if not data:
                        break
                    await resp.write(data)
                    pos += len(data)
            finally:
                os.close(fd)
        await resp.write_eof()
        return resp

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


class DockerRegistry(_LoopbackRegistry):
    kind = "docker-registry"

    def __init__(self, workdir: str | os.PathLike, repo: str = REPO, binary: str | None = None,
                 start_timeout: float = 30.0):
        self.workdir = Path(workdir)
        self.repo = repo
        self.binary = binary or find_docker_registry() or DOCKER_REGISTRY
        self.start_timeout = start_timeout
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._log = None
        self._session: aiohttp.ClientSession | None = None

    def _config(self) -> str:
        return "\n".join([
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.workdir / 'storage'}",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: {secrets.token_hex(16)}",
        ]) + "\n"

    async def start(self) -> "DockerRegistry":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(trust_env=False)
        last = ""
        try:
            for _attempt in range(3):  # the probed port can be taken before the registry binds it
                self.port = _free_port()
                cfg = self.workdir / "config.yml"
                cfg.write_text(self._config())
                self._log = open(self.workdir / "registry.log", "ab")
                env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
                env["GOGC"] = "400"
                self._proc = await asyncio.create_subprocess_exec(
                    self.binary, "serve", str(cfg), stdin=asyncio.subprocess.DEVNULL,
                    stdout=self._log, stderr=asyncio.subprocess.STDOUT, env=env)
                if await self._wait_ready():
                    return self
                last = (self.workdir / "registry.log").read_text(errors="replace")[-500:]
                await self._stop_process()
            raise RegistryStartError(f"docker-registry did not start: {last.strip()}")
        except BaseException:
            await self.aclose()
            raise

    async def _wait_ready(self) -> bool:
        """Poll GET /v2/ until it answers (True) or the process exits (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while loop.time() < deadline:
            if self._proc.returncode is not None:
                return False
            try:
                async with self._session.get(f"{self.url}/v2/", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status in (200, 401):
                        return True
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            try:  # returns early if the process exits
                await asyncio.wait_for(self._proc.wait(), 0.05)
            except asyncio.TimeoutError:
                pass
        raise RegistryStartError(f"docker-registry did not answer on {self.url} within {self.start_timeout:.0f}s")

    async def push(self, path: str | os.PathLike) -> str:
        """Upload a blob file (streamed); returns its digest."""
        path = Path(path)
        digest = await asyncio.to_thread(_sha256, path)
        s = self._session
        base = self.repo_blob_url
        async with s.head(f"{base}/{digest}") as r:
            if r.status == 200:
                return digest
        async with s.post(f"{base}/uploads/", headers={"Content-Length": "0"}) as r:
            if r.status != 202:
                raise RegistryStartError(f"upload start: HTTP {r.status} {await r.text()}")
            loc = r.headers["Location"]
        loc = loc if loc.startswith("http") else self.url + loc
        size = path.stat().st_size

        async def body():
            with open(path, "rb") as f:
                while chunk := f.read(4 * CHUNK):
                    yield chunk

        async with s.patch(loc, data=body(), headers={"Content-Type": "application/octet-stream",
                                                     "Content-Length": str(size)}) as r:
            if r.status != 202:
                raise RegistryStartError(f"upload: HTTP {r.status} {await r.text()}")
            loc = r.headers["Location"]
        loc = loc if loc.startswith("http") else self.url + loc
        sep = "&" if "?" in loc else "?"
        async with s.put(f"{loc}{sep}digest={digest}", headers={"Content-Length": "0"}) as r:
            if r.status != 201:
                raise RegistryStartError(f"upload commit: HTTP {r.status} {await r.text()}")
        return digest

    async def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.returncode is None:
                try:
                    proc.terminate()
                    await asyncio.wait_for(proc.wait(), 10)
                except ProcessLookupError:
                    pass
                except BaseException as e:
                    # timeout, or cancelled (Ctrl-C) while waiting: never leave it running
                    try:
                        proc.kill()
                    except ProcessLookupError:
                        pass
                    if not isinstance(e, asyncio.TimeoutError):
                        raise
                    await proc.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    async def aclose(self) -> None:
        try:
            await self._stop_process()
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None


async def start_registry(workdir: str | os.PathLike, *, prefer_docker: bool = True):
    """The best registry available: docker-registry if installed and wanted, else in-process."""
    if prefer_docker and find_docker_registry():
        return await DockerRegistry(Path(workdir) / "registry").start()
    return await InProcessRegistry().start()
