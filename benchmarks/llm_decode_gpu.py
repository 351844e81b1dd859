"""Decode of our MoE decoder against transformers' Mixtral on one GPU, beside the bound its reads put on it.

Issue 12's side-by-side table in one run sized to fit one call on a lent GPU (the issue's 5 minutes; not yet run on
one): the Mixtral-8x7B width with 16 of its 32 layers and VITA's 51,747-token vocabulary, bf16, random weights
drawn once in transformers' `MixtralForCausalLM` and converted into ours (`llm_state_dict_from_hf`), so both decode
with the same weights. For batch 1, 8 and 32: greedy decode tokens/s of each, B * (N - 1) / (t(N) - t(1)) (the
prefill cancelled out, as `benchmarks/llm_decode.py` does on CPU), ours twice: eager, and with each decode step
replayed from a CUDA graph (`vita.model.cuda_graph.CUDAGraphDecoder`), and the bound: the bytes one decode step must read
(every weight but the embedding table, the experts B tokens reach on average under uniform top-2 routing, the KV
cache at the mean length) over the device's copy bandwidth, measured in the same run. Then the full-size encoders:
vision tiles per second and seconds of speech per second. Figures are appended to BENCHMARKS.md with the command.

CI has no GPU: `--device cpu --preset tiny` runs the same code at tiny size in fp32 (a test does, and checks that
the decoders give the same greedy tokens there; off CUDA the graph decoder runs its step eagerly).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_decode import cpu_name, median_seconds, write_report  # a sibling script

from vita.model import fused_moe
from vita.model.config import LLMConfig, VitaConfig
from vita.model.cuda_graph import CUDAGraphDecoder
from vita.model.llm import MoECausalLM

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if gpu else "cpu", help="torch device")
    parser.add_argument("--preset", choices=("mixtral-8x7b", "tiny"), default="mixtral-8x7b" if gpu else "tiny",
                        help="model width (VitaConfig preset); towers of the same preset for the encoder rows")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: 16 for mixtral-8x7b, the preset's for tiny)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16" if gpu else "fp32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens decoded per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--encoder-batch", type=int, default=32, help="vision tiles per forward")
    parser.add_argument("--audio-seconds", type=float, default=30.0, help="length of each audio clip")
    parser.add_argument("--audio-batch", type=int, default=8, help="audio clips per forward")
    parser.add_argument("--fused-moe-tokens", type=int, default=8,
                        help="the third decode of ours: CUDA graph with the Triton MoE kernel (vita.model.fused_moe) "
                             "for forwards of at most this many tokens; 0 skips it. Runs where Triton does (CUDA, "
                             "or its interpreter with TRITON_INTERPRET=1)")
    parser.add_argument("--no-transformers", action="store_true", help="ours only (transformers' rows left empty)")
    parser.add_argument("--no-encoders", action="store_true", help="skip the encoder rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to --output")
    args = parser.parse_args(argv)
    if (args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1 or min(args.batches) < 1
            or (args.layers is not None and args.layers < 1)):
        parser.error("need --prompt-len >= 1, --new-tokens >= 2, --repeats >= 1, --batches >= 1, --layers >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device (torch {torch.__version__})")
    return args


def llm_config(args: argparse.Namespace) -> VitaConfig:
    config = VitaConfig.preset(args.preset)
    layers = args.layers or (16 if args.preset == "mixtral-8x7b" else config.llm.num_hidden_layers)
    config.llm = dataclasses.replace(config.llm, num_hidden_layers=layers)
    return config


def device_sync(device: torch.device) -> Callable[[], None]:
    """What makes the clock see the device's work done: torch.cuda.synchronize on CUDA, nothing on a CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn: Callable[[], object], sync: Callable[[], None], repeats: int, progress: tqdm) -> float:
    """`median_seconds` (warm-up, then the median) of `fn` followed by a device sync: each run ends with the
    device idle, so the next one starts on an idle device too."""
    return median_seconds(lambda: (fn(), sync()), repeats, progress)


