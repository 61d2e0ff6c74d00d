"""Latency histograms cheap enough for the broker's per-request path. Pure.

Buckets are powers of two of microseconds (1 us, 2 us, ... 2**25 us = 33.5 s, then +Inf), so the
bucket of a duration is one ``bit_length()``: about 0.1 us per observation, against about 1 us for a
bisect into arbitrary bounds or for prometheus_client's own Histogram.observe.
"""

from __future__ import annotations

from typing import Any, Final

N_BUCKETS: Final = 27  # 2**0 .. 2**25 us, and +Inf
BOUNDS_S: Final = tuple((2**i) / 1e6 for i in range(N_BUCKETS - 1))  # upper bounds of the finite buckets


class Hist:
    """Counts of durations per power-of-two bucket, their sum and count."""

    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * N_BUCKETS
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        us = int(seconds * 1e6)
        i = (us - 1).bit_length() if us > 1 else 0  # smallest i with us <= 2**i
        self.counts[i if i < N_BUCKETS else N_BUCKETS - 1] += 1
        self.total += seconds
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        """Cumulative bucket counts (Prometheus ``le`` semantics), sum and count."""
        cum = []
        run = 0
        for c in self.counts:
            run += c
            cum.append(run)
        return {"bounds_s": list(BOUNDS_S), "cumulative": cum, "sum_s": self.total, "count": self.count}
