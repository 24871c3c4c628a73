"""config.v1.json (per image) and overlaybd.json (global), with upstream's keys and defaults.

Upstream parses both with rapidjson and never checks types; a wrong type there is undefined
behaviour. Here every key is optional with upstream's default, unknown keys are ignored (so
newer snapshotters keep working), and a present key of the wrong type is a ConfigError naming
the file and the key. Objects are frozen dataclasses validated once at load.
"""

import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_GLOBAL_CONFIG = "/etc/overlaybd/overlaybd.json"
# Always fullmatch: with match() and "$" a trailing "\n" got through into cache file names.
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def is_digest(value: object) -> bool:
    """True for exactly `sha256:` + 64 lowercase hex digits, the only digests used as file
    names and URL path segments (anything else could carry "/", ".." or a newline)."""
    return isinstance(value, str) and DIGEST_RE.fullmatch(value) is not None


# ---------------------------------------------------------------------------------------------
# global config (overlaybd.json)


@dataclass(frozen=True)
class LogConfig:
    log_level: int = 1
    log_path: str = ""
    log_size_mb: int = 10
    log_rotate_num: int = 3


@dataclass(frozen=True)
class CacheConfig:
    cache_type: str = ""
    cache_dir: str = "/opt/overlaybd/registry_cache"
    cache_size_gb: int = 4
    refill_size: int = 262144
    block_size: int = 65536


@dataclass(frozen=True)
class GzipCacheConfig:
    enable: bool = False
    cache_dir: str = "/opt/overlaybd/gzip_cache"
    cache_size_gb: int = 4
    refill_size: int = 1048576


@dataclass(frozen=True)
class CredentialConfig:
    mode: str = ""
    path: str = ""
    timeout: int = 1
    client_cert_path: str = ""
    client_key_path: str = ""
    server_ca_path: str = ""


@dataclass(frozen=True)
class DownloadConfig:
    enable: bool = False
    delay: int = 300
    delay_extra: int = 30
    max_mbps: int = 100
    try_cnt: int = 5
    block_size: int = 262144


@dataclass(frozen=True)
class P2PConfig:
    enable: bool = False
    address: str = "http://localhost:9731/accelerator"


@dataclass(frozen=True)
class ExporterConfig:
    enable: bool = False
    uri_prefix: str = "/metrics"
    port: int = 9863
    update_interval: int = 60000000


@dataclass(frozen=True)
class PrefetchConfig:
    concurrency: int = 16


@dataclass(frozen=True)
class CertConfig:
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class ServiceConfig:
    enable: bool = False
    address: str = "http://127.0.0.1:9862"


@dataclass(frozen=True)
class Mirror:
    """A pull-through cache or P2P proxy tried before the origin (tcmu-obd extension).

    `url` replaces scheme://host of the blob URL (e.g. "http://127.0.0.1:65001");
    `insecure` skips TLS verification for that mirror only.
    """

    url: str = ""
    insecure: bool = False


@dataclass(frozen=True)
class GlobalConfig:
    log_config: LogConfig = field(default_factory=LogConfig)
    log_level: int = 1  # legacy top-level keys, used when logConfig.logPath is empty
    log_path: str = "/var/log/overlaybd.log"
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    cache_type: str = "file"  # legacy top-level keys, used when cacheConfig.cacheType is empty
    registry_cache_dir: str = "/opt/overlaybd/registry_cache"
    registry_cache_size_gb: int = 4
    gzip_cache_config: GzipCacheConfig = field(default_factory=GzipCacheConfig)
    credential_file_path: str = "/opt/overlaybd/cred.json"
    credential_config: CredentialConfig = field(default_factory=CredentialConfig)
    io_engine: int = 0
    download: DownloadConfig = field(default_factory=DownloadConfig)
    enable_audit: bool = True
    audit_path: str = "/var/log/overlaybd-audit.log"
    enable_thread: bool = False
    p2p_config: P2PConfig = field(default_factory=P2PConfig)
    exporter_config: ExporterConfig = field(default_factory=ExporterConfig)
    registry_fs_version: str = "v2"
    prefetch_config: PrefetchConfig = field(default_factory=PrefetchConfig)
    cert_config: CertConfig = field(default_factory=CertConfig)
    user_agent: str = ""
    service_config: ServiceConfig = field(default_factory=ServiceConfig)
    mirrors: tuple[Mirror, ...] = ()
    source: str = ""  # the file it came from ("" = built-in defaults)

    # --- effective values, resolving upstream's legacy fallbacks ---
    @property
    def effective_cache(self) -> CacheConfig:
        """cacheConfig, or the legacy top-level keys when cacheConfig.cacheType is empty."""
        c = self.cache_config
        if c.cache_type:
            return c
        return CacheConfig(
            cache_type=self.cache_type,
            cache_dir=self.registry_cache_dir,
            cache_size_gb=self.registry_cache_size_gb,
            refill_size=c.refill_size,  # always read from cacheConfig, even in legacy mode
            block_size=c.block_size,
        )

    @property
    def effective_credentials(self) -> CredentialConfig:
        """credentialConfig, or the legacy credentialFilePath in file mode."""
        if self.credential_config.mode:
            return self.credential_config
        return CredentialConfig(mode="file", path=self.credential_file_path)


