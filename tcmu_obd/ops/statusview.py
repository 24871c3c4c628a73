"""Client of the control socket and the human view of its answer (`tcmu-obd status`).

`fetch_status(path)` asks one process (HTTP GET /status over its unix socket); `render`
turns the answer (the same samples /metrics exposes) into a few readable lines.
"""

from __future__ import annotations

import glob
import os

from ..errors import ObdError


async def fetch_status(path: str, timeout: float = 5.0) -> dict:
    import aiohttp

    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path),
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get("http://tcmu-obd/status") as resp:
                if resp.status != 200:
                    raise ObdError(f"{path}: control socket answered {resp.status}")
                return await resp.json()
    except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError) as e:
        raise ObdError(f"{path}: no tcmu-obd process answers there ({e})") from e
    except (aiohttp.ClientError, ValueError) as e:  # something else listens there (an NBD socket?)
        raise ObdError(f"{path}: not a tcmu-obd control socket ({e})") from e
    except TimeoutError as e:
        raise ObdError(f"{path}: no answer within {timeout:g} s") from e


def sockets_in(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "*.sock")))


# --- rendering ------------------------------------------------------------------------------------

def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _rate(n: float) -> str:
    return f"{n / 1e6:.1f} MB/s"


class _Samples:
    def __init__(self, samples: list[dict]):
        self.samples = samples

    def value(self, name: str, **labels) -> float:
        return sum(s["value"] for s in self.samples
                   if s["name"] == name and all(s["labels"].get(k) == v for k, v in labels.items()))

    def each(self, name: str) -> list[dict]:
        return [s for s in self.samples if s["name"] == name]

    def label_values(self, name: str, label: str) -> list[str]:
        seen: list[str] = []
        for s in self.each(name):
            v = s["labels"].get(label)
            if v is not None and v not in seen:
                seen.append(v)
        return seen


def render(st: dict) -> str:
    s = _Samples(st.get("samples", []))
    p = "tcmu_obd_"
    head = f"tcmu-obd {st.get('command', '?')} (pid {st.get('pid', '?')}), up {st.get('uptime', 0):.0f} s"
    if st.get("metrics_url"):
        head += f", metrics {st['metrics_url']}"
    lines = [head]
    for key in ("config", "nbd"):
        if st.get(key):
            lines.append(f"  {key:<11}{st[key]}")
    prios = ("foreground", "prefetch", "fill")
    if s.each(p + "fetched_bytes_total"):
        lines.append("  fetched    " + "  ".join(f"{pr} {_size(s.value(p + 'fetched_bytes_total', priority=pr))}"
                                               for pr in prios))
        lines.append("  throughput " + "  ".join(
            f"{pr} {_rate(s.value(p + 'fetch_throughput_bytes_per_second', priority=pr))}" for pr in prios))
        state = next((x["labels"]["state"] for x in s.each(p + "fill_window_state") if x["value"]), "")
        lines.append(
            f"  in flight  {_size(s.value(p + 'inflight_bytes'))} in {s.value(p + 'inflight_requests'):.0f} requests"
            f" (window {_size(s.value(p + 'fill_window_bytes'))} / {s.value(p + 'fill_window_requests'):.0f} req,"
            f" chunk {_size(s.value(p + 'fill_chunk_bytes'))}{', ' + state if state else ''})")
        lines.append(f"  cache      misses {s.value(p + 'cache_misses_total'):.0f}"
                     f" ({_size(s.value(p + 'cache_miss_bytes_total'))}), slow reads {s.value(p + 'slow_reads_total'):.0f}")
        causes = ", ".join(f"{x['labels']['cause']} {x['value']:.0f}" for x in s.each(p + "registry_retries_total"))
        lines.append(f"  registry   requests {s.value(p + 'registry_requests_total'):.0f},"
                     f" retries {s.value(p + 'registry_retries_total'):.0f}{' (' + causes + ')' if causes else ''},"
                     f" errors {s.value(p + 'registry_errors_total'):.0f}")
    layers = s.label_values(p + "layer_size_bytes", "digest")
    if layers:
        lines.append("  layers")
    for d in layers:
        size, have = s.value(p + "layer_size_bytes", digest=d), s.value(p + "blob_present_bytes", digest=d)
        state = next((x["labels"]["state"] for x in s.each(p + "layer_fill_state")
                      if x["labels"]["digest"] == d and x["value"]), "?")
        pct = 100.0 * have / size if size else 100.0
        lines.append(
            f"    {d[:19]}  {_size(have)}/{_size(size)} ({pct:.0f}%) {state}"
            f"  {_rate(s.value(p + 'layer_fetch_throughput_bytes_per_second', digest=d))}"
            f"  in flight {_size(s.value(p + 'layer_inflight_bytes', digest=d))}"
            f"  reads {s.value(p + 'layer_reads_total', digest=d):.0f}"
            f" hits {s.value(p + 'layer_cache_hits_total', digest=d):.0f}"
            f" misses {s.value(p + 'layer_cache_misses_total', digest=d):.0f}")
    images = s.label_values(p + "image_size_bytes", "image")
    if images:
        lines.append("  images")
    for name in images:
        upper = s.value(p + "upper_allocated_bytes", image=name)
        lines.append(f"    {name}  size {_size(s.value(p + 'image_size_bytes', image=name))}"
                     + (f"  upper {_size(upper)} allocated" if s.each(p + "upper_allocated_bytes") else ""))
    for fam, dev_label, op_label, title in (("scsi_commands_total", "device", "opcode", "SCSI"),
                                            ("nbd_commands_total", "export", "command", "NBD")):
        rows = s.each(p + fam)
        if not rows:
            continue
        lines.append(f"  {title} commands")
        for dev in s.label_values(p + fam, dev_label):
            cells = [f"{x['labels'][op_label]}/{x['labels']['status']} {x['value']:.0f}"
                     for x in rows if x["labels"][dev_label] == dev]
            lines.append(f"    {dev or '(default)'}  " + "  ".join(cells))
    return "\n".join(lines)
