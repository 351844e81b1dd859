"""Opt-in heap tracing (`--heap-trace-s`): tells a leak from warm-up when a process's RSS grows.

RSS alone cannot: the allocator keeps freed memory, caches fill once, and a leak looks the same for a while. With
tracing on, tracemalloc records where every live Python block was allocated; every `interval_s` a thread takes a
snapshot (after a full garbage collection, so only what is really held counts) and logs one "heap growth" line:
the Python heap since the first snapshot (the baseline, taken one interval after start, i.e. after warm-up) and
since the previous one, the allocation sites that grew most, and the object types whose live count grew most (a
per-session object that is never freed shows up there by name, with the count of sessions it leaked).

Costly (tracemalloc slows allocation and holds a traceback per block), so it is a debugging switch, off by default.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import functools
import gc
import logging
import threading
import time
import tracemalloc

log = logging.getLogger(__name__)

_IGNORED = (tracemalloc.__file__, "<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>",
            "<unknown>")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2() -> ctypes._CFuncPtr | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


def malloc_info() -> tuple[int, int] | None:
    """(bytes in use, bytes free but kept) by the C allocator over all its arenas; None without glibc's mallinfo2.

    Native memory counts (torch's CPU tensors, numpy arrays, grpc) and Python objects over 512 bytes (smaller ones
    live in Python's own arenas): RSS that grows while "in use" stays flat is memory the allocator keeps for reuse
    (fragmentation), not a leak.
    """
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return info.uordblks + info.hblkhd, info.fordblks


def start_heap_trace(interval_s: float, *, top: int = 10, frames: int = 6) -> threading.Thread | None:
    """Trace the heap and log its growth every `interval_s` seconds from a daemon thread; 0 leaves it off."""
    if interval_s <= 0:
        return None
    tracemalloc.start(frames)
    thread = threading.Thread(target=_run, args=(interval_s, top), name="heap-trace", daemon=True)
    thread.start()
    return thread


def _run(interval_s: float, top: int) -> None:
    baseline = previous = None
    baseline_types: collections.Counter[str] = collections.Counter()
    while True:  # as long as the process
        time.sleep(interval_s)
        snapshot, types = take_snapshot(), type_counts()
        if baseline is None:
            baseline, baseline_types = snapshot, types
        log.info("heap growth", extra=heap_growth(baseline, previous or baseline, snapshot, baseline_types, types,
                                                  top=top))
        previous = snapshot


def take_snapshot() -> tracemalloc.Snapshot:
    """The live Python blocks, after a full collection; tracemalloc's and the import system's own left out."""
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, name) for name in _IGNORED])


def type_counts() -> collections.Counter[str]:
    """Live objects tracked by the garbage collector, by type name (containers: dicts, instances, tasks...)."""
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def heap_growth(baseline: tracemalloc.Snapshot, previous: tracemalloc.Snapshot, snapshot: tracemalloc.Snapshot,
                baseline_types: collections.Counter[str], types: collections.Counter[str], *,
                top: int = 10) -> dict[str, object]:
    """The fields of one "heap growth" log line (MiB, KiB and counts; sites as `file:line < caller:line ...`)."""
    def total(s: tracemalloc.Snapshot) -> int:
        return sum(stat.size for stat in s.statistics("filename"))

    grown = [d for d in snapshot.compare_to(baseline, "traceback") if d.size_diff > 0][:top]
    types_grown = sorted(((n, types[n] - baseline_types[n]) for n in types), key=lambda kv: -kv[1])[:top]
    native = malloc_info()
    return {
        "heap_mib": round(total(snapshot) / 2**20, 2),
        "malloc_in_use_mib": round(native[0] / 2**20, 1) if native else None,
        "malloc_free_mib": round(native[1] / 2**20, 1) if native else None,
        "since_baseline_kib": round((total(snapshot) - total(baseline)) / 1024, 1),
        "since_previous_kib": round((total(snapshot) - total(previous)) / 1024, 1),
        "sites": [{"kib": round(d.size_diff / 1024, 1), "blocks": d.count_diff,
                   "where": " < ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}"
                                       for f in reversed(d.traceback))} for d in grown],
        "types": {name: n for name, n in types_grown if n > 0},
    }
