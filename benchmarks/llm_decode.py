"""Prefill and decode throughput of our MoE decoder against transformers' Mixtral, same weights, same process.

Builds the tiny preset LLM with seeded random weights, saves it in Hugging Face format, loads that directory into
both implementations and times greedy generation with eos disabled, so both decode the full length. Decode speed
is B * (N - 1) / (t(N new tokens) - t(1 new token)): the per-step cost with prefill cancelled out. Medians of
several runs after a warm-up. A read ceiling bounds what any implementation could reach here: the time to only
read what a decode step must read. The figures are appended to BENCHMARKS.md with the exact command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vita.model.config import LLMConfig, VitaConfig
from vita.model.llm import MoECausalLM

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


@dataclass
class Figures:
    prefill_tokens_per_s: float
    decode_tokens_per_s: dict[int, float]  # batch size -> aggregate tokens/s
    peak_rss_mib: float  # resource.getrusage(RUSAGE_SELF).ru_maxrss so far: the process peak, monotonic
    read_ceiling_tokens_per_s: dict[int, float]  # batch size -> tokens/s if a step only read its bytes (ours only)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens decoded per row")
    parser.add_argument("--batch", type=int, default=8, help="the batched decode size compared with batch 1")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file the results are appended to")
    parser.add_argument("--no-write", action="store_true", help="print the table only; do not append to --output")
    args = parser.parse_args(argv)
    if args.prompt_len < 1 or args.new_tokens < 2 or args.batch < 2 or args.repeats < 1 or args.threads < 1:
        parser.error("need --prompt-len >= 1, --new-tokens >= 2, --batch >= 2, --repeats >= 1, --threads >= 1")
    return args


def median_seconds(fn: Callable[[], object], repeats: int, progress: tqdm) -> float:
    fn()  # warm-up: first-call allocations and kernel selection stay out of the figures
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        progress.update()
    return statistics.median(times)


def measure(
    generate: Callable[[torch.Tensor, int], torch.Tensor],
    prefill: Callable[[torch.Tensor], object],
    prompts: dict[int, torch.Tensor],
    args: argparse.Namespace,
    progress: tqdm,
) -> Figures:
    def run(ids: torch.Tensor, new: int) -> None:
        out = generate(ids, new)
        assert out.shape == (ids.shape[0], ids.shape[1] + new), f"decoded {out.shape[1] - ids.shape[1]} of {new}"

    prefill_s = median_seconds(lambda: prefill(prompts[1]), args.repeats, progress)
    decode = {}
    for batch, ids in prompts.items():
        one = median_seconds(lambda ids=ids: run(ids, 1), args.repeats, progress)
        full = median_seconds(lambda ids=ids: run(ids, args.new_tokens), args.repeats, progress)
        decode[batch] = batch * (args.new_tokens - 1) / (full - one)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return Figures(args.prompt_len / prefill_s, decode, peak, {})


@torch.inference_mode()
def read_ceiling(model: MoECausalLM, batch: int, args: argparse.Namespace) -> float:
    """Tokens/s if a decode step at `batch` only streamed what it must read, with torch.sum, and computed nothing.

    That is every weight but the embedding table, the KV cache of its rows at the mean decode length, and per layer
    the number of experts `batch` tokens reach on average under uniform top-k routing (2 of 8 for one token, 7 for
    eight), a different window of them each step as routing would pick. No implementation can decode faster.
    """
    config = model.config
    E, k = config.num_local_experts, config.num_experts_per_tok
    touched = round(E * (1 - (1 - k / E) ** batch))
    kv_len = args.prompt_len + args.new_tokens // 2
    cache = model.new_cache(batch, kv_len)
    gen = torch.Generator().manual_seed(args.seed)
    steps = args.new_tokens

    def decode_reads() -> None:
        for _ in range(steps):
            for i, layer in enumerate(model.model.layers):
                attn, moe = layer.self_attn, layer.block_sparse_moe
                first = int(torch.randint(E - touched + 1, (), generator=gen))
                for t in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                          moe.gate.weight, cache.k[i], cache.v[i]):
                    t.sum()
                for w in (moe.w1, moe.w2, moe.w3):
                    w[first : first + touched].sum()
            model.lm_head.weight.sum()

    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        decode_reads()
        times.append(time.perf_counter() - start)
    return batch * steps / statistics.median(times[1:])


def ours(directory: Path, prompts: dict[int, torch.Tensor], args: argparse.Namespace, progress: tqdm) -> Figures:
    model = MoECausalLM.from_pretrained(directory)

    @torch.inference_mode()
    def prefill(ids: torch.Tensor) -> None:
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        model(ids, cache=model.new_cache(ids.shape[0], ids.shape[1]), positions=positions)

    def generate(ids: torch.Tensor, new: int) -> torch.Tensor:
        return model.generate(ids, max_new_tokens=new, ignore_eos=True)

    figures = measure(generate, prefill, prompts, args, progress)
    figures.read_ceiling_tokens_per_s = {batch: read_ceiling(model, batch, args) for batch in prompts}
    return figures


def transformers_mixtral(
    directory: Path, prompts: dict[int, torch.Tensor], args: argparse.Namespace, progress: tqdm
) -> tuple[Figures, str]:
    import transformers
    from transformers import MixtralForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = MixtralForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # decode the full length, like ignore_eos on our side

    @torch.inference_mode()
    def prefill(ids: torch.Tensor) -> None:
        model(ids, use_cache=True)

    def generate(ids: torch.Tensor, new: int) -> torch.Tensor:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              pad_token_id=0)

    setup = (f"transformers {transformers.__version__} (attention {model.config._attn_implementation}, "
             f"experts {model.config._experts_implementation})")
    return measure(generate, prefill, prompts, args, progress), setup


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def write_report(report: str, output: Path, no_write: bool) -> None:
    """Print a benchmark's markdown section and, unless `no_write`, append it to `output` (BENCHMARKS.md)."""
    print(report)
    if not no_write:
        started = output.exists() and output.stat().st_size > 0
        with output.open("a") as f:
            f.write("\n" + report if started else "# Benchmarks\n\n" + report)
        print(f"appended to {output}")


