"""Denormal floats in training: `vita pretrain-vision` (the vision stand-in of `make train-tiny`) with denormals
computed as the CPU does by default, and flushed to zero as every training process now does
(`vita.training.cpu.configure_cpu`), side by side in one run.

    python benchmarks/denormals.py            # prints the table and appends it to BENCHMARKS.md
    python benchmarks/denormals.py --no-write --steps 20 --pictures 64

Each variant runs in a fresh interpreter (the flush is a process-wide CPU setting); "computed" replaces
`configure_cpu` in `vita.training.vision_pretrain` by what it did before (threads only). The stand-in's one-cycle
schedule makes its later steps the slow ones where denormals appear, so steps/s is given for the first and the last
fifth of the run, and the held-out probe of both (`probe.json`) shows whether flushing changed what was learnt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from llm_decode import cpu_name  # noqa: E402  (a sibling script)

CHILD = """
import json, sys, torch
from pathlib import Path
from vita.training import vision_pretrain as vp
flush, steps, pictures, threads, out = sys.argv[1] == "flushed", int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
if not flush:
    vp.configure_cpu = lambda n: torch.set_num_threads(n)  # the setting before configure_cpu
config = vp.VisionPretrainConfig(steps=steps, pictures=pictures, threads=threads, log_every=max(1, steps // 5))
summary = vp.pretrain_vision_encoder(config, out, progress=False, overwrite=True)
log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
print(json.dumps({"train_s": summary["train_s"] - summary["render_s"], "log": log, "probe": summary["heldout_accuracy"],
                  "flushing": bool((torch.tensor([1e-39]) * 1.0).item() == 0.0)}))
"""
VARIANTS = ("computed", "flushed")


def run_variant(name: str, args: argparse.Namespace, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, name, str(args.steps), str(args.pictures), str(args.threads),
                           str(out)], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log = result["log"]  # five entries: the mean loss and seconds since the start at each fifth of the run
    fifth = args.steps / len(log)
    result["first_rate"] = fifth / (log[1]["elapsed_s"] - log[0]["elapsed_s"]) if len(log) > 2 else float("nan")
    result["last_rate"] = fifth / (log[-1]["elapsed_s"] - log[-2]["elapsed_s"]) if len(log) > 2 else float("nan")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="stand-in steps (the recipe's 1,100)")
    p.add_argument("--pictures", type=int, default=2000, help="pictures rendered once (the recipe's 8,000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_variant(name, args, Path(tmp) / name) for name in VARIANTS}
    computed, flushed = results["computed"], results["flushed"]
    lines = [f"`vita pretrain-vision` at {args.steps} steps of 32 pictures ({args.pictures} rendered), "
             f"{args.threads} threads, {cpu_name()}", "",
             "| denormals | flushing in effect | training + probe s | steps/s, 2nd fifth | steps/s, last fifth | held-out probe |",
             "|---|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {r['flushing']} | {r['train_s']:.1f} | {r['first_rate']:.2f} | {r['last_rate']:.2f} | "
              f"{json.dumps(r['probe'])} |" for name, r in results.items()]
    lines += ["", f"computed / flushed training time: {computed['train_s'] / flushed['train_s']:.2f}x; "
                  f"probes identical: {computed['probe'] == flushed['probe']}"]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with args.output.open("a") as f:
            f.write(f"\n## Denormal floats in training ({stamp})\n\n`python benchmarks/denormals.py`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
