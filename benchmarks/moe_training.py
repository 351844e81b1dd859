"""MoE experts in CPU training: the padded bmm (`MoEFeedForward.grouped`, what training used before) against
`F.grouped_mm` over the (token, expert) pairs sorted by expert (`MoEFeedForward.grouped_mm`, what it uses now), side
by side in one run.

    python benchmarks/moe_training.py            # part 1; prints the table and appends it to BENCHMARKS.md
    python benchmarks/moe_training.py --stage3 .artifacts/train-tiny --steps 60   # and part 2
    python benchmarks/moe_training.py --no-write --tokens 64 --repeats 1          # the quick check the tests run

1. One MoE layer of the tiny preset, forward and backward, on routing drawn with a chosen skew (the busiest expert's
   load over the mean: even, and about what the tiny stage 3 reaches, 2.0-2.4x); milliseconds are medians of
   `--repeats`, the two alternated, with the largest difference between their outputs and gradients.
2. (`--stage3 DIR`, a `make train-tiny` directory) `vita train --stage 3` from DIR's stage 2 for `--steps` steps in
   fresh interpreters, alternated twice; "padded" routes the unpadded path back to the padded bmm. Each row gives
   the stage's wall seconds, its final loss, and the padding factor (padded pairs over real pairs) its routing had.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from llm_decode import cpu_name  # noqa: E402  (a sibling script)

STAGE3_VARIANTS = ("padded", "grouped_mm")
CHILD = """
import json, sys
from pathlib import Path
import torch
from vita import cli
from vita.model import llm
variant, steps, out, init, threads = sys.argv[1:6]
pairs = {"real": 0, "padded": 0}
unpadded = llm.MoEFeedForward.grouped_mm

def grouped_mm(self, x, weights, experts):  # counts the padding the routing would need, then dispatches
    loads = torch.bincount(experts.flatten(), minlength=self.num_experts)
    pairs["real"] += int(loads.sum())
    pairs["padded"] += int(loads.max()) * self.num_experts
    return self.grouped(x, weights, experts) if variant == "padded" else unpadded(self, x, weights, experts)

llm.MoEFeedForward.grouped_mm = grouped_mm
code = cli.main(["train", "--stage", "3", "--config", "training/configs/stage3_multimodal_tiny.yaml",
                 "--set", f"init.model={init}", "--set", f"max_steps={steps}", "--set", f"output_dir={out}",
                 "--set", "save_every=1000000", "--set", "progress=false", "--set", f"threads={threads}"])
assert code == 0, code
summary = json.loads((Path(out) / "final" / "training.json").read_text())
print(json.dumps({"wall_s": summary["wall_s"], "final_loss": summary["final_loss"],
                  "padding": pairs["padded"] / max(1, pairs["real"])}))
