"""The CPU settings every training process applies before its first step: its thread count, and denormal floats
flushed to zero.

Why flush: as a run converges some values fall below float32's normal range (1.2e-38), and on the Intel x86 cores
measured every arithmetic operation on such a denormal takes a slow microcode path. On a 2-core Xeon (CPU family 6,
model 207) `vita pretrain-vision` slowed from 4.0 to 1.8 steps/s over a 400-step run and took 590 s for the 1,100
steps an AMD EPYC ran in 224 s; with denormals flushed it keeps 5.5 steps/s (277 s), and at 400 steps its held-out
probe is identical (BENCHMARKS.md, "Denormal floats in training"; `benchmarks/denormals.py`). Flushing changes a
result only through values below 1.2e-38, the way another summation order does: over 1,100 steps the stand-in's
weights are not bit-identical, the run is another draw of the same recipe. The LLM stages measured no faster or
slower with it.
"""

from __future__ import annotations

import torch


def configure_cpu(threads: int | None) -> None:
    """Sets torch's intra-op threads to `threads` (None or 0: torch's default) and flushes denormal floats to zero
    for this process (`torch.set_flush_denormal`: the FTZ and DAZ bits of x86's MXCSR; a no-op elsewhere)."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


__all__ = ["configure_cpu"]
