"""Hypothesis budget for the fuzz suite.

Two profiles, registered here:

- "ci" (default): a fixed number of examples, derandomized (the same inputs every run, so a
  CI failure reproduces and the suite's run time is stable), no deadline, no example database.
- "long": a soak on demand, `TCMU_OBD_FUZZ=long`; randomized, many more examples.

Each test asks for a share of the budget with `tests.fuzz.mutate.fuzz_settings(n)`: `n`
examples under "ci", `n * LONG_FACTOR` under "long". The profile is applied per test, not
loaded globally, so the rest of the suite keeps its own hypothesis settings.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("long", max_examples=10_000, derandomize=False, deadline=None, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
