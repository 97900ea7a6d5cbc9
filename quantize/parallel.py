"""Thread-level parallelism for calibration: several ONNX Runtime runs at once.

Each run keeps its own intra-op thread count (one by default), so its floating-point results never depend
on how many workers there are; the work is split between runs instead (images in the statistics passes,
candidate models in the sensitivity analysis). ONNX Runtime and the large numpy loops release the GIL,
which is what lets Python threads use several cores here. Results are combined either in input order
(:func:`map_ordered`) or through order-independent reductions (integer sums, max/min) of per-worker
state (:func:`consume`), so every worker count gives byte-identical outputs.

Callers give every worker a session of its own, built without ONNX Runtime's memory pattern: measured
on mb3, concurrent runs of one session, and pattern-planned runs off the main thread, re-faulted tens
of MB per run, which cost more system time than the second core gained.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["consume", "default_workers", "map_ordered"]

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")

_STOP = object()


def default_workers() -> int:
    """The cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def map_ordered(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``fn`` over ``items`` on up to ``workers`` threads; results come back in input order."""
    if workers <= 1 or len(items) <= 1:
        yield from (fn(item) for item in items)
        return
    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="calib")
    try:
        yield from pool.map(fn, items)
    finally:  # after an error (or an abandoned iteration) the items not started yet are dropped
        pool.shutdown(wait=True, cancel_futures=True)


def consume(items: Iterable[T], work: Callable[[T, S], None], states: Sequence[S]) -> None:
    """Apply ``work(item, state)`` to every item, one worker thread per state.

    Items are produced on the calling thread (image decoding stays streaming) and handed over through a
    queue as long as the worker count, so at most about twice ``len(states)`` items exist at once: memory
    stays flat in the number of items. A worker only ever touches its own state, which the caller merges
    afterwards. The first error stops the run and is raised here.
    """
    if len(states) <= 1:
        state = states[0]
        for item in items:
            work(item, state)
        return
    pending: queue.Queue[object] = queue.Queue(maxsize=len(states))
    errors: list[BaseException] = []

    def loop(state: S) -> None:
        while True:
            item = pending.get()
            if item is _STOP:
                return
            if errors:
                continue  # keep draining so the producer never blocks on a dead pool
            try:
                work(item, state)  # type: ignore[arg-type]
            except BaseException as exc:  # re-raised on the calling thread
                errors.append(exc)

    threads = [threading.Thread(target=loop, args=(state,), name=f"calib-{i}", daemon=True)
               for i, state in enumerate(states)]
    for thread in threads:
        thread.start()
    try:
        for item in items:
            if errors:
                break
            pending.put(item)
    finally:
        for _ in threads:
            pending.put(_STOP)
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
