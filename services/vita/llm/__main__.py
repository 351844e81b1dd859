"""`vita serve llm`: one worker of the generator or the monitor pool."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from vita.bus.streams import ROLE_POOLS
from vita.grpc_server import ServiceServer
from vita.llm.worker import LLMWorker, WorkerConfig
from vita.service_args import add_common_args, setup
from vita.v1.bus_pb2 import GenerationJob

log = logging.getLogger("vita.llm")
ROLES = {"generator": GenerationJob.GENERATOR, "monitor": GenerationJob.MONITOR}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vita serve llm", description="An LLM worker: takes generation jobs from its "
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
    add_common_args(p)
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    import torch

    from vita.model.tiny import build_tiny_checkpoint
    from vita.model.vita import read_model_config
    from vita.processing.tokenizer import VitaTokenizer

    redis, bus, metrics = setup(f"llm-{args.role}", args)
    model_dir = Path(args.model) if args.model else build_tiny_checkpoint()
    tokenizer = VitaTokenizer.from_file(model_dir)
    if args.backend == "torch":
        from vita.llm.backends.torch.backend import TorchBackend
        from vita.model.vita import VitaForCausalLM

        if args.threads:
            torch.set_num_threads(args.threads)
        backend = TorchBackend(VitaForCausalLM.from_pretrained(model_dir), max_batch_size=args.max_batch,
                               max_seq_len=args.max_seq_len, metrics=metrics,
                               pool=ROLE_POOLS[ROLES[args.role]].value)  # the label the worker uses
    else:
        from vita.llm.backends.triton.backend import TritonBackend

        llm = read_model_config(model_dir).llm
        backend = TritonBackend(args.triton_url, model_name=args.triton_model, vocab_size=llm.vocab_size,
                                end_id=llm.eos_token_id)
    await backend.start()
    worker = LLMWorker(redis, bus, backend, tokenizer, WorkerConfig(role=ROLES[args.role],
                       max_concurrency=args.max_batch), metrics)
    server = ServiceServer([], host=args.host, port=args.grpc_port)
    await server.start()
    server.install_signal_handlers(on_drain=worker.stop)
    log.info("serving", extra={"role": args.role, "backend": args.backend, "grpc_port": server.port,
                               "model": str(model_dir)})
    try:
        await worker.run()
    finally:
        await backend.close()
        await server.drain()
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
