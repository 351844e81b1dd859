"""`vita serve audio-encoder` and `vita serve vision-encoder`: one worker of an encoder pool, with the optional
KServe v2 port. `python -m vita.encoders {audio-encoder,vision-encoder} [flags]` runs the same entry points."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vita.encoders.audio import AudioTowerEncoder
from vita.encoders.base import Encoder, load_encoder
from vita.encoders.vision import VisionTowerEncoder
from vita.encoders.worker import EncoderWorker, WorkerConfig
from vita.model.fingerprint import model_fingerprint
from vita.model.placement import TORCH_DTYPES
from vita.runtime.args import PORT, add_common_args
from vita.runtime.serve import Context, Service, run_service
from vita.runtime.server import GRACE_S
from vita.usage import ArgumentParser

ENCODERS: dict[str, tuple[type[Encoder], str]] = {
    "audio-encoder": (AudioTowerEncoder,
                      "An audio-encoder worker: takes audio jobs from its pool's Redis stream, encodes every job "
                      "read together in one audio-tower forward and writes each job's embeddings back to Redis."),
    "vision-encoder": (VisionTowerEncoder,
                       "A vision-encoder worker: takes image and video jobs from its pool's Redis stream, encodes "
                       "every job read together in one InternViT forward and writes each job's embeddings back "
                       "to Redis."),
}


def parse_args(encoder_cls: type[Encoder], description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog=f"vita serve {encoder_cls.pool}", description=description)
    p.add_argument("--model", default=None,
                   help="model directory whose tower is served (default: the tiny model, built on first use)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="jobs taken from the stream at once; all their items are encoded in one forward pass")
    p.add_argument("--kserve-port", type=PORT, default=0,
                   help="serve the KServe Open Inference Protocol v2 over gRPC on this port of --host "
                        f"(model name {encoder_cls.pool.value!r}; no REST); 0 disables it")
    p.add_argument("--device", default="cpu", help="torch device of the tower, e.g. cuda")
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32", help="tower weights and embeddings")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.max_batch < 1:
        p.error("--max-batch must be at least 1")
    return args


def serve_pool(pool: str, argv: Sequence[str] | None) -> int:
    """Parse the flags of encoder pool `pool` and serve it until SIGTERM."""
    encoder_cls, description = ENCODERS[pool]
    args = parse_args(encoder_cls, description, argv)

    async def build(ctx: Context) -> Service:
        encoder = load_encoder(encoder_cls, ctx.model_dir, args.device, args.dtype)
        config = WorkerConfig(max_batch=args.max_batch, model_fingerprint=model_fingerprint(ctx.model_dir))
        worker = EncoderWorker(ctx.redis, ctx.bus, encoder, config, ctx.metrics)
        kserve_port = 0
        if args.kserve_port:  # imported only here: kserve must stay out of processes that use tritonclient
            from vita.encoders.kserve import KServeEndpoint

            kserve = KServeEndpoint(encoder, ctx.metrics, host=args.host, port=args.kserve_port)
            await kserve.start()
            ctx.resources.push_async_callback(kserve.stop, GRACE_S)
            kserve_port = kserve.port
        return Service(worker=worker, log={"pool": encoder.pool.value, "kserve_port": kserve_port,
                                           "max_batch": args.max_batch})

    return run_service(encoder_cls.pool.value, args, build, threads=args.threads)


def audio_encoder(argv: Sequence[str] | None = None) -> int:
    """`vita serve audio-encoder`."""
    return serve_pool("audio-encoder", argv)


def vision_encoder(argv: Sequence[str] | None = None) -> int:
    """`vita serve vision-encoder`."""
    return serve_pool("vision-encoder", argv)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vita.encoders POOL [flags]`: what `vita up` starts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ENCODERS:
        print(f"usage: python -m vita.encoders {{{','.join(ENCODERS)}}} [flags]", file=sys.stderr)
        return 2
    return serve_pool(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