def markdown(args: argparse.Namespace, config: LLMConfig, mine: Figures, theirs: Figures, hf_setup: str) -> str:
    big = args.batch
    ceiling = mine.read_ceiling_tokens_per_s
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "benchmarks/llm_decode.py", *sys.argv[1:]])
    rows = [
        (f"prefill tokens/s (batch 1, {args.prompt_len} tokens)", mine.prefill_tokens_per_s,
         theirs.prefill_tokens_per_s),
        ("decode tokens/s, batch 1", mine.decode_tokens_per_s[1], theirs.decode_tokens_per_s[1]),
        (f"decode tokens/s, batch {big} (aggregate)", mine.decode_tokens_per_s[big], theirs.decode_tokens_per_s[big]),
    ]
    lines = [
        f"## LLM decode: ours vs transformers ({now})",
        "",
        f"Command: `{command}`",
        "",
        f"Tiny preset LLM (hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_local_experts} experts top-{config.num_experts_per_tok}, vocab {config.vocab_size}), fp32, "
        f"random weights (seed {args.seed}); prompt {args.prompt_len} tokens, {args.new_tokens} greedy new tokens "
        f"with eos disabled; median of {args.repeats} runs after a warm-up; decode tokens/s = "
        f"B * (N - 1) / (t(N) - t(1)). torch {torch.__version__} ({torch.get_num_threads()} threads), {hf_setup}; "
        f"{cpu_name()}.",
        "",
        "| metric | ours | transformers | ours / transformers |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |" for name, a, b in rows),
        f"| batch-{big} aggregate / batch-1 decode | {mine.decode_tokens_per_s[big] / mine.decode_tokens_per_s[1]:.2f}x "
        f"| {theirs.decode_tokens_per_s[big] / theirs.decode_tokens_per_s[1]:.2f}x | |",
        f"| peak RSS, MiB (resource.ru_maxrss; ours measured first, transformers' includes ours) "
        f"| {mine.peak_rss_mib:,.0f} | {theirs.peak_rss_mib:,.0f} | |",
        f"| read ceiling tokens/s, batch 1 (only read the weights + KV cache a step must read) | {ceiling[1]:,.0f} | | |",
        f"| read ceiling tokens/s, batch {big} (aggregate) | {ceiling[big]:,.0f} | | |",
        f"| read ceiling batch-{big} / batch-1 | {ceiling[big] / ceiling[1]:.2f}x | | |",
        "",
        f"Targets: batch-1 decode >= 2x transformers (measured {mine.decode_tokens_per_s[1] / theirs.decode_tokens_per_s[1]:.2f}x); "
        f"batch-{big} aggregate >= 5x our batch 1 (measured "
        f"{mine.decode_tokens_per_s[big] / mine.decode_tokens_per_s[1]:.2f}x; a step that only read its bytes would "
        f"reach {ceiling[big] / ceiling[1]:.2f}x).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = VitaConfig.preset("tiny").llm
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(3, config.vocab_size, (b, args.prompt_len), generator=gen) for b in (1, args.batch)}
    timed_runs = 2 * args.repeats * (1 + 2 * len(prompts))
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp, tqdm(total=timed_runs, unit="run") as progress:
        torch.manual_seed(args.seed)
        MoECausalLM(config).save_pretrained(tmp)
        progress.set_description("ours")
        mine = ours(Path(tmp), prompts, args, progress)
        progress.set_description("transformers")
        theirs, hf_setup = transformers_mixtral(Path(tmp), prompts, args, progress)
    write_report(markdown(args, config, mine, theirs, hf_setup), args.output, args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
