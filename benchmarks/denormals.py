"""Denormal floats in training: `vita pretrain-vision` (the vision stand-in of `make train-tiny`) with denormals
computed as the CPU does by default, and flushed to zero as the command now does
(`vita.training.cpu.denormals_flushed`), side by side in one run.

    python benchmarks/denormals.py            # prints the table and appends it to BENCHMARKS.md
    python benchmarks/denormals.py --no-write --steps 20 --pictures 64

Each variant runs in a fresh interpreter: "flushed" runs the command (`vita.cli.main`), "computed" calls
`pretrain_vision_encoder` as the command did before; each row says whether every step ran with denormals flushed.
Denormals appear as the stand-in converges, so steps/s is given for its second and its last 50 steps, and the
held-out probe of both (`probe.json`) shows whether flushing changed what was learnt.
"""

from __future__ import annotations

import argparse
import itertools
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
import contextlib, io, json, sys
from pathlib import Path
from vita import cli
from vita.training import vision_pretrain as vp
from vita.training.cpu import flushing_denormals
variant, steps, pictures, threads, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5])
inner, seen = vp.train_loop, []

def loop(params, batch_loss, **kwargs):  # records, at every step, whether denormals are flushed
    def recorded(step):
        seen.append(flushing_denormals())
        return batch_loss(step)
    return inner(params, recorded, **kwargs)

vp.train_loop = loop
if variant == "flushed":  # the command as `make train-tiny` runs it
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["pretrain-vision", "--output", str(out), "--steps", steps, "--pictures", pictures,
                         "--threads", threads, "--overwrite", "--no-progress"]) == 0
else:  # the same function, called as the command called it before
    config = vp.VisionPretrainConfig(steps=int(steps), pictures=int(pictures), threads=int(threads))
    vp.pretrain_vision_encoder(config, out, progress=False, overwrite=True)
summary = json.loads((out / "config.json").read_text())["pretraining"]
log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
print(json.dumps({"train_s": summary["train_s"] - summary["render_s"], "log": log, "probe": summary["heldout_accuracy"],
                  "flushing": bool(seen) and all(seen)}))
"""
VARIANTS = ("computed", "flushed")


def run_variant(name: str, args: argparse.Namespace, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, name, str(args.steps), str(args.pictures), str(args.threads),
                           str(out)], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log = result["log"]  # every 50 steps: the mean loss and the seconds since the start
    rates = [(b["step"] - a["step"]) / (b["elapsed_s"] - a["elapsed_s"]) for a, b in itertools.pairwise(log)]
    result["first_rate"] = rates[0] if rates else float("nan")
    result["last_rate"] = rates[-1] if rates else float("nan")
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
             "| denormals | flushing in effect | training + probe s | steps/s, steps 51-100 | steps/s, last 50 steps | held-out probe |",
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
