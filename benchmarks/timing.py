"""The one timing loop the benchmarks share."""

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], calls: int) -> float:
    """Median seconds of `calls` calls of fn() after one warm-up (compiling) call. fn must block
    until its work is done (jax.block_until_ready), or only the dispatch is timed."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
