"""One trace per Converse turn across the orchestrator, the audio encoder, the monitor and the generator.

The scenario runs in a fresh interpreter (the global tracer provider can be installed once per process): the
orchestrator, an audio-encoder worker and both llm pools in one event loop, over loopback gRPC and the real Redis,
with an in-memory span exporter; it prints the finished spans as JSON.
"""

import asyncio
import json
import subprocess
import sys


def test_a_spoken_turn_is_one_trace(duplex_model_dir, query_clip, tmp_path, redis_prefix):
    clip = tmp_path / "q.npy"
    import numpy as np

    np.save(clip, query_clip)
    out = subprocess.run([sys.executable, __file__, str(duplex_model_dir), str(clip), redis_prefix], capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    spans = json.loads(out.stdout.strip().splitlines()[-1])
    turns = [s for s in spans if s["name"] == "converse turn"]
    assert len(turns) == 1
    turn = turns[0]
    children = {s["name"]: s for s in spans if s["parent"] == turn["span"]}
    assert {"encode audio", "generate llm:monitor", "generate llm:generator"} <= set(children)
    assert {s["trace"] for s in children.values()} == {turn["trace"]}


async def _scenario(model_dir: str, clip_path: str, prefix: str) -> None:
    import grpc
    import numpy as np
    from redis.asyncio import Redis

    from vita.bus.streams import BusConfig
    from vita.client import session_config, speech_events
    from vita.encoders.audio import AudioTowerEncoder
    from vita.encoders.base import load_encoder
    from vita.encoders.worker import EncoderWorker
    from vita.inference import VitaPipeline
    from vita.llm.backends.torch.backend import TorchBackend
    from vita.llm.worker import LLMWorker, WorkerConfig
    from vita.orchestrator.service import AssistantService
    from vita.runtime.server import GrpcService, ServiceServer
    from vita.v1 import assistant_pb2_grpc
    from vita.v1.assistant_pb2 import ClientEvent, EndOfInput
    from vita.v1.bus_pb2 import GenerationJob

    pipeline = VitaPipeline.load(model_dir)
    redis = Redis.from_url("redis://127.0.0.1:6379/0")
    bus = BusConfig(prefix=prefix)  # the test deletes its keys (redis_prefix fixture)
    service = AssistantService(redis, bus, pipeline.model.vita_config, pipeline.tokenizer)
    server = ServiceServer([GrpcService("vita.v1.Assistant",
                                        lambda s: assistant_pb2_grpc.add_AssistantServicer_to_server(service, s))])
    await server.start()
    workers, tasks, backends = [], [], []
    for role in (GenerationJob.GENERATOR, GenerationJob.MONITOR):
        backend = TorchBackend(pipeline.model, max_batch_size=4)
        await backend.start()
        backends.append(backend)
        workers.append(LLMWorker(redis, bus, backend, pipeline.tokenizer, WorkerConfig(role=role)))

    workers.append(EncoderWorker(redis, bus, load_encoder(AudioTowerEncoder, model_dir, "cpu", "float32")))
    tasks = [asyncio.create_task(w.run()) for w in workers]
    samples = np.load(clip_path)

    async def requests():
        yield session_config(max_tokens=4)
        for event in speech_events(samples, realtime=False, chunk_ms=100):
            yield event
        yield ClientEvent(end=EndOfInput())

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            kinds = [e.WhichOneof("event") async for e in
                     assistant_pb2_grpc.AssistantStub(channel).Converse(requests())]
        assert "completed" in kinds, kinds
    finally:
        for w in workers:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for b in backends:
            await b.close()
        await server.drain()
        await redis.aclose()


if __name__ == "__main__":
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from vita.telemetry.tracing import configure_tracing

    exporter = InMemorySpanExporter()
    configure_tracing("test", exporter=exporter)
    asyncio.run(_scenario(sys.argv[1], sys.argv[2], sys.argv[3]))
    print(json.dumps([{"name": s.name, "trace": s.context.trace_id, "span": s.context.span_id,
                       "parent": s.parent.span_id if s.parent else None} for s in exporter.get_finished_spans()]))
