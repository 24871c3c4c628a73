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
  such growth, or latency above `high` × floor, it leaves: with `latency_probes` through
  PROBE_LATENCY (BBR's Drain: the floor seen so far was measured with the initial burst
  queued), without them straight to STEADY with an estimated floor (_steady_without_probe).
* PROBE_LATENCY (`latency_probes` only) — window = `min_bytes` until one request sent into the drained pipe
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

Link-sized requests (`auto_chunk`, the scheduler's default): requests start at 1 MiB (8 in
flight) and the request size is then chosen from the link: the power of two nearest to
rate × RTT (RTT = the minimum time to first byte the scheduler reports, else the chunk
floor), within [min_chunk, max_chunk]; at the end of STARTUP, and in STEADY when the wanted
size has been off by 2× for 3 rounds (each change goes through PROBE_LATENCY, since the floor
depends on the size). `min_bytes` is then one request, and STEADY adds one request of slack
to gain × BDP (with a handful of requests in flight, each completion leaves a one-RTT hole).
So on a 6.25 MB/s, 200 ms link requests are 1 MiB and ~3 BDP (4 requests) are in flight; on
50 MB/s they are 4 MiB (the cap).

Scaled admission: the scheduler admits against window × `fg_yield` while device reads run
and says so (`set_scale`). A round whose requests did not queue (median ≤ `high` × floor)
under a scaled window credits the rate the whole window would have had (≤ 2×), so window ×
scale, not the window, ends up sized to the path; otherwise a steady stream of device reads
shrinks the window round after round.

Bounds: `min_bytes` ≤ window ≤ `max_bytes`, requests ≤ `max_requests`. Foreground requests
are outside the window (they always start at once) but are a signal too: one slower than
`fg_high` × the best foreground latency (and ≥ 50 ms more) means the background queues in
front of device reads: the window shrinks by 30 % (at most once per round).