def copy_bandwidth(device: torch.device, sync: Callable[[], None], repeats: int, progress: tqdm) -> float:
    """Bytes per second of a device-to-device copy, counting what is read and what is written (2 x the buffer)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)  # 1 GiB on a GPU, 128 MiB on a CPU
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), sync, repeats + 2, progress)
    return 2 * n / seconds


def step_bytes(config: LLMConfig, batch: int, kv_len: int, element: int) -> float:
    """Bytes one decode step at `batch` must read: every weight but the embedding table (B rows of it), per layer
    the experts B tokens reach on average under uniform top-k routing (E * (1 - (1 - k/E)^B)), and the KV cache of
    the B rows at `kv_len` tokens."""
    H, inter, E, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
    kv = config.num_key_value_heads * config.head_dim
    attention = H * (config.num_attention_heads * config.head_dim) * 2 + H * kv * 2  # q, o; k, v
    touched = E * (1 - (1 - k / E) ** batch)
    layer = attention + H * E + touched * 3 * H * inter + 2 * H  # + router + experts + norms
    cache = 2 * batch * kv_len * kv
    return element * (config.num_hidden_layers * (layer + cache) + config.vocab_size * H + batch * H + H)


@dataclass
class Decode:
    tokens_per_s: dict[int, float]  # batch -> aggregate greedy tokens/s
    first_tokens: list[int]  # batch 1's greedy tokens, to compare the two implementations


def decode(generate: Callable[[torch.Tensor, int], torch.Tensor], prompts: dict[int, torch.Tensor],
           args: argparse.Namespace, sync: Callable[[], None], progress: tqdm) -> Decode:
    speeds = {}
    for batch, ids in prompts.items():
        one = timed(lambda ids=ids: generate(ids, 1), sync, args.repeats, progress)
        full = timed(lambda ids=ids: generate(ids, args.new_tokens), sync, args.repeats, progress)
        # nan when noise outweighed the decode steps (too few new tokens for this machine's jitter)
        speeds[batch] = batch * (args.new_tokens - 1) / (full - one) if full > one else float("nan")
    tokens = generate(prompts[min(prompts)][:1], args.new_tokens)[0, args.prompt_len:].tolist()
    return Decode(speeds, tokens)


def graphed_generate(model: MoECausalLM, prompts: dict[int, torch.Tensor], new_tokens: int
                     ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """Greedy decode whose steps replay a CUDA graph (`CUDAGraphDecoder`; eager off CUDA): one cache and one
    captured decoder per batch size, made here, before any timing, as a server makes them at start-up."""
    prompt_len = next(iter(prompts.values())).shape[1]
    decoders = {batch: CUDAGraphDecoder(model, model.new_cache(batch, prompt_len + new_tokens), batch)
                for batch in {1, *prompts}}  # batch 1 too: the greedy tokens compared are one row's

    @torch.inference_mode()
    def generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        decoder = decoders[ids.shape[0]]
        B, L = ids.shape
        positions = torch.arange(L, device=ids.device).expand(B, L)
        token = model(ids, cache=decoder.cache, positions=positions).logits[:, -1].argmax(-1)
        tokens = [token]
        for step in range(n - 1):
            token = decoder(token, torch.full((B,), L + step, device=ids.device)).argmax(-1)
            tokens.append(token)
        return torch.cat([ids, torch.stack(tokens, 1)], 1)

    return generate


def with_fused_moe(model: MoECausalLM, max_tokens: int, generate: Callable[[torch.Tensor, int], torch.Tensor]
                   ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`generate` with the model's MoE layers on the Triton kernel for at most `max_tokens` tokens while it runs
    (and while its CUDA graphs are captured, which happens in `graphed_generate`, before this wrapper is called)."""
    def run(ids: torch.Tensor, n: int) -> torch.Tensor:
        model.use_fused_moe(max_tokens)
        try:
            return generate(ids, n)
        finally:
            model.use_fused_moe(0)

    return run


