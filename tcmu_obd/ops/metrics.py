"""The process's metrics: one prometheus_client collector over everything that counts.

Everything here reads plain counters at scrape time (the hot paths only bump ints; see
scheduler/metrics.py): the live schedulers (scheduler.core.live_schedulers, via
SchedulerCollector), their registry clients (`ClientStats`), the frontends' command counters
(ops.counters), the served images (the `images` callable the command hands over), and the
throughput meters, which are the one thing sampled on a timer (`sample()`, once a second
from ops.observability) because a rate needs two points in time.

`snapshot(registry)` turns a scrape into JSON for the control socket, so `tcmu-obd status`
shows exactly the numbers /metrics shows.
"""

from __future__ import annotations

import errno as _errno
import os
from collections import deque
from typing import Callable, Iterable

from .counters import NBD_COMMANDS, SCSI_COMMANDS, CommandCounters

PREFIX = "tcmu_obd"


class RateMeter:
    """Rate of a growing counter over the last `span` seconds (sans-IO: the caller brings
    the clock). A counter that goes down (a restarted blob) restarts the meter."""

    def __init__(self, span: float = 5.0):
        self.span = span
        self._points: deque[tuple[float, float]] = deque()

    def update(self, now: float, value: float) -> None:
        if self._points and value < self._points[-1][1]:
            self._points.clear()
        self._points.append((now, value))
        while len(self._points) > 2 and now - self._points[1][0] >= self.span:
            self._points.popleft()

    @property
    def rate(self) -> float:
        if len(self._points) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0


def _schedulers():
    from ..scheduler.core import live_schedulers

    return live_schedulers()


class Meters:
    """Throughput meters: bytes fetched per priority, and per layer (all priorities)."""

    def __init__(self, span: float = 5.0, schedulers: Callable[[], list] = _schedulers):
        self.span = span
        self.schedulers = schedulers
        self.by_priority: dict[str, RateMeter] = {}
        self.by_layer: dict[str, RateMeter] = {}

    def sample(self, now: float) -> None:
        from ..scheduler.core import Priority

        totals = {p.name.lower(): 0 for p in Priority}
        layers: dict[str, int] = {}
        for s in self.schedulers():
            for p in Priority:
                totals[p.name.lower()] += s.stats.bytes_fetched[p]
            for b in s.blobs():
                layers[b.digest] = layers.get(b.digest, 0) + sum(b.fetched)
        for name, v in totals.items():
            self.by_priority.setdefault(name, RateMeter(self.span)).update(now, v)
        for d in list(self.by_layer):
            if d not in layers:
                del self.by_layer[d]
        for d, v in layers.items():
            self.by_layer.setdefault(d, RateMeter(self.span)).update(now, v)


def _scsi_names(opcode: int, status: int) -> tuple[str, str]:
    from ..frontends.tcmu.scsi import Op, ScsiStatus

    try:
        op = Op(opcode).name
    except ValueError:
        op = f"0x{opcode:02x}"
    try:
        st = ScsiStatus(status).name
    except ValueError:
        st = f"0x{status:02x}"
    return op, st


def _nbd_names(command: int, err: int) -> tuple[str, str]:
    from ..frontends.nbd.protocol import COMMAND_NAMES

    return COMMAND_NAMES.get(command, f"CMD_{command}"), "OK" if err == 0 else _errno.errorcode.get(err, str(err))


def _merge(families: Iterable) -> list:
    """Families of the same name from several sources (two live schedulers) become one, with
    the values of identical samples added: the exposition must not repeat a series."""
    out: dict[str, object] = {}
    for fam in families:
        have = out.get(fam.name)
        if have is None:
            out[fam.name] = fam
            continue
        index = {(smp.name, tuple(sorted(smp.labels.items()))): i for i, smp in enumerate(have.samples)}
        for smp in fam.samples:
            i = index.get((smp.name, tuple(sorted(smp.labels.items()))))
            if i is None:
                have.samples.append(smp)
            else:
                old = have.samples[i]
                have.samples[i] = old._replace(value=old.value + smp.value)
    return list(out.values())


