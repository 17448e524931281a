"""Timing helpers: nanosecond samples, percentiles, and interleaved rounds.

Contenders are measured in alternating rounds (the order rotates every round), so a burst of
load from elsewhere on the machine hits all of them alike and does not flip a ratio.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter_ns
from typing import TypeVar

Batch = Callable[[], list[int]]  # runs one batch of operations, returns one sample (ns) per op
K = TypeVar("K")


def percentile(samples: list[int], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of nanosecond samples, in microseconds."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1] / 1000


@dataclass(frozen=True)
class Stats:
    """Summary of nanosecond samples, in microseconds."""

    n: int
    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, samples: list[int]) -> Stats:
        return cls(
            n=len(samples),
            p50=percentile(samples, 50),
            p99=percentile(samples, 99),
            mean=statistics.fmean(samples) / 1000,
        )

    @property
    def ops_per_s(self) -> float:
        """Sequential throughput: one op after the other."""
        return 1e6 / self.mean if self.mean else 0.0


def interleave(rounds: int, contenders: dict[K, Batch]) -> dict[K, list[int]]:
    """Run every contender's batch once per round, rotating the order; pool the samples."""
    names = list(contenders)
    samples: dict[K, list[int]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].extend(contenders[name]())
    return samples


def time_sync(op: Callable[[], object], n: int) -> list[int]:
    """Time ``n`` calls of ``op``, one sample each."""
    out = []
    for _ in range(n):
        t0 = perf_counter_ns()
        op()
        out.append(perf_counter_ns() - t0)
    return out


async def time_async(op: Callable[[], Awaitable[object]], n: int) -> list[int]:
    """Time ``n`` awaits of ``op()``, one sample each."""
    out = []
    for _ in range(n):
        t0 = perf_counter_ns()
        await op()
        out.append(perf_counter_ns() - t0)
    return out
