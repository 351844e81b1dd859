"""Denormal floats flushed to zero for the stand-in pretraining commands (`denormals_flushed`).

Why flush: as a run converges some values fall below float32's normal range (1.2e-38), and on the Intel x86 cores
measured every arithmetic operation on such a denormal takes a slow microcode path. On a 2-core Xeon (CPU family 6,
model 207) `vita pretrain-vision` slowed from 4.0 to 1.8 steps/s over a 400-step run and took 590 s for the 1,100
steps an AMD EPYC ran in 224 s; with denormals flushed it keeps 5.5 steps/s (277 s), and at 400 steps its held-out
probe is identical (BENCHMARKS.md, "Denormal floats in training"; `benchmarks/denormals.py`). Flushing changes a
result only through values below 1.2e-38, the way another summation order does: over 1,100 steps the stand-in's
weights are not bit-identical, the run is another draw of the same recipe. The LLM stages (`vita train`) measured
no faster or slower with it, so they are left as they were.

Where: at a process's entry, before torch's first parallel work. The flags are per thread (x86's MXCSR) and torch's
worker threads copy them from the thread that creates them, so flushing after the pool exists leaves the workers
computing denormals (measured: 1.04x instead of 1.92x). The caller's setting comes back afterwards, because the
flags also change Python's own float arithmetic in that thread: a command run in-process by a longer-lived one (a
test session) must leave it as it found it (hypothesis, for one, refuses to draw floats while subnormals are
flushed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DENORMAL = 1e-39  # below float32's smallest normal number, 1.18e-38


def flushing_denormals() -> bool:
    """Whether float32 denormals are flushed to zero in this thread now (a denormal times 1.0 gives 0)."""
    return (torch.tensor([DENORMAL]) * 1.0).item() == 0.0


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """Denormal floats flushed to zero inside (`torch.set_flush_denormal`: the FTZ and DAZ flags on x86; a no-op
    elsewhere); the caller's setting is restored on exit, also when the body raises."""
    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


__all__ = ["denormals_flushed", "flushing_denormals"]
