"""Background concurrency control and rate limiting. Sans-IO: callers pass the time in.

Theory of operation: AdaptiveWindow
-----------------------------------
The background classes (PREFETCH, FILL) share one window of *bytes in flight*. The goal is to
keep the path to the registry full while keeping the queue at the bottleneck short, so a
foreground request sent now still completes in about one round trip plus its own transfer.

By Little's law, bytes in flight = delivery rate × time each request spends in flight. While
the path is not full, more bytes in flight raise the delivery rate and leave request latency
at its floor. Once it is full, extra bytes only queue: the rate stays, latency grows. So per
*round* — a round ends when a request sent after the round began completes, so each decision
sees the effect of the previous one — the controller measures:

* the delivery rate (bytes completed over the last 4 smoothed latencies, ≥ 1 s: requests
  are credited whole when they complete, a long span averages that out) and its maximum
  over the last 5 rounds;
* the median latency of chunk-sized background requests, against its floor `base_latency`
  (a chunk through an empty pipe: about RTT + chunk / per-stream rate).

States:

* STARTUP — the window (8 chunks at first) doubles each round while the rate grows ≥ 25 %,
  but never beyond 3 × rate × floor (the measurement lags a round; unchecked doubling
  overshoots into a queue that delays device reads for seconds). After 3 rounds without
  such growth, or latency above `high` × floor, it leaves through PROBE_LATENCY (BBR's
  Drain): the floor seen so far was measured with the initial burst queued.
* PROBE_LATENCY — window = `min_bytes` until one request sent into the drained pipe
  completes; its latency is the new floor. Also entered from STEADY when the floor has not
  been seen again for `base_window_s` (BBR's ProbeRTT), so a floor learned under load never
  ratchets the window up.
* STEADY — window = max rate × floor × gain: the request pipe's bandwidth-delay product
  times a headroom gain. The gain (1.25–3, start 1.5) is hill-climbed on throughput: every
  `probe_every` rounds it is raised 25 % for `probe_rounds` rounds and kept only if the rate
  rose ≥ 5 % (grow bytes in flight while throughput rises). While the round's median latency
  exceeds `high` × floor the surplus only queues: the gain is lowered and the window cut
  (back off when latency inflates). A falling capacity decays out of the 5-round max. The
  bottleneck queue so stays around (gain − 1) × BDP.

Bounds: `min_bytes` ≤ window ≤ `max_bytes`, requests ≤ `max_requests`. Foreground requests
are outside the window (they always start at once) but are a signal too: one slower than
`fg_high` × the best foreground latency (and ≥ 50 ms more) means the background queues in
front of device reads: the window shrinks by 30 % (at most once per round).

FixedWindow is the non-adaptive version (benchmarks, and `--mode upstream`: one request).
"""

from __future__ import annotations

import enum
from collections import deque


class WindowState(enum.Enum):
    STARTUP = "startup"
    STEADY = "steady"
    PROBE_LATENCY = "probe_latency"
    FIXED = "fixed"


class FixedWindow:
    """At most `max_requests` background requests (and `max_bytes`) in flight; no adaptation."""

    state = WindowState.FIXED

    def __init__(self, max_requests: int = 1, max_bytes: int = 1 << 40):
        self.max_requests = max_requests
        self.window_bytes = max_bytes
        self.inflight_bytes = 0
        self.inflight_requests = 0

    def can_start(self, nbytes: int, scale: float = 1.0) -> bool:
        if self.inflight_requests == 0:
            return True
        limit_req = max(1, int(self.max_requests * scale))
        # a request may cross the window (so a window of 3.9 chunks means 4 requests, not 3)
        return self.inflight_requests < limit_req and self.inflight_bytes < self.window_bytes * scale

    def on_start(self, now: float, nbytes: int) -> None:
        self.inflight_bytes += nbytes
        self.inflight_requests += 1

    def on_complete(self, now: float, nbytes: int, latency: float, ok: bool = True) -> None:
        self.inflight_bytes -= nbytes
        self.inflight_requests -= 1

    def on_foreground(self, now: float, nbytes: int, latency: float) -> None:
        pass

    def __repr__(self) -> str:
        return f"<FixedWindow {self.inflight_requests}/{self.max_requests} req>"


