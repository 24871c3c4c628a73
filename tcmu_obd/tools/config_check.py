"""`tcmu-obd config check`: validate the configs and resolve every layer, serving nothing.

    tcmu-obd config check [--global-config G] [--json] [--size-only] [--timeout S] [CONFIG]

Loads overlaybd.json (G, else /etc/overlaybd/overlaybd.json when present, else built-in
defaults) and, when given, the image's config.v1.json with the loaders `run` and `serve` use.
Each lower is then resolved the way opening the image would: the first existing local file
among file, dir/overlaybd.commit, dir/.commit, dir/overlaybd.sealed is parsed (wrapping, LSMT
header and index); otherwise the registry is asked for the blob's size (with the configured
credentials, mirrors and P2P agent), the size is compared with the config's `size`, and the
layer's header and index are read with a few ranged GETs (--size-only stops at the size).
A writable upper is opened read-only.

Nothing is created or written: no device, no cache file, no resultFile. Prints what would be
served and exits 0, or prints one line per problem, each naming the file, the key or layer
and the cause, and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass, field

from ..config import (
    GlobalConfig,
    ImageConfig,
    LowerConfig,
    load_global_config,
    load_image_config,
    local_layer_candidates,
)
from ..errors import AuthError, ObdError, RemoteError

EXIT_OK = 0
EXIT_PROBLEMS = 1


@dataclass
class LayerReport:
    index: int
    where: str = ""  # "local" or "remote"
    location: str = ""  # the path, or the blob URL
    blob_size: int | None = None
    wrapping: list[str] = field(default_factory=list)
    virtual_size: int | None = None
    role: str = "lower"  # "lower", or "trace" for an acceleration layer (not served)
    problem: str = ""


@dataclass
class Report:
    global_config: str = ""  # the file, or "" for built-in defaults
    cache: dict = field(default_factory=dict)
    credentials: dict = field(default_factory=dict)
    mirrors: list[str] = field(default_factory=list)
    image_config: str = ""
    layers: list[LayerReport] = field(default_factory=list)
    upper: dict | None = None
    virtual_size: int | None = None
    read_only: bool = True
    notes: list[str] = field(default_factory=list)  # worth knowing, but served as upstream would
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "config",
        help="configuration tools (config check: validate configs and resolve layers)",
        description="Configuration tools.",
    )
    # Also accepted before `check`; the sub-command's copy only overrides it when given.
    p.add_argument("--global-config", metavar="G", default=None,
                   help="overlaybd.json (default: /etc/overlaybd/overlaybd.json when present, else built-in defaults)")
    sub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser(
        "check",
        help="validate overlaybd.json and a config.v1.json, resolve every layer, report what would be served",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("config", nargs="?", metavar="CONFIG", help="image config.v1.json (omit to check only G)")
    c.add_argument("--global-config", metavar="G", default=argparse.SUPPRESS,
                   help="overlaybd.json (default: /etc/overlaybd/overlaybd.json when present, else built-in defaults)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--size-only", action="store_true",
                   help="for remote layers, only check that the blob exists and has the configured size")
    c.add_argument("--timeout", metavar="S", type=float, default=10.0,
                   help="bound on each registry request (default 10)")
    c.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        print("tcmu-obd config check: error: --timeout must be > 0", file=sys.stderr)
        return EXIT_PROBLEMS
    report = asyncio.run(check(args.global_config, args.config, size_only=args.size_only, timeout=args.timeout))
    if args.json:
        out = asdict(report)
        out["ok"] = report.ok
        print(json.dumps(out, indent=2))
    else:
        print(render(report))
    if not report.ok:
        print(f"tcmu-obd config check: {len(report.problems)} problem(s)", file=sys.stderr)
        return EXIT_PROBLEMS
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# the checks


async def check(global_path: str | None, config_path: str | None, *, size_only: bool = False,
                timeout: float = 10.0) -> Report:
    """Everything `config check` finds, as a Report (problems listed, never raised)."""
    report = Report()
    try:
        gcfg = load_global_config(global_path)
    except ObdError as e:
        report.problems.append(str(e))
        return report
    _describe_global(gcfg, report)
    if config_path is None:
        return report
    try:
        cfg = load_image_config(config_path, gcfg)
    except ObdError as e:
        report.problems.append(str(e))
        return report
    report.image_config = cfg.source
    await _check_image(cfg, gcfg, report, size_only=size_only, timeout=timeout)
    return report


def _describe_global(gcfg: GlobalConfig, report: Report) -> None:
    src = gcfg.source or "built-in defaults"
    report.global_config = gcfg.source
    cache = gcfg.effective_cache
    state = "exists" if os.path.isdir(cache.cache_dir) else "will be created"
    if os.path.exists(cache.cache_dir) and not os.path.isdir(cache.cache_dir):
        report.problems.append(f"{src}: cacheConfig.cacheDir {cache.cache_dir} exists and is not a directory")
        state = "not a directory"
    report.cache = {"type": cache.cache_type, "dir": cache.cache_dir, "state": state,
                    "size_gb": cache.cache_size_gb, "refill_size": cache.refill_size}
    cred = gcfg.effective_credentials
    info = {"mode": cred.mode, "path": cred.path}
    if cred.mode == "file":
        if not cred.path:
            info["state"] = "no path: anonymous"
        elif os.path.isfile(cred.path):
            info["state"] = "present"
            try:
                with open(cred.path, "rb") as f:
                    json.loads(f.read(1 << 20))
            except (OSError, ValueError) as e:
                report.problems.append(f"{src}: credential file {cred.path} is not readable JSON: {e}")
                info["state"] = "unreadable"
        else:
            info["state"] = "absent: anonymous, or ~/.docker/config.json"
    report.credentials = info
    report.mirrors = [m.url for m in gcfg.mirrors]


async def _check_image(cfg: ImageConfig, gcfg: GlobalConfig, report: Report, *, size_only: bool,
                       timeout: float) -> None:
    lowers = list(cfg.lowers)
    if not lowers and not cfg.upper.enabled:
        report.problems.append(f"{cfg.source}: no lowers and no upper: nothing to serve")
        return
    for i in range(len(lowers)):
        last_is_trace = cfg.acceleration_layer and i == len(lowers) - 1
        report.layers.append(LayerReport(index=i, role="trace" if last_is_trace else "lower"))
    client = None
    try:
        jobs = []
        for layer, lower in zip(report.layers, lowers):
            local = _local_path(lower)
            if local is None and lower.digest and cfg.repo_blob_url and client is None:
                client = _client(gcfg, timeout)
            jobs.append(_check_lower(layer, lower, local, cfg, client, size_only))
        await asyncio.gather(*jobs)
    finally:
        if client is not None:
            await client.aclose()
    for layer in report.layers:
        if layer.problem:
            report.problems.append(f"{cfg.source}: lowers[{layer.index}]: {layer.problem}")
    _check_upper(cfg, report)
    served = [layer for layer in report.layers if layer.role == "lower"]
    vsize = None
    if report.upper and report.upper.get("virtual_size"):
        vsize = report.upper["virtual_size"]
    else:
        for layer in reversed(served):
            if layer.virtual_size is None:
                break  # unknown (size-only or failed): the top-most known one may not be the one used
            if layer.virtual_size > 0:
                vsize = layer.virtual_size
                break
    report.virtual_size = vsize
    report.read_only = not cfg.upper.enabled
    if cfg.result_file and not os.path.isdir(os.path.dirname(cfg.result_file) or "."):
        report.problems.append(f"{cfg.source}: resultFile {cfg.result_file}: its directory does not exist")
    if not report.problems and vsize is not None and vsize % 512:
        report.problems.append(f"{cfg.source}: virtual size {vsize} is not a multiple of 512")


def _local_path(lower: LowerConfig) -> str | None:
    for path in local_layer_candidates(lower):
        if os.path.exists(path):
            return path
    return None


def _client(gcfg: GlobalConfig, timeout: float):
    from ..remote import RegistryClient, RetryPolicy, Timeouts

    # A check should answer promptly: few retries, short timeouts (the daemon is more patient).
    return RegistryClient(gcfg, max_connections=8,
                          timeouts=Timeouts(connect=timeout, sock_read=timeout, total=timeout * 3, auth=timeout),
                          retry=RetryPolicy(attempts=3, backoff_initial=0.05, backoff_max=0.5, retry_after_max=timeout))


async def _check_lower(layer: LayerReport, lower: LowerConfig, local: str | None, cfg: ImageConfig, client,
                       size_only: bool) -> None:
    from ..image.source import FileSource

    if lower.target_file or lower.target_digest or lower.gzip_index:
        layer.problem = "TurboOCI layers (targetFile/targetDigest/gzipIndex) are not supported"
        return
    if local is not None:
        layer.where, layer.location = "local", local
        try:
            blob = FileSource(local)
        except (ObdError, OSError) as e:
            layer.problem = f"cannot open local file {local}: {e}"
            return
        layer.blob_size = blob.size
        if layer.role == "lower":
            await _parse_layer(layer, blob)
        else:
            await blob.aclose()
        return
    candidates = local_layer_candidates(lower)
    if not lower.digest:
        layer.problem = f"no local file among {candidates} and no digest to fetch"
        return
    if not cfg.repo_blob_url:
        layer.problem = f"{lower.digest} is not local ({candidates or 'no file/dir'}) and repoBlobUrl is empty"
        return
    url = cfg.blob_url(lower.digest)
    layer.where, layer.location = "remote", url
    try:
        size = await client.blob_size(url)
    except RemoteError as e:
        layer.problem = f"{lower.digest}: {_remote_cause(e)}"
        return
    layer.blob_size = size
    if lower.size and lower.size != size:
        layer.problem = f"size {lower.size} in the config, but the registry's blob {url} has {size} bytes"
        return
    if size_only or layer.role != "lower":
        return
    await _parse_layer(layer, client.open_blob(url, size, name=url))


async def _parse_layer(layer: LayerReport, blob) -> None:
    from ..image.layers import open_committed_layer

    try:
        opened = await open_committed_layer(blob)
    except RemoteError as e:
        await blob.aclose()
        layer.problem = f"reading the layer's header and index: {_remote_cause(e)}"
        return
    except (ObdError, OSError) as e:
        await blob.aclose()
        layer.problem = f"not an overlaybd layer: {e}"
        return
    try:
        layer.wrapping = opened.unwrapped.wrapping
        layer.virtual_size = opened.virtual_size
    finally:
        await opened.aclose()


def _remote_cause(e: BaseException) -> str:
    import aiohttp

    status = getattr(e, "status", None)
    if isinstance(e, AuthError):
        return f"registry refused the credentials: {e}"
    if status == 404:
        return f"blob not found in the registry: {e}"
    cause = e.__cause__
    if isinstance(cause, aiohttp.ClientConnectorError):
        # the RemoteError's text carries aiohttp's repr; say what an operator can act on
        oe = cause.os_error
        if isinstance(oe, socket.gaierror) or not (oe.errno and oe.errno > 0):
            reason = oe.strerror or str(oe)
        else:
            reason = os.strerror(oe.errno)
        return f"registry unreachable: cannot connect to {cause.host}:{cause.port} ({reason})"
    return str(e)


def _check_upper(cfg: ImageConfig, report: Report) -> None:
    up = cfg.upper
    if up.target or up.gzip_index:
        report.problems.append(
            f"{cfg.source}: upper: TurboOCI writable layers (upper.target/gzipIndex) are not supported")
        return
    if not (up.index or up.data):
        return
    if not up.enabled:
        missing = "upper.data" if up.index else "upper.index"
        report.notes.append(f"{cfg.source}: {missing} is empty: no writable upper, served read-only (as upstream)")
        return
    from ..image.writable import WritableLayer

    report.upper = {"data": up.data, "index": up.index, "virtual_size": None}
    for key, path in (("upper.data", up.data), ("upper.index", up.index)):
        if not os.path.isfile(path):
            report.problems.append(f"{cfg.source}: {key} {path} does not exist (create it with `tcmu-obd create`)")
            return
    try:
        layer = WritableLayer.open(up.data, up.index, read_only=True)
    except (ObdError, OSError) as e:
        report.problems.append(f"{cfg.source}: upper: {e}")
        return
    try:
        report.upper["virtual_size"] = layer.virtual_size or None
    finally:
        layer.close()


# ---------------------------------------------------------------------------------------------
# output


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n} bytes ({n / k:.1f} {unit})"
    return f"{n} bytes"


def render(report: Report) -> str:
    lines = [f"global config: {report.global_config or 'built-in defaults'}"]
    if report.cache:
        c = report.cache
        served_by = "" if c["type"] == "file" else " (served by the file cache)"
        lines.append(f"  cache: {c['type']}{served_by} in {c['dir']} ({c['state']}), "
                     f"{c['size_gb']} GB, refill {c['refill_size']} bytes")
    if report.credentials:
        cr = report.credentials
        lines.append(f"  credentials: {cr['mode'] or 'none'} {cr['path']}"
                     + (f" ({cr['state']})" if cr.get("state") else ""))
    lines.append(f"  mirrors: {', '.join(report.mirrors) if report.mirrors else 'none'}")
    if report.image_config:
        lines.append(f"image config: {report.image_config}")
        for layer in report.layers:
            head = f"  layer {layer.index}{' (acceleration trace, not served)' if layer.role == 'trace' else ''}: "
            if layer.problem:
                lines.append(head + (f"{layer.where} {layer.location}: " if layer.where else "") + "FAILED (below)")
                continue
            text = f"{layer.where} {layer.location}, blob {_size(layer.blob_size)}"
            if layer.wrapping:
                text += f", {' -> '.join(layer.wrapping)}, virtual size {_size(layer.virtual_size)}"
            lines.append(head + text)
        if report.upper:
            u = report.upper
            lines.append(f"  upper: data {u['data']}, index {u['index']}"
                         + (f", virtual size {_size(u['virtual_size'])}" if u.get("virtual_size") else ""))
    for n in report.notes:
        lines.append(f"note: {n}")
    for p in report.problems:
        lines.append(f"problem: {p}")
    if report.ok and report.image_config:
        n = sum(1 for layer in report.layers if layer.role == "lower")
        mode = "read-only" if report.read_only else "read-write"
        lines.append(f"would serve: {_size(report.virtual_size)}, {mode}, {n} lower(s)"
                     + (" + writable upper" if report.upper else ""))
    if report.ok:
        lines.append("ok")
    return "\n".join(lines)