class ObdCollector:
    """Collector for the whole process. `images()`: [(name, image)] of the served images."""

    def __init__(self, *, images: Callable[[], list] = lambda: [], meters: Meters | None = None,
                 schedulers: Callable[[], list] = _schedulers,
                 scsi: CommandCounters = SCSI_COMMANDS, nbd: CommandCounters = NBD_COMMANDS):
        self.images = images
        self.meters = meters
        self.schedulers = schedulers
        self.scsi, self.nbd = scsi, nbd

    def describe(self):
        return []  # unchecked: the set of series follows what the process serves

    def collect(self):
        from ..scheduler.metrics import SchedulerCollector

        scheds = self.schedulers()
        fams = []
        for s in scheds:
            fams.extend(SchedulerCollector(s, PREFIX).collect())
        fams.extend(self._registry(scheds))
        yield from _merge(fams)
        yield from self._throughput()
        yield from self._commands()
        yield from self._images()

    def _registry(self, scheds):
        from prometheus_client.core import CounterMetricFamily

        p = PREFIX
        clients = {id(s.fetcher): s.fetcher.stats for s in scheds if hasattr(getattr(s, "fetcher", None), "stats")}
        if not clients:
            return
        simple = [("requests", "HTTP requests sent for blobs"), ("errors", "Blob reads that failed after retries"),
                  ("redirects", "Blob locations resolved through redirects"),
                  ("auth_refreshes", "Tokens replaced after a 401"), ("token_requests", "Token requests"),
                  ("mirror_fallbacks", "Mirrors skipped after a failure")]
        for key, doc in simple:
            yield CounterMetricFamily(f"{p}_registry_{key}", doc,
                                      value=sum(getattr(c, key, 0) for c in clients.values()))
        retries = CounterMetricFamily(f"{p}_registry_retries", "Registry requests retried, by cause",
                                      labels=["cause"])
        causes: dict[str, int] = {}
        for c in clients.values():
            for cause, n in getattr(c, "retries_by_cause", {}).items():
                causes[cause] = causes.get(cause, 0) + n
        for cause, n in sorted(causes.items()):
            retries.add_metric([cause], n)
        yield retries

    def _throughput(self):
        from prometheus_client.core import GaugeMetricFamily

        if self.meters is None:
            return
        m = self.meters
        g = GaugeMetricFamily(f"{PREFIX}_fetch_throughput_bytes_per_second",
                              f"Bytes fetched per second over the last {m.span:g} s", labels=["priority"])
        for name, meter in m.by_priority.items():
            g.add_metric([name], meter.rate)
        yield g
        g = GaugeMetricFamily(f"{PREFIX}_layer_fetch_throughput_bytes_per_second",
                              f"Bytes fetched per second for the layer over the last {m.span:g} s",
                              labels=["digest"])
        for d, meter in m.by_layer.items():
            g.add_metric([d], meter.rate)
        yield g

    def _commands(self):
        from prometheus_client.core import CounterMetricFamily

        scsi = CounterMetricFamily(f"{PREFIX}_scsi_commands", "SCSI commands completed (TCMU)",
                                   labels=["device", "opcode", "status"])
        for (dev, op, st), n in self.scsi.items():
            scsi.add_metric([dev, *_scsi_names(op, st)], n)
        yield scsi
        nbd = CounterMetricFamily(f"{PREFIX}_nbd_commands", "NBD requests completed",
                                  labels=["export", "command", "status"])
        for (dev, op, st), n in self.nbd.items():
            nbd.add_metric([dev, *_nbd_names(op, st)], n)
        yield nbd

    def _images(self):
        from prometheus_client.core import GaugeMetricFamily

        images = list(self.images())
        size = GaugeMetricFamily(f"{PREFIX}_image_size_bytes", "Virtual size of a served image", labels=["image"])
        upper = GaugeMetricFamily(f"{PREFIX}_upper_size_bytes", "Writable upper layer files: apparent size",
                                  labels=["image", "file"])
        alloc = GaugeMetricFamily(f"{PREFIX}_upper_allocated_bytes",
                                  "Writable upper layer files: bytes allocated on disk", labels=["image", "file"])
        for name, image in images:
            size.add_metric([name], getattr(image, "size", 0))
            cfg = getattr(image, "config", None)
            up = getattr(cfg, "upper", None)
            if getattr(image, "upper", None) is None or up is None:
                continue
            for kind, path in (("data", up.data), ("index", up.index)):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                upper.add_metric([name, kind], st.st_size)
                alloc.add_metric([name, kind], st.st_blocks * 512)
        yield GaugeMetricFamily(f"{PREFIX}_images", "Images being served", value=len(images))
        yield size
        yield upper
        yield alloc


def snapshot(registry) -> list[dict]:
    """Every sample of a scrape as JSON-able dicts: {name, labels, value, type, help}."""
    out = []
    for fam in registry.collect():
        for smp in fam.samples:
            out.append({"name": smp.name, "labels": dict(smp.labels), "value": smp.value,
                        "type": fam.type, "help": fam.documentation})
    return out
