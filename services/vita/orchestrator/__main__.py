"""`vita serve orchestrator`: the public `vita.v1.Assistant` API; stateless, run as many replicas as needed."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from vita.grpc_server import GrpcService, ServiceServer
from vita.orchestrator.service import AssistantService, OrchestratorConfig
from vita.service_args import add_common_args, setup
from vita.v1 import assistant_pb2_grpc

log = logging.getLogger("vita.orchestrator")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vita serve orchestrator",
                                description="The public gRPC API: fans requests out to the encoder and LLM pools "
                                            "over Redis streams and streams answers back.")
    p.add_argument("--model", default=None, help="model directory: only config.json and the tokenizer are read "
                   "(default: the tiny model)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="when a request sets no max_tokens")
    p.add_argument("--encode-timeout", type=float, default=60.0, help="seconds to wait for the encoders")
    p.add_argument("--token-timeout", type=float, default=60.0,
                   help="seconds without a token before the request fails UNAVAILABLE (> reclaim time)")
    add_common_args(p)
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    import torch

    from vita.model.tiny import build_tiny_checkpoint
    from vita.model.vita import read_model_config
    from vita.processing.tokenizer import VitaTokenizer

    torch.set_num_threads(1)  # VAD and resampling only: ops this small lose time to a second thread
    redis, bus, metrics = setup("orchestrator", args)
    model_dir = Path(args.model) if args.model else build_tiny_checkpoint()
    service = AssistantService(
        redis, bus, read_model_config(model_dir), VitaTokenizer.from_file(model_dir),
        OrchestratorConfig(default_max_tokens=args.default_max_tokens, encode_timeout_s=args.encode_timeout,
                           token_timeout_s=args.token_timeout), metrics)
    server = ServiceServer([GrpcService("vita.v1.Assistant",
                                        lambda s: assistant_pb2_grpc.add_AssistantServicer_to_server(service, s))],
                           host=args.host, port=args.grpc_port)
    await server.start()
    server.install_signal_handlers()
    log.info("serving", extra={"grpc_port": server.port, "model": str(model_dir)})
    try:
        await server.wait()
    finally:
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
