"""Prometheus view of a Scheduler (exporterConfig): a collector that reads the plain counters
at scrape time, so the hot path only bumps ints.

    from prometheus_client import REGISTRY
    REGISTRY.register(SchedulerCollector(scheduler))
"""

from __future__ import annotations

from .core import Priority, Scheduler


class SchedulerCollector:
    def __init__(self, scheduler: Scheduler, prefix: str = "tcmu_obd"):
        self.s = scheduler
        self.prefix = prefix

    def describe(self):
        return []  # unchecked collector: metrics appear at the first scrape

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        p, st = self.prefix, self.s.stats
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
        yield GaugeMetricFamily(f"{p}_inflight_bytes", "Bytes of range GETs in flight", value=self.s.inflight_bytes)
        yield GaugeMetricFamily(f"{p}_inflight_requests", "Range GETs in flight", value=self.s.inflight_requests)
        yield GaugeMetricFamily(f"{p}_fill_window_bytes", "Background window (bytes in flight allowed)",
                                value=self.s.window.window_bytes)
        cum, buckets = 0, []
        for bound, n in zip(st.fg_latency_buckets, st.fg_latency_counts):
            cum += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
        yield HistogramMetricFamily(f"{p}_foreground_fetch_seconds", "Latency of foreground range GETs",
                                    buckets=buckets, sum_value=st.fg_latency_sum)
        present = GaugeMetricFamily(f"{p}_blob_present_bytes", "Cached bytes per blob", labels=["digest"])
        for b in self.s.blobs():
            present.add_metric([b.digest], b.cache.present_bytes)
        yield present