class AdaptiveWindow(FixedWindow):
    def __init__(
        self,
        chunk_bytes: int = 4 << 20,
        *,
        initial_bytes: int | None = None,
        min_bytes: int | None = None,
        max_bytes: int = 256 << 20,
        max_requests: int = 64,
        gain: float = 1.5,
        high: float = 2.0,
        fg_high: float = 3.0,
        base_window_s: float = 30.0,
        min_round_s: float = 0.02,
    ):
        self.chunk = chunk_bytes
        self.min_bytes = min_bytes if min_bytes is not None else 2 * chunk_bytes
        super().__init__(max_requests, initial_bytes if initial_bytes is not None else 8 * chunk_bytes)
        self.max_bytes = max_bytes
        self.window_bytes = min(max(self.window_bytes, self.min_bytes), max_bytes)
        self.gain, self.high, self.fg_high = gain, high, fg_high
        self._gain = gain
        self.min_gain, self.max_gain = min(1.25, gain), max(3.0, gain)
        self.probe_every, self.probe_rounds = 6, 2
        self._probe_left = 0
        self._probe_from_rate = 0.0
        self._cycle = 0
        self.rate_rounds = 5
        self.rate_span_srtts = 4
        self.min_rate_span_s = 1.0
        self._deliv: deque[tuple[float, int]] = deque()
        self._first_start: float | None = None
        self.base_window_s = base_window_s
        self.min_round_s = min_round_s
        self.state = WindowState.STARTUP
        self._stalls = 0
        self._best_rate = 0.0
        self._rates: deque[tuple[float, float]] = deque()  # (time, rate) of recent rounds
        self._base: float | None = None  # latency floor of a chunk-sized request
        self._base_stamp = 0.0
        self._probe_start = 0.0
        self._saved_window: int | None = 0
        self.probes = 0
        self._round_start: float | None = None
        self._round_lat: list[float] = []
        self._srtt: float | None = None
        self._fg_best: float | None = None
        self._fg_cut_round = -1
        self.rounds = 0
        self.last_rate = 0.0
        self.last_latency = 0.0

    # --- estimates -------------------------------------------------------------------------------
    @property
    def base_latency(self) -> float | None:
        return self._base

    @property
    def max_rate(self) -> float:
        return max((r for _, r in self._rates), default=0.0)

    def _clamp(self, w: float) -> None:
        self.window_bytes = int(min(self.max_bytes, max(self.min_bytes, w)))

    # --- events ---------------------------------------------------------------------------------
    def on_start(self, now: float, nbytes: int) -> None:
        if self._round_start is None:
            self._round_start = now
        if self._first_start is None:
            self._first_start = now
        super().on_start(now, nbytes)

    def on_complete(self, now: float, nbytes: int, latency: float, ok: bool = True) -> None:
        super().on_complete(now, nbytes, latency, ok)
        if not ok:
            return
        self._deliv.append((now, nbytes))
        if nbytes >= self.chunk // 2:
            self._round_lat.append(latency)
            self._srtt = latency if self._srtt is None else 0.875 * self._srtt + 0.125 * latency
            if self.state is WindowState.PROBE_LATENCY:
                if now - latency >= self._probe_start:  # sent into the drained pipe: a clean sample
                    self._base, self._base_stamp = latency, now
                    self.state = WindowState.STEADY
                    if self._saved_window is None:  # end of STARTUP
                        self._clamp(self.max_rate * latency * self._gain)
                    else:
                        self._clamp(self._saved_window)
                    self._round_start, self._round_lat = now, []
                return
            if self._base is None or latency <= self._base:
                self._base, self._base_stamp = latency, now
            elif self.state is WindowState.STEADY and now - self._base_stamp > self.base_window_s:
                # the floor is stale and may hide a queue: drain to min_bytes for one request
                # so the next one measures an empty pipe (BBR's ProbeRTT, for requests)
                self._enter_probe(now, saved=self.window_bytes)
                return
        if self._round_start is None:
            self._round_start = now
        # A round ends when a request *sent after it began* completes (BBR's round counting):
        # the effect of the last window change is then visible in what we measure.
        sent_at = now - latency
        if sent_at >= self._round_start and now - self._round_start >= self.min_round_s and self._round_lat:
            self._end_round(now)

    def on_foreground(self, now: float, nbytes: int, latency: float) -> None:
        if self._fg_best is None or latency < self._fg_best:
            self._fg_best = latency
            return
        if (
            latency > self._fg_best * self.fg_high
            and latency - self._fg_best > 0.05
            and self._fg_cut_round != self.rounds
            and self.inflight_requests > 0
        ):
            self._fg_cut_round = self.rounds
            self._clamp(self.window_bytes * 0.7)

    def _enter_probe(self, now: float, saved: int | None) -> None:
        self.state = WindowState.PROBE_LATENCY
        self._saved_window = saved
        self._probe_start = now
        self.window_bytes = self.min_bytes
        self.probes += 1

    def _delivery_rate(self, now: float) -> float:
        """Bytes/s completed over the last `rate_span_srtts` smoothed latencies (≥ 1 s).

        A request is credited when it completes, though its bytes flowed during its whole
        latency; over a span of several latencies the bytes credited early and late cancel
        out in steady state (error ≲ window / span), which a short span would not.
        """
        span = max(self.rate_span_srtts * (self._srtt or 0.0), self.min_rate_span_s)
        while self._deliv and self._deliv[0][0] <= now - span:
            self._deliv.popleft()
        if self._first_start is not None:
            span = min(span, max(now - self._first_start, 1e-3))
        return sum(n for _, n in self._deliv) / span

    def _end_round(self, now: float) -> None:
        rate = self._delivery_rate(now)
        lats = sorted(self._round_lat)
        lat = lats[len(lats) // 2]
        self._round_start = now
        self._round_lat = []
        self.rounds += 1
        self.last_rate, self.last_latency = rate, lat
        self._rates.append((now, rate))
        while len(self._rates) > self.rate_rounds:
            self._rates.popleft()
        base = self.base_latency or lat
        bdp = self.max_rate * base
        if self.state is WindowState.PROBE_LATENCY:
            return
        if self.state is WindowState.STARTUP:
            if rate >= self._best_rate * 1.25:
                self._stalls = 0
                self._best_rate = rate
                if lat <= base * self.high or self.rounds < 3:
                    # double, but never past 3 × what the measured rate and floor justify:
                    # the measurement lags a round, so unchecked doubling overshoots into a
                    # queue that delays device reads for seconds
                    self._clamp(min(self.window_bytes * 2, max(3 * bdp, self.window_bytes)))
                    return
            else:
                self._stalls += 1
            # (latency only counts from round 3: the first rounds pay connection set-up)
            if self._stalls >= 3 or (lat > base * self.high and self.rounds >= 3):
                # leave STARTUP through a latency probe (BBR's Drain): the floor seen so far
                # was measured with the initial burst queued, so drain and measure it clean
                self._enter_probe(now, saved=None)
            return
        # STEADY: bandwidth-delay product of the request pipe times an adaptive gain. The gain
        # is hill-climbed on throughput: every `probe_every` rounds it is raised by 25 % for
        # `probe_rounds` rounds; kept if the delivery rate rose ≥ 5 %, else taken back. While
        # latency says the surplus only queues (> high × floor) it is lowered instead.
        if lat > base * self.high:
            self._gain = max(self.min_gain, self._gain / 1.25)
            self._probe_left = 0
            self._clamp(min(self.window_bytes, bdp * self._gain))
            return
        if self._probe_left > 0:
            self._probe_left -= 1
            if self._probe_left == 0 and rate < self._probe_from_rate * 1.05:
                self._gain = max(self.min_gain, self._gain / 1.25)  # no gain from more in flight
        else:
            self._cycle += 1
            if self._cycle % self.probe_every == 0 and self._gain < self.max_gain and self.window_bytes < self.max_bytes:
                recent = [r for _, r in list(self._rates)[-4:-1]] or [rate]
                self._probe_from_rate = sum(recent) / len(recent)
                self._gain = min(self.max_gain, self._gain * 1.25)
                self._probe_left = self.probe_rounds
        self._clamp(bdp * self._gain)

    def __repr__(self) -> str:
        return (
            f"<AdaptiveWindow {self.state.value} window={self.window_bytes >> 20} MiB"
            f" inflight={self.inflight_bytes >> 20} MiB/{self.inflight_requests} req>"
        )


class TokenBucket:
    """Token bucket over bytes: `rate` bytes/s, at most `burst` banked. rate ≤ 0 = unlimited.

    `reserve(n, now)` takes n tokens (the balance may go negative) and returns how long the
    caller must wait before sending; the async wrapper in the scheduler sleeps that long.
    """

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0):
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.tokens = self.burst
        self.stamp = now
        self.taken = 0  # total bytes reserved (for tests / metrics)

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def reserve(self, n: int, now: float) -> float:
        self.taken += n
        if self.unlimited:
            return 0.0
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def refund(self, n: int) -> None:
        self.taken -= n
        if not self.unlimited:
            self.tokens = min(self.burst, self.tokens + n)
