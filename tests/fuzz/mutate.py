"""Mutation strategies over real, valid inputs, and the assertions every fuzz test makes.

A fuzz case starts from bytes a real writer produced (a shared fixture or the project's own
writer) and damages them the ways storage and networks do, plus the way an attacker would:
bit flips, byte overwrites, truncation, extension with garbage, and extreme integers written
over the length/count/offset fields of the format (`fields`). Mutations that land on named
fields find far more than uniformly random bytes, which almost always fail the magic check.
"""

from __future__ import annotations

import contextlib
import os
import re
import tracemalloc
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from hypothesis import event, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

PROFILE = os.environ.get("TCMU_OBD_FUZZ", "ci") or "ci"
LONG_FACTOR = 100

# Values that break arithmetic: zero, one, sign and width edges, "claims 2^40 entries".
EXTREMES = (0, 1, 2, 3, 7, 8, 255, 256, 511, 512, 4095, 4096, 0x7FFF, 0xFFFF, 0x10000,
            0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 50, (1 << 50) - 1,
            (1 << 55) - 1, 0x7FFFFFFFFFFFFFFF, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF)


def fuzz_settings(examples: int) -> settings:
    """The active profile ("ci" unless TCMU_OBD_FUZZ says otherwise) with this test's share."""
    if PROFILE not in ("ci", "long"):
        raise ValueError(f"TCMU_OBD_FUZZ={PROFILE!r}: want ci or long")
    n = examples if PROFILE == "ci" else examples * LONG_FACTOR
    return settings(settings.get_profile(PROFILE), max_examples=n)


# A field: (byte offset, width in bytes, byte order "<" or ">").
Field = tuple[int, int, str]


def _put(buf: bytearray, f: Field, value: int) -> None:
    off, width, order = f
    if off + width > len(buf):
        return
    value &= (1 << (8 * width)) - 1
    buf[off:off + width] = value.to_bytes(width, "little" if order == "<" else "big")


@st.composite
def _one_mutation(draw, size: int, fields: Sequence[Field], hot: Sequence[tuple[int, int]]):
    # Truncation and extension mostly just fail the size checks, so they are drawn less often.
    kinds = ["flip", "flip", "byte", "byte", "splice", "truncate", "extend"]
    if fields:
        kinds += ["field"] * 5
    kind = draw(st.sampled_from(kinds))
    # Positions: half the time inside a "hot" region (headers, index), else anywhere.
    def pos() -> int:
        if hot and draw(st.booleans()):
            lo, hi = draw(st.sampled_from(list(hot)))
            lo, hi = max(0, min(lo, size)), max(0, min(hi, size))
            if hi > lo:
                return draw(st.integers(lo, hi - 1))
        return draw(st.integers(0, max(size - 1, 0)))
    if kind == "flip":
        return ("flip", pos(), draw(st.integers(0, 7)))
    if kind == "byte":
        return ("byte", pos(), draw(st.integers(0, 255)))
    if kind == "truncate":
        return ("truncate", draw(st.integers(0, max(size - 1, 0))))
    if kind == "extend":
        return ("extend", draw(st.binary(min_size=1, max_size=64)))
    if kind == "splice":
        return ("splice", pos(), draw(st.binary(min_size=1, max_size=16)))
    f = draw(st.sampled_from(list(fields)))
    value = draw(st.sampled_from(EXTREMES) | st.integers(0, (1 << (8 * f[1])) - 1))
    delta = draw(st.sampled_from([0, 0, 0, 1, -1]))
    return ("field", f, value + delta)


def apply(seed: bytes, mutations: Iterable[tuple]) -> bytes:
    buf = bytearray(seed)
    for m in mutations:
        kind = m[0]
        if kind == "flip" and m[1] < len(buf):
            buf[m[1]] ^= 1 << m[2]
        elif kind == "byte" and m[1] < len(buf):
            buf[m[1]] = m[2]
        elif kind == "truncate":
            del buf[m[1]:]
        elif kind == "extend":
            buf += m[1]
        elif kind == "splice" and m[1] < len(buf):
            buf[m[1]:m[1] + len(m[2])] = m[2]
        elif kind == "field":
            _put(buf, m[1], m[2])
    return bytes(buf)


@dataclass(frozen=True)
class Seed:
    """A valid input and where its interesting bytes are."""

    data: bytes
    fields: Sequence[Field] = ()  # length/count/offset fields to overwrite with extremes
    hot: Sequence[tuple[int, int]] = ()  # [start, end) byte ranges mutated more often


@st.composite
def mutants(draw, seeds: Sequence[Seed | bytes], max_mutations: int = 4):
    """(seed index, mutated bytes): one of `seeds` with 1..max_mutations mutations applied."""
    i = draw(st.integers(0, len(seeds) - 1))
    seed = seeds[i] if isinstance(seeds[i], Seed) else Seed(seeds[i])
    muts = draw(st.lists(_one_mutation(len(seed.data), seed.fields, seed.hot), min_size=1,
                         max_size=max_mutations))
    return i, apply(seed.data, muts)


def u32le(off: int) -> Field:
    return (off, 4, "<")


def u64le(off: int) -> Field:
    return (off, 8, "<")


def be(off: int, width: int) -> Field:
    return (off, width, ">")


def only(allowed: tuple[type[BaseException], ...], fn: Callable, *args, **kw):
    """Call fn; return (result, None) or (None, the allowed error). Anything else propagates,
    which is the fuzz failure: a crash rather than a clear error."""
    try:
        return fn(*args, **kw), None
    except allowed as e:
        assert str(e), f"{type(e).__name__} without a message"
        # --hypothesis-show-statistics then shows which checks the mutations reach
        if not currently_in_test_context():
            return None, e
        text = re.sub(r"0x[0-9a-f]+|[0-9]+", "N", getattr(e, "message", None) or str(e))
        event(f"{type(e).__name__}: {text[:70]}")
        return None, e


@contextlib.contextmanager
def allocation_limit(limit: int):
    """Fail if the block allocates more than `limit` bytes at its peak (tracemalloc)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if started:
            tracemalloc.stop()
    assert peak - base <= limit, f"peak allocation {peak - base} bytes > {limit}"