# ---------------------------------------------------------------------------------------------
# image config (config.v1.json)


@dataclass(frozen=True)
class LowerConfig:
    file: str = ""
    dir: str = ""
    digest: str = ""
    size: int = 0
    target_file: str = ""
    target_digest: str = ""
    gzip_index: str = ""


@dataclass(frozen=True)
class UpperConfig:
    index: str = ""
    data: str = ""
    target: str = ""
    gzip_index: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.index and self.data)


@dataclass(frozen=True)
class ImageConfig:
    repo_blob_url: str = ""
    lowers: tuple[LowerConfig, ...] = ()
    upper: UpperConfig = field(default_factory=UpperConfig)
    result_file: str = ""
    download: DownloadConfig | None = None
    acceleration_layer: bool = False
    record_trace_path: str = ""
    source: str = ""  # path of the config file

    def blob_url(self, digest: str) -> str:
        base = self.repo_blob_url
        return base + digest if base.endswith("/") else f"{base}/{digest}"


# ---------------------------------------------------------------------------------------------
# generic JSON → dataclass with upstream's camelCase keys

_SPECIAL_KEYS = {
    "max_mbps": "maxMBps",
    "cache_size_gb": "cacheSizeGB",
    "registry_cache_size_gb": "registryCacheSizeGB",
    "log_size_mb": "logSizeMB",
    "p2p_config": "p2pConfig",
    "client_cert_path": "client_cert_path",
    "client_key_path": "client_key_path",
    "server_ca_path": "server_ca_path",
}


def _json_key(name: str) -> str:
    if name in _SPECIAL_KEYS:
        return _SPECIAL_KEYS[name]
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _convert(value: Any, hint: Any, where: str, source: str) -> Any:
    origin = getattr(hint, "__origin__", None)
    if is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be an object, got {type(value).__name__}")
        return _from_json(hint, value, where, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where} must be true or false, got {value!r}")
        return value
    if hint is int:
        # is_integer() also refuses inf and nan (json takes Infinity, NaN and 1e400)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{source}: {where} must be an integer, got {value!r}")
        return int(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where} must be a string, got {value!r}")
        if "\0" in value:  # every string here is a path, URL or name: the OS would refuse it later
            raise ConfigError(f"{source}: {where} contains a NUL character")
        return value
    if origin is tuple:
        (item_hint, _ellipsis) = hint.__args__
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where} must be an array, got {type(value).__name__}")
        return tuple(_convert(v, item_hint, f"{where}[{i}]", source) for i, v in enumerate(value))
    args = getattr(hint, "__args__", ())
    if type(None) in args:  # Optional[X]
        (inner,) = [a for a in args if a is not type(None)]
        return None if value is None else _convert(value, inner, where, source)
    raise AssertionError(f"unhandled config type {hint}")


def _from_json(cls: type, obj: dict, where: str, source: str):
    # f.type is the annotation itself: this module does not use `from __future__ import
    # annotations`, whose strings typing.get_type_hints compiled one by one (~25 ms a load,
    # ahead of `fetch`'s first connection)
    kwargs = {}
    for f in fields(cls):
        if f.name == "source":
            continue
        key = _json_key(f.name)
        if key in obj:
            kwargs[f.name] = _convert(obj[key], f.type, f"{where}.{key}" if where else key, source)
    return cls(**kwargs)


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(16 << 20)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from e
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    except RecursionError as e:
        raise ConfigError(f"{path}: not valid JSON: nested too deeply") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    return obj


# ---------------------------------------------------------------------------------------------
# loading


def load_global_config(path: str | os.PathLike | None = None) -> GlobalConfig:
    """Load overlaybd.json. None → /etc/overlaybd/overlaybd.json when present, else defaults."""
    if path is None:
        if not os.path.exists(DEFAULT_GLOBAL_CONFIG):
            return GlobalConfig()
        path = DEFAULT_GLOBAL_CONFIG
    path = os.fspath(path)
    cfg = _from_json(GlobalConfig, _load_json(path, "global config"), "", path)
    _validate_global(cfg, path)
    from dataclasses import replace

    return replace(cfg, source=path)


