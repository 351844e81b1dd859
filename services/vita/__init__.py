"""VITA-style interactive omni-modal LLM: model core, processing, services and training."""

import os

__version__ = "0.1.0"

# OpenMP threads (torch's intra-op pool, GNU libgomp in the CPU wheels) spin 300,000 times at every barrier before
# sleeping. When the cores are shared with other busy processes, a spinning thread holds a core its partner needs and
# every parallel region waits out a scheduler slice: on the project's 2-core machine with two CPU-bound loops
# running, 2-thread matmuls ran 2-20x slower than with 1,000 spins (the duplex fine-tune: 15 s a step instead of
# 0.7), while 1,000 spins keep the idle speed (BENCHMARKS.md "OpenMP spin under load", benchmarks/openmp_spin.py).
# libgomp reads it once, when torch loads it, so it is set on the first import of this package; a value already in
# the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
