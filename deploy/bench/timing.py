"""The benchmarks' one way of timing things: wall time by ``time.perf_counter``."""

from __future__ import annotations

import time
from collections.abc import Callable


class Stopwatch:
    """Context manager: ``seconds`` is the wall time since entering, frozen on leaving."""

    def __enter__(self) -> Stopwatch:
        self.start, self.stop = time.perf_counter(), None
        return self

    def __exit__(self, *exc) -> None:
        self.stop = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (time.perf_counter() if self.stop is None else self.stop) - self.start


def rate(fn: Callable[[], int], seconds: float, warmup: bool = True) -> float:
    """Calls ``fn`` (which returns how many units it did) for about ``seconds``, after one warm-up call unless
    ``warmup`` is False; units/s."""
    if warmup:
        fn()
    done = 0
    with Stopwatch() as watch:
        while watch.seconds < seconds:
            done += fn()
    return done / watch.seconds


def ms_per_call(fn: Callable[[], object], calls: int, sync: Callable[[], None] | None = None) -> float:
    """Wall time of one block of ``calls`` calls of ``fn`` (then ``sync()``, e.g. a CUDA synchronise), in ms per
    call."""
    with Stopwatch() as watch:
        for _ in range(calls):
            fn()
        if sync is not None:
            sync()
    return watch.seconds / calls * 1e3
