"""OpenMP spin policy on a shared machine: torch's 2-thread matmuls with libgomp's default spin, with the project's
`GOMP_SPINCOUNT=1000` (services/vita/__init__.py), and with one thread, on an idle machine and while two CPU-bound
loops run, side by side in one run.

    python benchmarks/openmp_spin.py            # prints the table and appends it to BENCHMARKS.md
    python benchmarks/openmp_spin.py --no-write

Each cell runs in a fresh interpreter (libgomp reads its environment once, when torch loads it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a, b = torch.randn({n}, {n}), torch.randn({n}, {n})
for _ in range(50):
    a @ b
t, k = time.perf_counter(), 0
while time.perf_counter() - t < {seconds}:
    for _ in range(20):
        a @ b
    k += 20
print(k / (time.perf_counter() - t))
"""
POLICIES = {  # name: (threads, extra environment)
    "libgomp default spin, 2 threads": (2, {}),
    "GOMP_SPINCOUNT=1000, 2 threads (the project's)": (2, {"GOMP_SPINCOUNT": "1000"}),
    "OMP_WAIT_POLICY=PASSIVE, 2 threads": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 thread": (1, {}),
}


def rate(threads: int, env: dict[str, str], args: argparse.Namespace) -> float:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = WORK.format(n=args.size, seconds=args.seconds)
    out = subprocess.run([sys.executable, "-c", code, str(threads)], env={**base, **env}, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip())


def burners(n: int) -> list[subprocess.Popen]:
    """`n` CPU-bound loops in their own session (like `yes > /dev/null &` typed in another terminal)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="square matmul size")
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per cell")
    p.add_argument("--loops", type=int, default=2, help="CPU-bound loops in the loaded column")
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)

    idle = {name: rate(t, env, args) for name, (t, env) in POLICIES.items()}
    loops = burners(args.loops)
    try:
        time.sleep(1.0)
        loaded = {name: rate(t, env, args) for name, (t, env) in POLICIES.items()}
    finally:
        for b in loops:
            b.kill()
    lines = [f"torch {args.size}x{args.size} fp32 matmuls per second, {os.cpu_count()} cores; loaded: "
             f"{args.loops} CPU-bound Python loops in another session", "",
             f"| policy | idle | loaded ({args.loops} loops) | loaded / idle |", "|---|---|---|---|"]
    lines += [f"| {name} | {idle[name]:,.0f} | {loaded[name]:,.0f} | {loaded[name] / idle[name]:.2f}x |"
              for name in POLICIES]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with args.output.open("a") as f:
            f.write(f"\n## OpenMP spin under load ({stamp})\n\n`python benchmarks/openmp_spin.py`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
