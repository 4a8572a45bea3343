"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time in seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    return best_of_interleaved({"fn": fn}, repeats)["fn"]


def best_of_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time in seconds of each function, the calls interleaved (a, b, c, a, b, c, ...) after one
    warm-up call each, so that drifts of the machine (other load, clocks) hit every function alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(values) for name, values in times.items()}