FixedWindow is the non-adaptive version (benchmarks, and `--mode upstream`: one request).
"""

from __future__ import annotations

import enum
import math
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

    def on_complete(self, now: float, nbytes: int, latency: float, ok: bool = True,
                    ttfb: float | None = None) -> None:
        self.inflight_bytes -= nbytes
        self.inflight_requests -= 1

    def on_foreground(self, now: float, nbytes: int, latency: float, ttfb: float | None = None) -> None:
        pass

    def __repr__(self) -> str:
        return f"<FixedWindow {self.inflight_requests}/{self.max_requests} req>"


def _pow2_near(x: float) -> int:
    """The power of two nearest to x (in log scale)."""
    return 1 << max(0, round(math.log2(x))) if x >= 1 else 1


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
        auto_chunk: bool = False,
        min_chunk: int = 256 << 10,
        max_chunk: int = 4 << 20,
        chunk_bdp_fraction: float = 1.0,
        latency_probes: bool = True,
        queue_signal: str = "request",
    ):
        # auto_chunk: the request size (`chunk`, read by the filler before each request)
        # follows the link: a power of two near `chunk_bdp_fraction` × rate × RTT, in
        # [min_chunk, max_chunk]; RTT is the minimum time to first byte when the caller
        # reports it (on_complete(ttfb=...)), else the chunk latency floor.
        self.auto_chunk = auto_chunk
        # latency_probes=False (the scheduler's default): never empty the pipe to measure the
        # latency floor; see _steady_without_probe
        self.latency_probes = latency_probes
        # What STEADY reads as "the surplus only queues" (see _steady_by_first_byte):
        # "request": a request's whole latency against the chunk floor (the default: it also
        # keeps few fill flows beside device reads that get a fair share each);
        # "first_byte": the time to a request's first byte against the RTT floor (`fetch`).
        if queue_signal not in ("request", "first_byte"):
            raise ValueError(f"queue_signal must be 'request' or 'first_byte', not {queue_signal!r}")
        self.queue_signal = queue_signal
        self.min_chunk, self.max_chunk = min_chunk, max(min_chunk, max_chunk)
        self.chunk_bdp_fraction = chunk_bdp_fraction
        self.chunk_changes = 0
        self._chunk_votes = 0
        self._rtt: float | None = None  # minimum time to first byte seen
        self._rtt_stamp = 0.0
        self.chunk = chunk_bytes
        self._scales: deque[tuple[float, float]] = deque()  # (since, scale) of the window
        self._rate_span = 1.0
        self._explicit_min = min_bytes
        self.min_bytes = self._min_for(chunk_bytes)
        super().__init__(max_requests, initial_bytes if initial_bytes is not None else 8 * chunk_bytes)
        self.max_bytes = max_bytes
        self.window_bytes = min(max(self.window_bytes, self.min_bytes), max_bytes)
        self.gain, self.high, self.fg_high = gain, high, fg_high
        self._gain = gain
        self.min_gain, self.max_gain = min(1.25, gain), max(3.0, gain)
        if auto_chunk:
            # link-sized requests are few and large: hold at least 1.5 × BDP (the rig lost
            # ~15 % of its rate at 1.25, where the failed gain probes of noisy rounds leave it)
            self.min_gain = max(self.min_gain, min(1.5, gain))
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
        self._round_ttfb: list[float] = []
        self._probe_window = 0
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

    def _slack(self) -> int:
        # auto_chunk: one request of slack on top of gain × BDP. With a few large requests
        # (a slow link) the window is only a handful of requests, and each one that completes
        # leaves a hole of one RTT before its successor's first byte; without the slack the
        # pipe runs dry at times and the rate estimate (hence the window) ratchets down.
        return self.chunk if self.auto_chunk else 0

    def _min_for(self, chunk: int) -> int:
        if self._explicit_min is not None:
            return self._explicit_min
        # auto: one request (a fraction of the BDP, by the chunk rule); fixed chunk: 2 as before
        return chunk if self.auto_chunk else 2 * chunk

    @property
    def rtt(self) -> float | None:
        """Round-trip estimate: min time to first byte (or the chunk latency floor)."""
        return self._rtt if self._rtt is not None else self._base

    def _chunk_want(self) -> float | None:
        rtt = self.rtt
        if not self.max_rate or rtt is None:
            return None
        return self.max_rate * rtt * self.chunk_bdp_fraction

    def chunk_target(self) -> int:
        """The request size the link justifies now (auto_chunk), see __init__."""
        want = self._chunk_want()
        if want is None:
            return self.chunk
        return int(min(self.max_chunk, max(self.min_chunk, _pow2_near(want))))

    def _set_chunk(self, chunk: int) -> None:
        if chunk != self.chunk:
            self.chunk = chunk
            self.chunk_changes += 1
            self.min_bytes = self._min_for(chunk)
        self._chunk_votes = 0

    # --- events ---------------------------------------------------------------------------------
    def on_start(self, now: float, nbytes: int) -> None:
        if self._round_start is None:
            self._round_start = now
        if self._first_start is None:
            self._first_start = now
        super().on_start(now, nbytes)

    def on_complete(self, now: float, nbytes: int, latency: float, ok: bool = True,
                    ttfb: float | None = None) -> None:
        super().on_complete(now, nbytes, latency, ok)
        if not ok:
            return
        if ttfb is not None and ttfb > 0:
            if self._rtt is None or ttfb <= self._rtt or now - self._rtt_stamp > self.base_window_s:
                self._rtt, self._rtt_stamp = ttfb, now
        self._deliv.append((now, nbytes))
        if nbytes >= self.chunk // 2:
            self._round_lat.append(latency)
            if ttfb is not None and ttfb > 0:
                self._round_ttfb.append(ttfb)
            self._srtt = latency if self._srtt is None else 0.875 * self._srtt + 0.125 * latency
            if self.state is WindowState.PROBE_LATENCY:
                if now - latency >= self._probe_start:  # sent into the drained pipe: a clean sample
                    self._base, self._base_stamp = latency, now
                    self.state = WindowState.STEADY
                    if self._saved_window is None:  # end of STARTUP
                        self._clamp(self.max_rate * latency * self._gain + self._slack())
                    else:
                        self._clamp(self._saved_window)
                    self._round_start, self._round_lat, self._round_ttfb = now, [], []
                return
            if self._base is None or latency <= self._base:
                self._base, self._base_stamp = latency, now
            elif self.latency_probes and self.state is WindowState.STEADY and now - self._base_stamp > self.base_window_s:
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

    def on_foreground(self, now: float, nbytes: int, latency: float, ttfb: float | None = None) -> None:
        # A foreground GET's time to its first byte, when known: the queue in front of it,
        # whatever its size (a GET from the reader's page to the end of its refill unit may be
        # a few KiB or the whole unit).
        if ttfb is not None:
            latency = ttfb
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

    def _steady_without_probe(self, now: float, lat: float) -> None:
        """To STEADY without a latency probe (end of STARTUP, or a new request size). A probe idles most of the pipe for a round
        trip or more (a second of a 7 s transfer on a 200 ms link), which buys nothing when no
        device read shares the link. The floor is estimated instead: a request through an
        empty pipe takes about one RTT plus its own bytes at the measured rate; the window
        keeps what STARTUP reached until STEADY's latency rule trims the queue."""
        rtt = self._rtt if self._rtt is not None else lat
        # at least the round's median: one stream's rate is unknown (a per-stream cap would
        # make RTT + chunk / rate an underestimate, and the window would shrink below the
        # BDP); a queued estimate only errs towards more in flight, and falls as STEADY sees
        # faster requests
        self._base = max(min(lat, self._base or lat), rtt + self.chunk / max(self.max_rate, 1.0))
        self._base_stamp = now
        self.state = WindowState.STEADY
        self._clamp(max(self.window_bytes, self.max_rate * self._base * self._gain + self._slack()))

    def _steady_by_first_byte(self, rate: float, ttfb: float) -> None:
        """STEADY for a bulk fill (queue_signal="first_byte"), one round.

        A request's whole latency grows with the bytes it shares the link with, and the floor
        it is compared with, the fastest request seen, falls whenever fewer bytes happened to
        be in flight; sized from them, `fetch`'s window shrank round after round on the 200 ms
        rig (64 → 10 MiB, 48 → 16 MB/s on a 1 GiB layer) until a few large requests could not
        keep the link full. The time to a request's first byte grows only with the queue in
        front of the bottleneck, so here it alone shrinks the window (by 1/1.25 while the
        round's median first byte takes more than `high` × the RTT floor); otherwise the
        window stays, and every `probe_every` rounds it is tried 25 % larger for
        `probe_rounds` rounds (up to STARTUP's cap) and kept only if the delivery rate rose
        ≥ 5 %."""
        if ttfb > self.high * self._rtt:
            self._probe_left = 0
            self._clamp(self.window_bytes / 1.25)
            return
        # never probe past 3 × (BDP + a request), STARTUP's own cap: a noisy round that looks
        # 5 % faster would otherwise ratchet the window (and the buffers) up to max_bytes
        cap = 3 * (self.max_rate * self._rtt + self.chunk)
        step = self._hill_climb(rate, room=self.window_bytes < min(self.max_bytes, cap))
        if step > 0:
            self._probe_window = self.window_bytes
            self._clamp(self.window_bytes * 1.25)
        elif step < 0:
            self._clamp(min(self.window_bytes, self._probe_window))

    def _hill_climb(self, rate: float, room: bool) -> int:
        """One round of the throughput hill-climb shared by both STEADY rules: 1 when a probe
        starts now (every `probe_every` rounds, if there is `room`; it lasts `probe_rounds`
        rounds), -1 when one ends without the delivery rate having risen ≥ 5 % (take it back),
        else 0."""
        if self._probe_left > 0:
            self._probe_left -= 1
            return -1 if self._probe_left == 0 and rate < self._probe_from_rate * 1.05 else 0
        self._cycle += 1
        if self._cycle % self.probe_every or not room:
            return 0
        recent = [r for _, r in list(self._rates)[-4:-1]] or [rate]
        self._probe_from_rate = sum(recent) / len(recent)
        self._probe_left = self.probe_rounds
        return 1

    def _enter_probe(self, now: float, saved: int | None) -> None:
        self.state = WindowState.PROBE_LATENCY
        self._saved_window = saved
        self._probe_start = now
        self.window_bytes = self.min_bytes
        self.probes += 1

    def set_scale(self, now: float, scale: float) -> None:
        """The caller admits against window × scale from `now` (the scheduler's fg_yield
        while foreground transfers run). Remembered so the rate measured meanwhile is not
        mistaken for the path's: otherwise a steady stream of device reads makes the window
        shrink round after round (rate falls with the scaled window, the window follows the
        rate)."""
        if not self._scales or self._scales[-1][1] != scale:
            self._scales.append((now, scale))
            while len(self._scales) > 1 and self._scales[1][0] < now - 60.0:  # bounded history
                self._scales.popleft()

    def _mean_scale(self, now: float, span: float) -> float:
        t0 = now - span
        while len(self._scales) > 1 and self._scales[1][0] <= t0:
            self._scales.popleft()
        if not self._scales:
            return 1.0
        total = max(0.0, self._scales[0][0] - t0)  # before the first change: unscaled
        for i, (since, sc) in enumerate(self._scales):
            until = self._scales[i + 1][0] if i + 1 < len(self._scales) else now
            total += max(0.0, until - max(since, t0)) * sc
        return total / span if span > 0 else 1.0

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
        self._rate_span = span
        return sum(n for _, n in self._deliv) / span

    def _end_round(self, now: float) -> None:
        rate = self._delivery_rate(now)
        lats = sorted(self._round_lat)
        lat = lats[len(lats) // 2]
        ttfbs = sorted(self._round_ttfb)
        self._round_ttfb = []
        if self._scales and self._base is not None and lat <= self.high * self._base:
            # admission was scaled down (fg_yield) and requests did not queue (STEADY's own
            # criterion): the path had room, the lower rate is the scaled window's; credit
            # what the full window would have delivered (at most 2×), so window × scale, not
            # the window, ends up sized to the path. When they queued, it was full anyway.
            scale = self._mean_scale(now, self._rate_span)
            rate /= min(1.0, max(0.5, scale))
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
                    # (the cap uses the RTT when known: the first rounds' chunk latency is
                    # inflated by the initial burst itself)
                    cap = 3 * self.max_rate * (self._rtt + self.chunk / max(self.max_rate, 1.0)) if self._rtt else 3 * bdp
                    self._clamp(min(self.window_bytes * 2, max(cap, self.window_bytes)))
                    return
            else:
                self._stalls += 1
            # (latency only counts from round 3: the first rounds pay connection set-up)
            if self._stalls >= 3 or (lat > base * self.high and self.rounds >= 3):
                # leave STARTUP through a latency probe (BBR's Drain): the floor seen so far
                # was measured with the initial burst queued, so drain and measure it clean.
                # auto_chunk: the request size is chosen here, so the probe measures its floor
                if self.auto_chunk:
                    self._set_chunk(self.chunk_target())
                if not self.latency_probes:
                    self._steady_without_probe(now, lat)
                    return
                self._enter_probe(now, saved=None)
            return
        # STEADY: bandwidth-delay product of the request pipe times an adaptive gain. The gain
        # is hill-climbed on throughput: every `probe_every` rounds it is raised by 25 % for
        # `probe_rounds` rounds; kept if the delivery rate rose ≥ 5 %, else taken back. While
        # latency says the surplus only queues (> high × floor) it is lowered instead.
        if self.auto_chunk:
            # a different request size stays justified for 3 rounds: switch, and measure the
            # new size's floor (its latency differs) through a probe; the window is then
            # recomputed from it
            # (hysteresis: only when the wanted size is off by 2× or more)
            target, want = self.chunk_target(), self._chunk_want() or self.chunk
            off = target != self.chunk and (want >= 2 * self.chunk or want <= self.chunk / 2)
            self._chunk_votes = self._chunk_votes + 1 if off else 0
            if self._chunk_votes >= 3:
                self._set_chunk(target)
                if not self.latency_probes:
                    self._steady_without_probe(now, lat)
                    return
                self._enter_probe(now, saved=None)
                return
        if self.queue_signal == "first_byte" and ttfbs and self._rtt:
            self._steady_by_first_byte(rate, ttfbs[len(ttfbs) // 2])
            return
        if lat > base * self.high:
            self._gain = max(self.min_gain, self._gain / 1.25)
            self._probe_left = 0
            self._clamp(min(self.window_bytes, bdp * self._gain))
            return
        step = self._hill_climb(rate, room=self._gain < self.max_gain and self.window_bytes < self.max_bytes)
        if step > 0:
            self._gain = min(self.max_gain, self._gain * 1.25)
        elif step < 0:
            self._gain = max(self.min_gain, self._gain / 1.25)  # no gain from more in flight
        self._clamp(bdp * self._gain + self._slack())

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