"""


def moe_row(tokens: int, heavy: float, repeats: int, seed: int = 0) -> dict:
    """Part 1: both dispatches of one MoE layer on the same routing; expert 0 drawn `heavy` times as often."""
    from vita.model.config import VitaConfig
    from vita.model.llm import MoEFeedForward

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    moe = MoEFeedForward(VitaConfig.preset("tiny").llm)
    hidden = moe.w1.shape[-1]
    x = torch.randn(tokens, hidden, generator=gen)
    p = torch.ones(moe.num_experts)
    p[0] = heavy
    experts = torch.multinomial(p.expand(tokens, -1), moe.top_k, replacement=False, generator=gen)  # (N, k)
    logits = torch.randn(tokens, moe.top_k, generator=gen)
    grad = torch.randn(tokens, hidden, generator=gen)
    loads = torch.bincount(experts.flatten(), minlength=moe.num_experts).float()

    def step(dispatch: Callable) -> list[torch.Tensor]:
        moe.zero_grad()
        xx, ll = x.clone().requires_grad_(), logits.clone().requires_grad_()
        dispatch(xx, ll.softmax(-1), experts).backward(grad)
        return [xx.grad, ll.grad, moe.w1.grad.clone(), moe.w2.grad.clone(), moe.w3.grad.clone()]

    dispatches = {"padded": moe.grouped, "grouped_mm": moe.grouped_mm}
    padded, unpadded = (step(d) for d in dispatches.values())  # warm-up, and the results compared
    times: dict[str, list[float]] = {name: [] for name in dispatches}
    for _ in range(repeats):  # alternated
        for name, dispatch in dispatches.items():
            t = time.perf_counter()
            step(dispatch)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {"skew": (loads.max() / loads.mean()).item(),
            "diff": max((a - b).abs().max().item() for a, b in zip(padded, unpadded, strict=True)),
            **{name: statistics.median(ts) for name, ts in times.items()}}


def stage3_rows(train_dir: Path, steps: int, threads: int) -> list[dict]:
    """Part 2: the real stage 3 in fresh interpreters, the two alternated twice."""
    env = {**os.environ, "VITA_CURRICULUM": str(train_dir / "curriculum")}
    init = train_dir / "stage2_audio" / "final"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(STAGE3_VARIANTS * 2):
            out = Path(tmp) / f"{variant}-{i}"
            proc = subprocess.run([sys.executable, "-c", CHILD, variant, str(steps), str(out), str(init), str(threads)],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode:
                raise SystemExit(f"stage 3 ({variant}) failed: {proc.stderr.strip().splitlines()[-1:]}")
            rows.append({"variant": variant, **json.loads(proc.stdout.strip().splitlines()[-1])})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048], help="tokens per MoE layer call")
    p.add_argument("--skews", type=float, nargs="+", default=[1.0, 4.0],
                   help="expert 0 drawn this many times as often as each other one (1: even routing)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stage3", type=Path, help="a make train-tiny directory: also run its stage 3 both ways")
    p.add_argument("--steps", type=int, default=60, help="stage-3 steps per run (with --stage3)")
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    args = p.parse_args(argv)
    if args.stage3 is not None and not (args.stage3 / "stage2_audio" / "final").is_dir():
        print(f"error: {args.stage3} holds no stage2_audio/final (run make train-tiny first)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    lines = [f"One MoE layer of the tiny preset (hidden 256, 8 experts of 512, top-2), fp32, forward + "
             f"backward, median of {args.repeats}; torch {torch.__version__}, {args.threads} threads, {cpu_name()}",
             "", "| MoE tokens | busiest expert / mean load | padded bmm ms | grouped_mm ms | padded / grouped_mm | "
             "largest difference |", "|---:|---:|---:|---:|---:|---:|"]
    for heavy in args.skews:
        for tokens in args.tokens:
            r = moe_row(tokens, heavy, args.repeats)
            lines.append(f"| {tokens} | {r['skew']:.2f} | {r['padded']:.2f} | {r['grouped_mm']:.2f} | "
                         f"{r['padded'] / r['grouped_mm']:.2f}x | {r['diff']:.1e} |")
    if args.stage3 is not None:
        rows = stage3_rows(args.stage3, args.steps, args.threads)
        lines += ["", f"`vita train --stage 3` (tiny recipe) from {args.stage3}/stage2_audio/final, {args.steps} "
                      "steps per run, the two alternated", "",
                  "| run | dispatch | wall s | final loss | padding factor |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {i + 1} | {r['variant']} | {r['wall_s']:.1f} | {r['final_loss']:.5f} | {r['padding']:.2f} |"
                  for i, r in enumerate(rows)]
        wall = {v: sum(r["wall_s"] for r in rows if r["variant"] == v) for v in STAGE3_VARIANTS}
        lines += ["", f"padded / grouped_mm stage-3 wall time: {wall['padded'] / wall['grouped_mm']:.2f}x"]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        command = "python benchmarks/moe_training.py" + (f" --stage3 {args.stage3} --steps {args.steps}"
                                                            if args.stage3 else "")
        with args.output.open("a") as f:
            f.write(f"\n## MoE experts in CPU training: padded bmm vs grouped_mm ({stamp})\n\n`{command}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
