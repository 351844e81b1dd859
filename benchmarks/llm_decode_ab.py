"""Decode speed of this tree's MoE decoder against another revision's, same weights, interleaved in one process.

For a no-regression check of a change to `services/vita/model/llm.py`: `git show REV:services/vita/model/llm.py`
is loaded as a second module (the rest of `vita` is this tree's), both models get the same state dict, and timed
greedy generations of the two alternate, so the load of a shared machine weighs on both alike. Decode tokens/s =
B * (N - 1) / (t(N new tokens) - t(1 new token)), medians of `--repeats` alternating runs. Prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vita.model.config import VitaConfig
from vita.model.llm import MoECausalLM

ROOT = Path(__file__).resolve().parents[1]


def revision_module(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:services/vita/model/llm.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="llm-ab-")) / f"llm_{rev.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="main", help="git revision to compare with")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = VitaConfig.preset("tiny").llm
    torch.manual_seed(0)
    ours = MoECausalLM(config).eval()
    theirs = revision_module(args.baseline).MoECausalLM(config).eval()
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(0)
    print(f"| batch | this tree tok/s | {args.baseline} tok/s | this / {args.baseline} |\n|---:|---:|---:|---:|")
    for batch in args.batch:
        ids = torch.randint(3, config.vocab_size, (batch, args.prompt_len), generator=gen)
        times = {"ours": {1: [], args.new_tokens: []}, "theirs": {1: [], args.new_tokens: []}}
        outs = {}
        for r in range(args.repeats + 1):  # run 0 warms up
            for name, model in (("ours", ours), ("theirs", theirs)):
                for n in (1, args.new_tokens):
                    start = time.perf_counter()
                    outs[name] = model.generate(ids, max_new_tokens=n, ignore_eos=True)
                    if r:
                        times[name][n].append(time.perf_counter() - start)
        assert torch.equal(outs["ours"], outs["theirs"]), "the two revisions decode different tokens"
        rate = {k: batch * (args.new_tokens - 1) / (statistics.median(v[args.new_tokens]) - statistics.median(v[1]))
                for k, v in times.items()}
        print(f"| {batch} | {rate['ours']:,.0f} | {rate['theirs']:,.0f} | {rate['ours'] / rate['theirs']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
