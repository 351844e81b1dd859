"""The continuous-batching engine's scheduling features, each measured off and on side by side in one run.

prefill-stall: `--streams` sequences are decoding when a `--long-prompt`-token prompt arrives (`--repeats` times,
one after the other). Without chunked prefill the whole prompt is computed in one step and every running stream
waits for it; with it, the prompt is spread over steps of at most `max_num_batched_tokens` tokens. Reported: the
running streams' inter-token latency (ITL) outside the prefill windows (steady) and inside them (an ITL is inside
when it overlaps the time from the long prompt's arrival to its first token), and the long prompt's time to first
token. Target: ITL p99 during the prefill <= 3x the steady median.

judge-prefix: the monitor's judge prompt at turn k of a conversation: a system prompt, k - 1 exchanges (user
speech as audio embedding rows, user text, the bot's answer as ids), the new speech, the bot tag; one greedy token.
Its prefix is the previous judgement's prompt, so with prefix caching only the new turn is computed: the last
answer and the new speech. With the history prefilled (the orchestrator's `--prefill-monitor-history`: after each
answer the monitor pool computes the history into its prefix cache, before the user speaks again), only the new
speech. The speech rows are named by their blob's digest, as the llm worker names the rows it reads from the bus, so
the prefix cache hashes that identity, not the rows; "rows hashed" is the same with the rows hashed, as before the
digest. Reported: judge latency per turn (submit -> token, through TorchBackend, median over `--repeats`
conversations; a prefill is not timed) with prefix caching off, on, and on with the history prefilled; the ratio
divides turn 20 by the first turn of a fresh conversation judged right after it. Target: turn 20 <= 1.2x turn 1
with caching on.

Tiny preset LLM with seeded random weights and a context of `--context` tokens (long enough for the long prompt).
Figures are appended to BENCHMARKS.md with the exact command.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_decode import write_report  # a sibling script

from vita.bus.codec import tensor_to_blob
from vita.bus.embeddings import blob_digest
from vita.llm.__main__ import engine_config as service_engine_config
from vita.llm.__main__ import parse_args as service_args
from vita.llm.backends.base import BackendRequest, PromptInput
from vita.llm.backends.torch.backend import TorchBackend
from vita.llm.backends.torch.engine import EngineConfig, EngineLoop, EngineRequest, LLMEngine
from vita.llm.worker import slot_identity
from vita.model.config import VitaConfig
from vita.model.generation import SamplingParams
from vita.model.llm import MoECausalLM

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def ids(gen: torch.Generator, n: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=gen)


# --- prefill stall -------------------------------------------------------------------------------------------


@dataclass
class StallFigures:
    steady_itl: list[float] = field(default_factory=list)
    window_itl: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    steps_with_prefill: int = 0


class _Recorder:
    """Arrival times per request, and events tests of progress can wait on (the engine thread fills it)."""

    def __init__(self) -> None:
        self.arrivals: dict[str, list[float]] = {}
        self.changed = threading.Condition()

    def __call__(self, output) -> None:
        if output.token_id is None:
            return
        with self.changed:
            self.arrivals.setdefault(output.request_id, []).append(time.perf_counter())
            self.changed.notify_all()

    def wait(self, request_id: str, count: int) -> float:
        with self.changed:
            self.changed.wait_for(lambda: len(self.arrivals.get(request_id, ())) >= count)
            return self.arrivals[request_id][count - 1]


def prefill_stall(model: MoECausalLM, config: EngineConfig, args: argparse.Namespace) -> StallFigures:
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    engine = LLMEngine(model, max_batch_size=args.streams + 1, max_seq_len=args.context, config=config)
    recorder = _Recorder()
    loop = EngineLoop(engine, recorder)
    loop.start()
    stream_params = SamplingParams(max_new_tokens=args.context - 64, ignore_eos=True)
    streams = [f"s{i}" for i in range(args.streams)]
    for rid in streams:
        loop.submit(EngineRequest(rid, stream_params, input_ids=ids(gen, 32, vocab)))
    windows = []
    try:
        seen = args.gap
        recorder.wait(streams[0], seen)
        warm_end = time.perf_counter()
        for r in range(args.repeats):
            seen += args.gap
            recorder.wait(streams[0], seen)
            submitted = time.perf_counter()
            rid = f"long{r}"
            loop.submit(EngineRequest(rid, SamplingParams(max_new_tokens=1, ignore_eos=True),
                                      input_ids=ids(gen, args.long_prompt, vocab)))
            first = recorder.wait(rid, 1)
            windows.append((submitted, first))
            seen = len(recorder.arrivals[streams[0]])
        recorder.wait(streams[0], seen + args.gap)
    finally:
        for rid in streams:
            loop.cancel(rid)
        loop.stop()
    figures = StallFigures(ttft=[f - s for s, f in windows], steps_with_prefill=engine.stats.prefill_chunks)
    for rid in streams:
        times = recorder.arrivals[rid]
        for a, b in itertools.pairwise(times):
            if a < warm_end:
                continue
            inside = any(a < f and b > s for s, f in windows)
            (figures.window_itl if inside else figures.steady_itl).append(b - a)
    return figures


# --- judge prefix --------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    system: torch.Tensor
    # (speech rows (A, H), user ids, answer ids, the speech blob's digest as an encoder writes it)
    turns: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bytes]]
    bot_tag: torch.Tensor


def conversation(model: MoECausalLM, args: argparse.Namespace, seed: int) -> Conversation:
    """Turns drawn from `seed`; the system prompt and the bot tag from `--seed`, the same in every conversation, as
    every session of a kind shares the default system prompt in serving (so a first turn finds it cached)."""
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    shared = torch.Generator().manual_seed(args.seed)
    system, bot_tag = ids(shared, args.system_tokens, vocab), ids(shared, 3, vocab)
    gen = torch.Generator().manual_seed(seed)
    turns = []
    for _ in range(args.turns):
        speech = torch.randn(args.speech_tokens, hidden, generator=gen) * 0.02
        turns.append((speech, ids(gen, 6, vocab), ids(gen, args.answer_tokens, vocab),
                      blob_digest(tensor_to_blob(speech))))
    return Conversation(system, turns, bot_tag)


def judge_prompt(conv: Conversation, turn: int, *, history_only: bool = False, hash_rows: bool = False) -> PromptInput:
    """Turn k (1-based): the system prompt, k - 1 full exchanges, the k-th speech, the bot tag; speech as slots,
    named by their blob's digest as the llm worker names them (`slot_identity`), unless `hash_rows` (the engine then
    hashes the rows). `history_only`: the system prompt and the k - 1 exchanges, what the orchestrator has the
    monitor prefill after an answer (`--prefill-monitor-history`, `judge_prefix_prompt`); k >= 2."""
    parts, slots, rows, identity, n = [conv.system], [], [], [], conv.system.numel()
    placeholder = torch.tensor([2])
    for i in range(turn - 1 if history_only else turn):
        speech, user, answer, digest = conv.turns[i]
        slots.append(torch.arange(n, n + speech.shape[0]))
        rows.append(speech)
        identity.append(slot_identity(digest, speech.shape[0]))
        parts.append(placeholder.expand(speech.shape[0]))
        n += speech.shape[0]
        tail = [user, answer] if i < turn - 1 else [conv.bot_tag]
        parts += tail
        n += sum(t.numel() for t in tail)
    return PromptInput(torch.cat(parts), torch.cat(slots), torch.cat(rows), None if hash_rows else torch.cat(identity))


def judge_latencies(model: MoECausalLM, config: EngineConfig, args: argparse.Namespace, *,
                    prefill_history: bool = False, hash_rows: bool = False) -> dict[int, list[float]]:
    """Seconds from submit to the judgement token, per turn, over `--repeats` conversations judged in turn order.
    `prefill_history`: before each turn after the first, the history is prefilled (not timed), as the orchestrator
    has the monitor pool do while the user has not spoken yet."""

    async def run() -> dict[int, list[float]]:
        backend = TorchBackend(model, max_batch_size=2, max_seq_len=args.context, engine_config=config)
        await backend.start()
        out: dict[int, list[float]] = {}
        try:
            async def judge(rid: str, prompt: PromptInput) -> float:
                start = time.perf_counter()
                outputs = [o async for o in backend.generate(BackendRequest(rid, prompt, SamplingParams(
                    max_new_tokens=1)))]
                assert outputs[-1].finish_reason is not None
                return time.perf_counter() - start

            for c in range(args.repeats + 1):  # conversation 0 warms up and is not counted
                conv = conversation(model, args, args.seed + 100 + c)
                for turn in range(1, args.turns + 1):
                    if prefill_history and turn > 1:
                        await judge(f"c{c}t{turn}prefill", judge_prompt(conv, turn, history_only=True,
                                                                         hash_rows=hash_rows))
                    elapsed = await judge(f"c{c}t{turn}", judge_prompt(conv, turn, hash_rows=hash_rows))
                    if c > 0:
                        out.setdefault(turn, []).append(elapsed)
                # A fresh conversation's first turn right after the last turn: the pair the ratio is taken from,
                # measured seconds apart so that the load of a shared machine weighs on both alike.
                fresh = conversation(model, args, args.seed + 1000 + c)
                elapsed = await judge(f"c{c}fresh", judge_prompt(fresh, 1, hash_rows=hash_rows))
                if c > 0:
                    out.setdefault(0, []).append(elapsed)
        finally:
            await backend.close()
        return out

    return asyncio.run(run())


# --- report --------------------------------------------------------------------------------------------------


def setup_line(model: MoECausalLM, args: argparse.Namespace) -> str:
    c = model.config
    cpu = platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"Tiny preset LLM (hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_local_experts} experts "
            f"top-{c.num_experts_per_tok}, vocab {c.vocab_size}), context {args.context}, fp32, random weights "
            f"(seed {args.seed}); torch {torch.__version__} ({torch.get_num_threads()} threads); {cpu}, "
            f"{os.cpu_count()} cores.")


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def stall_markdown(results: dict[str, StallFigures], args: argparse.Namespace) -> list[str]:
    lines = [
        f"{args.streams} streams decoding (greedy, 32-token prompts); a {args.long_prompt}-token prompt arrives "
        f"{args.repeats} times, {args.gap} stream tokens apart. ITL of the running streams: steady (outside the "
        "prefill windows) and during a prefill window (overlapping arrival -> first token of the long prompt).",
        "",
        "| engine | steady ITL p50 ms | steady ITL p99 ms | window ITL p50 ms | window ITL p99 ms | window ITL max ms | n window "
        "| window p99 / steady p50 | long prompt TTFT p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in results.items():
        steady = statistics.median(f.steady_itl)
        p99 = pct(f.window_itl, 0.99)
        lines.append(f"| {name} | {ms(steady)} | {ms(pct(f.steady_itl, 0.99))} | {ms(statistics.median(f.window_itl))} "
                     f"| {ms(p99)} "
                     f"| {ms(max(f.window_itl))} | {len(f.window_itl)} | {p99 / steady:.2f}x "
                     f"| {ms(statistics.median(f.ttft))} |")
    return lines


def judge_markdown(results: dict[str, dict[int, list[float]]], args: argparse.Namespace,
                   prompt_lens: dict[int, int], engine: EngineConfig) -> list[str]:
    """The table; `engine` is the configuration the columns ran with (prefix caching aside)."""
    chunking = (f"chunked prefill on, max_num_batched_tokens {engine.max_num_batched_tokens}"
                if engine.enable_chunked_prefill else "no chunked prefill")
    shown = sorted({1, 2, 5, 10, args.turns} & set(range(1, args.turns + 1)))
    names = list(results)
    lines = [
        f"Judge prompts of one conversation per repeat: system {args.system_tokens} tokens, per exchange "
        f"{args.speech_tokens} speech embedding rows + 6 user tokens + {args.answer_tokens} answer tokens; one "
        f"greedy token per judgement through TorchBackend; median of {args.repeats} conversations after one warm-up; "
        + (f"the llm service's monitor engine settings ({chunking})." if args.monitor_engine else f"{chunking}."),
        "",
        "| turn | prompt tokens | " + " | ".join(f"{n} ms" for n in names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for t in shown:
        lines.append(f"| {t} | {prompt_lens[t]} | "
                     + " | ".join(ms(statistics.median(results[n][t])) for n in names) + " |")
    lines.append(f"| 1 (a fresh conversation right after turn {args.turns}) | {prompt_lens[1]} | "
                 + " | ".join(ms(statistics.median(results[n][0])) for n in names) + " |")
    ratio = " | ".join(f"{statistics.median(results[n][args.turns]) / statistics.median(results[n][0]):.2f}x"
                       for n in names)
    lines.append(f"| turn {args.turns} / the fresh turn 1 measured next to it | | {ratio} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenario", choices=["prefill-stall", "judge-prefix", "both"], default="both")
    p.add_argument("--context", type=int, default=8192, help="model context and KV cache length")
    p.add_argument("--streams", type=int, default=4, help="prefill-stall: sequences decoding")
    p.add_argument("--long-prompt", type=int, default=4000, help="prefill-stall: tokens of the arriving prompt")
    p.add_argument("--gap", type=int, default=40, help="prefill-stall: stream tokens between arrivals")
    p.add_argument("--max-num-batched-tokens", type=int, nargs="+", default=[32, 64],
                   help="prefill-stall: chunked step budgets, each run next to chunked prefill off")
    p.add_argument("--turns", type=int, default=20, help="judge-prefix: turns per conversation")
    p.add_argument("--system-tokens", type=int, default=48)
    p.add_argument("--speech-tokens", type=int, default=40, help="judge-prefix: audio rows per user turn")
    p.add_argument("--answer-tokens", type=int, default=40)
    p.add_argument("--monitor-engine", action="store_true",
                   help="judge-prefix: the llm service's monitor engine settings (chunked prefill with its "
                        "--max-num-batched-tokens) in every column, prefix caching as the column says; default: "
                        "prefix caching alone, no chunking")
    p.add_argument("--repeats", type=int, default=3, help="long prompts (prefill-stall), conversations (judge-prefix)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--no-write", action="store_true", help="print only; do not append to --output")
    args = p.parse_args(argv)
    if args.long_prompt + 64 >= args.context or min(args.max_num_batched_tokens) <= args.streams + 1:
        p.error("need --long-prompt + 64 < --context and --max-num-batched-tokens > --streams + 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = replace(VitaConfig.preset("tiny").llm, max_position_embeddings=args.context)
    torch.manual_seed(args.seed)
    model = MoECausalLM(llm).eval()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## LLM engine: chunked prefill and prefix caching, off vs on ({now})", "",
             f"Command: `{shlex.join(['python', 'benchmarks/llm_engine.py', *sys.argv[1:]])}`", "",
             setup_line(model, args), ""]
    if args.scenario in ("prefill-stall", "both"):
        results = {}
        configs = [("chunked prefill off", EngineConfig())] + [
            (f"chunked prefill on, max_num_batched_tokens {b}",
             EngineConfig(enable_chunked_prefill=True, max_num_batched_tokens=b)) for b in args.max_num_batched_tokens]
        for name, config in configs:
            print(f"prefill-stall: {name}", file=sys.stderr)
            results[name] = prefill_stall(model, config, args)
        lines += [*stall_markdown(results, args), ""]
    if args.scenario in ("judge-prefix", "both"):
        conv = conversation(model, args, 0)
        lens = {t: judge_prompt(conv, t).input_ids.numel() for t in range(1, args.turns + 1)}
        judged = {}
        caching = EngineConfig(enable_prefix_caching=True)
        if args.monitor_engine:  # the llm service's monitor settings: chunked prefill on, with its token budget
            caching = service_engine_config(service_args(["--role", "monitor"]))
        for name, config, prefill, hash_rows in (
                ("prefix caching off", replace(caching, enable_prefix_caching=False), False, False),
                ("prefix caching on", caching, False, False),
                ("prefix caching on, history prefilled, rows hashed", caching, True, True),
                ("prefix caching on, history prefilled", caching, True, False)):
            print(f"judge-prefix: {name}", file=sys.stderr)
            judged[name] = judge_latencies(model, config, args, prefill_history=prefill, hash_rows=hash_rows)
        lines += [*judge_markdown(judged, args, lens, caching), ""]
    write_report("\n".join(lines), args.output, args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
