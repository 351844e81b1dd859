"""`vita serve llm`: one worker of the generator or the monitor pool."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vita.bus.streams import ROLE_POOLS
from vita.llm.backends.base import GenerationBackend
from vita.llm.backends.torch.engine import EngineConfig
from vita.llm.backends.torch.engine_core import load_language_model
from vita.llm.worker import LLMWorker, WorkerConfig
from vita.model.fingerprint import model_fingerprint
from vita.model.placement import TORCH_DTYPES
from vita.runtime.args import add_common_args
from vita.runtime.serve import Context, Service, run_service
from vita.telemetry.metrics import Metrics
from vita.usage import ArgumentParser
from vita.v1.bus_pb2 import GenerationJob

ROLES = {"generator": GenerationJob.GENERATOR, "monitor": GenerationJob.MONITOR}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="vita serve llm", description="An LLM worker: takes generation jobs from its "
                                "pool's Redis stream and streams tokens back. Scale each role independently.")
    p.add_argument("--role", choices=sorted(ROLES), default="generator", help="which pool this worker serves")
    p.add_argument("--backend", choices=["torch", "triton"], default="torch",
                   help="torch: the embedded continuous-batching engine; triton: a Triton TensorRT-LLM server")
    p.add_argument("--model", default=None, help="model directory (default: the tiny model, built on first use); "
                   "with --backend triton only its config and tokenizer are read")
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton gRPC address (--backend triton)")
    p.add_argument("--triton-model", default="tensorrt_llm", help="model name in Triton's repository")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (and jobs taken at once)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length per sequence (torch backend)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="torch backend: spread long prompts over steps of at most --max-num-batched-tokens tokens, "
                   "so running streams keep decoding while they prefill (vLLM's flag)")
    p.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                   help="torch backend, chunked prefill: tokens computed per step (decode + prompt chunks); more "
                   "than --max-batch. Smaller: steadier inter-token latency, slower long prompts")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="torch backend: reuse the KV blocks of prompt prefixes seen before (a session's history, "
                   "the system prompt, the judge prompt)")
    p.add_argument("--device", default="auto",
                   help="torch backend: where the model runs, a torch device (cuda, cuda:1, cpu); auto: the first "
                   "CUDA device when torch sees one, else the CPU")
    p.add_argument("--dtype", choices=("auto", *TORCH_DTYPES), default="auto",
                   help="torch backend: the weights' dtype; auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--enforce-eager", action="store_true",
                   help="torch backend on CUDA: run every decode step eagerly instead of replaying CUDA graphs "
                   "captured per batch-size bucket (vLLM's flag; graphs are never used on CPU)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="torch backend: run the engine core (model, KV cache, scheduler) in a child process of its "
                   "own (the default), fed and drained over pipes (vLLM V1's split), so this process's job intake and token "
                   "publishing never hold the GIL the forward needs; --threads then sets the child's threads")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.backend == "torch" and args.enable_chunked_prefill and args.max_num_batched_tokens <= args.max_batch:
        p.error(f"--max-num-batched-tokens ({args.max_num_batched_tokens}) must be more than --max-batch "
                f"({args.max_batch}) with chunked prefill")
    return args


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(enable_chunked_prefill=args.enable_chunked_prefill,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        enable_prefix_caching=args.enable_prefix_caching,
                        cuda_graphs=False if args.enforce_eager else None)


def load_backend(args: argparse.Namespace, model_dir: Path, metrics: Metrics) -> GenerationBackend:
    """The backend `--backend` names, not started. The torch backend loads the language model alone: the vision
    and audio towers of the checkpoint are never read (the encoder pools run them)."""
    if args.backend == "torch" and args.engine_process:
        from vita.llm.backends.torch.backend import TorchProcessBackend

        return TorchProcessBackend(model_dir, max_batch_size=args.max_batch, max_seq_len=args.max_seq_len,
                                   metrics=metrics, engine_config=engine_config(args),
                                   pool=ROLE_POOLS[ROLES[args.role]].value, threads=args.threads,
                                   device=args.device, dtype=args.dtype)
    if args.backend == "torch":
        from vita.llm.backends.torch.backend import TorchBackend

        return TorchBackend(load_language_model(model_dir, args.device, args.dtype), max_batch_size=args.max_batch,
                            max_seq_len=args.max_seq_len, metrics=metrics, engine_config=engine_config(args),
                            pool=ROLE_POOLS[ROLES[args.role]].value)  # the label the worker uses
    from vita.llm.backends.triton.backend import TritonBackend
    from vita.model.vita import read_model_config

    llm = read_model_config(model_dir).llm
    return TritonBackend(args.triton_url, model_name=args.triton_model, vocab_size=llm.vocab_size,
                         end_id=llm.eos_token_id)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    async def build(ctx: Context) -> Service:
        from vita.processing.tokenizer import VitaTokenizer

        tokenizer = VitaTokenizer.from_file(ctx.model_dir)
        backend = load_backend(args, ctx.model_dir, ctx.metrics)
        await backend.start()
        ctx.resources.push_async_callback(backend.close)
        worker = LLMWorker(ctx.redis, ctx.bus, backend, tokenizer,
                           WorkerConfig(role=ROLES[args.role], max_concurrency=args.max_batch,
                                        model_fingerprint=model_fingerprint(ctx.model_dir)), ctx.metrics)
        return Service(worker=worker, log={"role": args.role, "backend": args.backend})

    threads = args.threads if args.backend == "torch" and not args.engine_process else None
    return run_service(f"llm-{args.role}", args, build, threads=threads)


if __name__ == "__main__":
    sys.exit(main())