def build_models(config: LLMConfig, args: argparse.Namespace, device: torch.device):
    """transformers' Mixtral with seeded random weights on `device`, and ours with the same weights."""
    import transformers
    from transformers import MixtralConfig, MixtralForCausalLM

    transformers.logging.set_verbosity_error()
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    with torch.device(device):  # drawn on the device in the run's dtype: no full-size fp32 copy on the way
        theirs = MixtralForCausalLM._from_config(MixtralConfig(**config.to_hf_dict()), dtype=dtype).eval()
    theirs.generation_config.eos_token_id = None  # decode the full length, as ignore_eos does on our side
    ours = MoECausalLM.from_hf_state_dict(config, theirs.state_dict()).eval()
    if args.no_transformers:
        del theirs
        theirs = None
    setup = (f"transformers {transformers.__version__}"
             + (f" (attention {theirs.config._attn_implementation}, experts {theirs.config._experts_implementation})"
                if theirs is not None else ", not run"))
    return ours, theirs, setup


@torch.inference_mode()
def encoder_rows(config: VitaConfig, args: argparse.Namespace, device: torch.device, sync: Callable[[], None],
                 progress: tqdm) -> list[str]:
    """Vision tiles per second and audio seconds per second of the preset's encoders (random weights)."""
    from vita.model.audio import AudioEncoder
    from vita.model.vision import VisionEncoder

    dtype = DTYPES[args.dtype]
    vision = VisionEncoder(config.vision).to(device=device, dtype=dtype).eval()
    size = config.vision.image_size
    tiles = torch.randn(args.encoder_batch, 3, size, size, device=device, dtype=dtype)
    vision_s = timed(lambda: vision(tiles), sync, args.repeats, progress)
    audio = AudioEncoder(config.audio).to(device=device, dtype=dtype).eval()
    frames = int(args.audio_seconds * 1000 / config.audio.frame_shift_ms)
    feats = torch.randn(args.audio_batch, frames, config.audio.num_mel_bins, device=device, dtype=dtype)
    lengths = torch.full((args.audio_batch,), frames, device=device)
    audio_s = timed(lambda: audio(feats, lengths), sync, args.repeats, progress)
    return [
        f"| vision encoder ({size} px tiles, batch {args.encoder_batch}) | tiles/s | "
        f"{args.encoder_batch / vision_s:,.0f} |",
        f"| audio encoder ({args.audio_seconds:g} s clips, batch {args.audio_batch}) | seconds of speech per second | "
        f"{args.audio_batch * args.audio_seconds / audio_s:,.0f} |",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    sync = device_sync(device)
    run_fused = bool(args.fused_moe_tokens) and fused_moe.supported(torch.empty(0, device=device))
    decodes = 3 + run_fused  # ours eager, ours graphed, transformers, ours graphed with the kernel
    runs = (args.repeats + 2 + 2 * decodes * args.repeats * len(set(args.batches))
            + (0 if args.no_encoders else 2 * args.repeats))
    progress = tqdm(total=runs, unit="run", desc="decode")
    vita_config = llm_config(args)
    config = vita_config.llm
    element = torch.finfo(DTYPES[args.dtype]).bits // 8

    bandwidth = copy_bandwidth(device, sync, args.repeats, progress)
    ours, theirs, hf_setup = build_models(config, args, device)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(3, config.vocab_size, (b, args.prompt_len), generator=gen).to(device)
               for b in sorted(set(args.batches))}

    mine = decode(lambda ids, n: ours.generate(ids, max_new_tokens=n, ignore_eos=True), prompts, args, sync,
                  progress)
    graphed = decode(graphed_generate(ours, prompts, args.new_tokens), prompts, args, sync, progress)
    fused = None
    if run_fused:
        ours.use_fused_moe(args.fused_moe_tokens)  # the graphs are captured with the kernel
        fused_generate = graphed_generate(ours, prompts, args.new_tokens)
        ours.use_fused_moe(0)
        fused = decode(with_fused_moe(ours, args.fused_moe_tokens, fused_generate), prompts, args, sync, progress)
    if theirs is not None:
        def hf_generate(ids: torch.Tensor, n: int) -> torch.Tensor:
            with torch.inference_mode():
                return theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                       pad_token_id=0)

        other = decode(hf_generate, prompts, args, sync, progress)
    else:
        other = None
    kv_len = args.prompt_len + args.new_tokens // 2
    bound = {b: b * bandwidth / step_bytes(config, b, kv_len, element) for b in prompts}

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "benchmarks/llm_decode_gpu.py", *(argv if argv is not None else sys.argv[1:])])
    same = 0
    if other is not None:
        while same < len(mine.first_tokens) and mine.first_tokens[same] == other.first_tokens[same]:
            same += 1
    rows = []
    graph = "CUDA graph" if device.type == "cuda" else "graph path, eager off CUDA"
    for b in prompts:
        theirs_s = other.tokens_per_s[b] if other is not None else float("nan")
        variants = [(f"decode, batch {b}", mine), (f"decode, batch {b}, {graph}", graphed)]
        if fused is not None:
            variants.append((f"decode, batch {b}, {graph} + fused MoE kernel", fused))
        for label, run in variants:
            rows.append(f"| {label} | tokens/s (aggregate) | {run.tokens_per_s[b]:,.1f} | {theirs_s:,.1f} | "
                        f"{run.tokens_per_s[b] / theirs_s:.2f}x | {bound[b]:,.0f} | "
                        f"{run.tokens_per_s[b] / bound[b]:.0%} |")
    graphed_same = graphed.first_tokens == mine.first_tokens
    lines = [
        f"## LLM decode on {device.type.upper()}: ours vs transformers, and the bound ({now})", "",
        f"Command: `{command}`", "",
        f"Decoder: hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_local_experts} experts "
        f"top-{config.num_experts_per_tok}, vocab {config.vocab_size} (`{args.preset}` width), {args.dtype}, random "
        f"weights (seed {args.seed}), the same in both; prompt {args.prompt_len} tokens, {args.new_tokens} greedy new "
        f"tokens, eos ignored; median of {args.repeats} runs after a warm-up; tokens/s = B * (N - 1) / (t(N) - t(1)). "
        f"Bound: B x copy bandwidth / bytes a step must read (weights but the embedding table, the experts B tokens "
        f"reach on average under uniform routing, the KV cache at {kv_len} tokens). Copy bandwidth measured here: "
        f"**{bandwidth / 1e9:,.1f} GB/s** (read + written). torch {torch.__version__}, {hf_setup}; "
        f"{device_label(device)}.", "",
        "| what | unit | ours | transformers | ours / transformers | bound | ours / bound |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows, "",
        f"Greedy tokens of batch 1: the first {same} of {len(mine.first_tokens)} are the same in both"
        + (" (bf16: the two sum in other orders, so a near tie can go either way)" if args.dtype == "bf16" else "")
        + ("." if other is not None else " (transformers not run)."), "",
        f"The {graph} decode (`CUDAGraphDecoder`: `decode_step` captured once per batch size, experts read in place "
        f"by grouped GEMMs in bf16) gives {'the same' if graphed_same else 'other'} greedy tokens of batch 1 as our "
        f"eager decode.", "",
        (f"The {graph} decode with the Triton MoE kernel (`vita.model.fused_moe`, forwards of at most "
         f"{args.fused_moe_tokens} tokens: each (token, expert) pair streams only its expert's rows) gives "
         f"{'the same' if fused.first_tokens == mine.first_tokens else 'other'} greedy tokens of batch 1 as our "
         "eager decode." if fused is not None else
         "The Triton MoE kernel was not run (" + ("--fused-moe-tokens 0" if not args.fused_moe_tokens else
                                                 "no Triton on this device: CUDA, or TRITON_INTERPRET=1") + ")."),
        "",
    ]
    if not args.no_encoders:
        lines += ["| encoder | unit | ours |", "|---|---|---:|",
                  *encoder_rows(vita_config, args, device, sync, progress), ""]
    progress.close()
    write_report("\n".join(lines), args.output, args.no_write)
    return 0


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    sys.exit(main())