def _validate_global(cfg: GlobalConfig, path: str) -> None:
    cache = cfg.effective_cache
    if cache.cache_type not in ("file", "ocf", "download"):
        raise ConfigError(f"{path}: cacheConfig.cacheType {cache.cache_type!r} is not file, ocf or download")
    rs = cache.refill_size
    if rs <= 0 or rs & (rs - 1) or rs % 4096:
        raise ConfigError(f"{path}: cacheConfig.refillSize {rs} must be a power of two and a multiple of 4096")
    if cache.cache_size_gb < 0:
        raise ConfigError(f"{path}: cacheConfig.cacheSizeGB must not be negative")
    if not 0 <= cfg.io_engine <= 2:
        raise ConfigError(f"{path}: ioEngine {cfg.io_engine} must be 0, 1 or 2")
    if cfg.enable_thread and cache.cache_type == "file":
        raise ConfigError(f"{path}: enableThread cannot be used with cacheType file (as upstream)")
    _validate_download(cfg.download, path, "download")
    if cfg.prefetch_config.concurrency <= 0:
        raise ConfigError(f"{path}: prefetchConfig.concurrency must be positive")
    for i, m in enumerate(cfg.mirrors):
        _check_no_userinfo(m.url, path, f"mirrors[{i}].url")
        if not m.url.startswith(("http://", "https://")):
            raise ConfigError(f"{path}: mirrors[{i}].url must be an http(s) URL, got {m.url!r}")
    _check_no_userinfo(cfg.p2p_config.address, path, "p2pConfig.address")


def _check_no_userinfo(url: str, path: str, where: str) -> None:
    """Credentials belong in the credential file (matched by host, as upstream does); in a URL
    they would end up in logs, error messages and the result file. The message does not echo
    the URL, which would print the password."""
    if "@" in urllib.parse.urlsplit(url).netloc:
        raise ConfigError(f"{path}: {where} has user:password@ in it; put credentials in the "
                          "credential file (credentialConfig) instead")


def _validate_download(d: DownloadConfig | None, path: str, where: str) -> None:
    if d is None:
        return
    if d.delay < 0 or d.delay_extra < 0:
        raise ConfigError(f"{path}: {where}.delay and delayExtra must not be negative")
    if d.try_cnt < 0:
        raise ConfigError(f"{path}: {where}.tryCnt must not be negative")
    if d.block_size <= 0 or d.block_size % 4096:
        raise ConfigError(f"{path}: {where}.blockSize {d.block_size} must be a positive multiple of 4096")


def load_image_config(path: str | os.PathLike, global_config: GlobalConfig | None = None) -> ImageConfig:
    """Load config.v1.json; relative paths resolve against the config file's directory.

    `download` comes whole from the image config when present, else from the global config
    (upstream copies the global object in; no per-key merge).
    """
    path = os.fspath(path)
    obj = _load_json(path, "image config")
    cfg = _from_json(ImageConfig, obj, "", path)
    base = Path(path).resolve().parent

    def resolve(p: str) -> str:
        return os.path.normpath(base / p) if p and not os.path.isabs(p) else p

    lowers = []
    for i, lower in enumerate(cfg.lowers):
        if lower.digest and not is_digest(lower.digest):
            raise ConfigError(f"{path}: lowers[{i}].digest {lower.digest!r} is not sha256:<64 hex digits>")
        if lower.size < 0:
            raise ConfigError(f"{path}: lowers[{i}].size must not be negative")
        if not (lower.file or lower.dir or lower.digest):
            raise ConfigError(f"{path}: lowers[{i}] has none of file, dir, digest")
        lowers.append(
            LowerConfig(
                file=resolve(lower.file),
                dir=resolve(lower.dir),
                digest=lower.digest,
                size=lower.size,
                target_file=resolve(lower.target_file),
                target_digest=lower.target_digest,
                gzip_index=resolve(lower.gzip_index),
            )
        )
    if len(lowers) > 255:
        raise ConfigError(f"{path}: {len(lowers)} lowers; at most 255 layers can be stacked")
    upper = UpperConfig(
        index=resolve(cfg.upper.index),
        data=resolve(cfg.upper.data),
        target=resolve(cfg.upper.target),
        gzip_index=resolve(cfg.upper.gzip_index),
    )
    _check_no_userinfo(cfg.repo_blob_url, path, "repoBlobUrl")
    if cfg.acceleration_layer and cfg.record_trace_path:
        raise ConfigError(f"{path}: accelerationLayer and recordTracePath cannot both be set")
    download = cfg.download
    if download is None and global_config is not None:
        download = global_config.download
    _validate_download(download, path, "download")
    from dataclasses import replace

    return replace(
        cfg,
        lowers=tuple(lowers),
        upper=upper,
        result_file=resolve(cfg.result_file),
        record_trace_path=resolve(cfg.record_trace_path),
        download=download,
        source=path,
    )


def write_result_file(cfg: ImageConfig, error: BaseException | str | None) -> None:
    """Write exactly `success` or `failed:<message>` (no newline), as upstream does."""
    if not cfg.result_file:
        return
    text = "success" if error is None else f"failed:{error}"
    with open(cfg.result_file, "w") as f:
        f.write(text)


def local_layer_candidates(lower: LowerConfig) -> list[str]:
    """Local paths tried for a lower, in upstream's order; the first existing one wins."""
    out = []
    if lower.file:
        out.append(lower.file)
    if lower.dir:
        out += [os.path.join(lower.dir, n) for n in ("overlaybd.commit", ".commit", "overlaybd.sealed")]
    return out
