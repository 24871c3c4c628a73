"""Prometheus view of a Scheduler (exporterConfig): a collector that reads the plain counters
at scrape time, so the hot path only bumps ints.

    from prometheus_client import REGISTRY
    REGISTRY.register(SchedulerCollector(scheduler))

tcmu_obd.ops.metrics wires it (with the registry client, the frontends and the images) into
the exporter and `tcmu-obd status`; docs/observability.md lists every metric.
"""

from __future__ import annotations

from .core import FillState, Priority, Scheduler


def _buckets(bounds, counts) -> list[tuple[str, int]]:
    cum, out = 0, []
    for bound, n in zip(bounds, counts):
        cum += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), cum))
    return out


class SchedulerCollector:
    def __init__(self, scheduler: Scheduler, prefix: str = "tcmu_obd"):
        self.s = scheduler
        self.prefix = prefix

    def describe(self):
        return []  # unchecked collector: metrics appear at the first scrape

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        p, s, st = self.prefix, self.s, self.s.stats
        fetched = CounterMetricFamily(f"{p}_fetched_bytes", "Bytes fetched from registries", labels=["priority"])
        reqs = CounterMetricFamily(f"{p}_fetch_requests", "Range GETs completed", labels=["priority"])
        fails = CounterMetricFamily(f"{p}_fetch_failures", "Range GETs failed", labels=["priority"])
        for prio in Priority:
            name = prio.name.lower()
            fetched.add_metric([name], st.bytes_fetched[prio])
            reqs.add_metric([name], st.requests[prio])
            fails.add_metric([name], st.failures[prio])
        yield fetched
        yield reqs
        yield fails
        yield GaugeMetricFamily(f"{p}_inflight_bytes", "Bytes of range GETs in flight", value=s.inflight_bytes)
        yield GaugeMetricFamily(f"{p}_inflight_requests", "Range GETs in flight", value=s.inflight_requests)
        w = s.window
        yield GaugeMetricFamily(f"{p}_fill_window_bytes", "Background window (bytes in flight allowed)",
                                value=w.window_bytes)
        yield GaugeMetricFamily(f"{p}_fill_window_requests", "Background window (requests in flight allowed)",
                                value=w.max_requests)
        chunk = w.chunk if getattr(w, "auto_chunk", False) else s.fill_chunk
        yield GaugeMetricFamily(f"{p}_fill_chunk_bytes", "Bytes per background fill request", value=chunk)
        rate = getattr(w, "max_rate", None)
        if rate is not None:
            yield GaugeMetricFamily(f"{p}_link_rate_bytes_per_second",
                                    "Best delivery rate the adaptive window has measured", value=rate)
        state = getattr(w, "state", None)
        if state is not None:
            g = GaugeMetricFamily(f"{p}_fill_window_state", "Adaptive window phase (1 = current)", labels=["state"])
            for member in type(state):
                g.add_metric([str(member.value)], 1.0 if member is state else 0.0)
            yield g
        yield HistogramMetricFamily(f"{p}_foreground_fetch_seconds", "Latency of foreground range GETs",
                                    buckets=_buckets(st.fg_latency_buckets, st.fg_latency_counts),
                                    sum_value=st.fg_latency_sum)
        yield HistogramMetricFamily(f"{p}_foreground_read_wait_seconds",
                                    "How long foreground reads that missed the cache waited for the registry",
                                    buckets=_buckets(st.fg_latency_buckets, st.read_wait_counts),
                                    sum_value=st.read_wait_sum)
        yield CounterMetricFamily(f"{p}_cache_misses", "Reads that found bytes missing from the cache",
                                  value=st.misses)
        yield CounterMetricFamily(f"{p}_cache_miss_bytes", "Bytes asked for by reads that missed", value=st.miss_bytes)
        yield CounterMetricFamily(f"{p}_slow_reads", "Foreground misses that waited at least slow_read_seconds",
                                  value=st.slow_reads)
        yield CounterMetricFamily(f"{p}_foreground_overlays",
                                  "Foreground GETs that overtook a slow background transfer", value=s.overlays)
        yield from self._layers(p)

    def _layers(self, p: str):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        present = GaugeMetricFamily(f"{p}_blob_present_bytes", "Cached bytes per blob", labels=["digest"])
        size = GaugeMetricFamily(f"{p}_layer_size_bytes", "Size of the layer blob", labels=["digest"])
        progress = GaugeMetricFamily(f"{p}_layer_fill_ratio", "Cached fraction of the layer blob (0..1)",
                                     labels=["digest"])
        state = GaugeMetricFamily(f"{p}_layer_fill_state", "Background fill state (1 = current)",
                                  labels=["digest", "state"])
        inflight = GaugeMetricFamily(f"{p}_layer_inflight_bytes", "Bytes of range GETs in flight for the layer",
                                     labels=["digest"])
        reads = CounterMetricFamily(f"{p}_layer_reads", "Reads of the layer through the cache", labels=["digest"])
        hits = CounterMetricFamily(f"{p}_layer_cache_hits", "Reads served from the cache alone", labels=["digest"])
        misses = CounterMetricFamily(f"{p}_layer_cache_misses", "Reads that waited for the registry",
                                     labels=["digest"])
        fetched = CounterMetricFamily(f"{p}_layer_fetched_bytes", "Bytes fetched for the layer",
                                      labels=["digest", "priority"])
        for b in self.s.blobs():
            d = b.digest
            have = b.cache.present_bytes
            present.add_metric([d], have)
            size.add_metric([d], b.size)
            progress.add_metric([d], have / b.size if b.size else 1.0)
            for fs in FillState:
                state.add_metric([d, fs.value], 1.0 if b.fill_state is fs else 0.0)
            inflight.add_metric([d], sum(t.end - t.start for t in b.inflight))
            reads.add_metric([d], b.reads)
            hits.add_metric([d], max(0, b.reads - b.misses))
            misses.add_metric([d], b.misses)
            for prio in Priority:
                fetched.add_metric([d, prio.name.lower()], b.fetched[prio])
        yield from (present, size, progress, state, inflight, reads, hits, misses, fetched)
