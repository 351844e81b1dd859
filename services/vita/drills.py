"""Fault drills against a running local stack on a private Redis: what tests/e2e/test_faults.py runs once per kind
and benchmarks/faults.py runs N times per kind.

Each drill injects one fault while a request is in flight and says whether every request completed or ended with a
clear status before its deadline, whether the session resumed, and whether the next request succeeded. Waits are on
events (a job pending in a consumer group, a token arriving, a process exiting); the only clock in a drill is the
length of an outage it injects.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image as PILImage
from redis import Redis

from vita.bus.codec import decode_entry
from vita.bus.lease import stop_bound_s
from vita.bus.streams import REPLY_TYPES, ROLE_POOLS, BusConfig, Pool
from vita.client import ConverseSession, VitaClient, session_config, speech_events, text_event
from vita.stack import LocalStack, RedisServer, ServiceProcess, wait_healthy
from vita.v1.assistant_pb2 import Completed, GenerateRequest, UtteranceJudged
from vita.v1.bus_pb2 import GenerationEvent, GenerationJob
from vita.v1.media_pb2 import Audio, Image, SamplingParams
from vita.v1.session_pb2 import SessionState

POOLS = {"audio-encoder": Pool.AUDIO_ENCODER, "vision-encoder": Pool.VISION_ENCODER,
         "llm-generator": Pool.LLM_GENERATOR, "llm-monitor": Pool.LLM_MONITOR}
# Statuses that say what happened; UNKNOWN and INTERNAL never count as clear.
# A lease-stopped generation may be this much later than the lease's own bound on a machine that is busy.
LEASE_MARGIN_S = 10.0
CLEAR = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
         grpc.StatusCode.FAILED_PRECONDITION}


@dataclass
class Outcome:
    drill: str
    ok: bool
    detail: str
    seconds: float = 0.0


@dataclass
class Drills:
    """`stack` runs on `server` (a RedisServer); `query_clip` is speech the monitor judges a query (16 kHz)."""

    stack: LocalStack
    server: RedisServer
    query_clip: np.ndarray
    hang_s: float = 300.0  # no drill waits longer than this for an event that must come
    log: list[Outcome] = field(default_factory=list)

    @property
    def bus(self) -> BusConfig:
        return BusConfig(prefix=self.stack.prefix)

    def client(self, timeout_s: float | None = None) -> VitaClient:
        return VitaClient(self.stack.target, timeout_s=timeout_s if timeout_s is not None else self.hang_s)

    def _record(self, drill: str, start: float, ok: bool, detail: str) -> Outcome:
        outcome = Outcome(drill, ok, detail, time.monotonic() - start)
        self.log.append(outcome)
        return outcome

    # ----------------------------------------------------------------------------------------------------------
    # kill -9 of a worker holding a job

    def kill_worker_mid_job(self, service: str, attempts: int = 3) -> Outcome:
        """A second replica of `service` starts; the replica that takes the turn's job is killed while the job is
        pending (read, not acknowledged); the survivor reclaims it, the turn completes, and the dead consumer is
        removed from the group."""
        start = time.monotonic()
        pool = POOLS[service]
        self.stack.add_replica(service)
        for attempt in range(attempts):
            request = self._request_for(service, attempt)
            done = threading.Event()
            result: dict[str, object] = {}

            def run(request: Callable[[], str] = request, done: threading.Event = done,
                    result: dict[str, object] = result) -> None:
                try:
                    result["end"] = request()
                except BaseException as e:
                    result["error"] = e
                finally:
                    done.set()

            threading.Thread(target=run, daemon=True).start()
            victim = self._kill_holder(pool, service, done)
            if not done.wait(self.hang_s):
                return self._record(f"kill {service}", start, False, f"the turn hung for {self.hang_s:g} s")
            if victim is None:
                continue  # the job finished before it was seen pending: try again with a new turn
            if "error" in result:
                return self._record(f"kill {service}", start, False, f"the turn failed: {result['error']!r}")
            if result.get("end") != "completed":
                return self._record(f"kill {service}", start, False, f"the turn ended {result.get('end')}")
            gone = self._wait(lambda v=victim: v not in self._consumers(pool), self.hang_s)
            return self._record(f"kill {service}", start, gone,
                                "completed; dead consumer removed" if gone else "dead consumer still in group")
        return self._record(f"kill {service}", start, False, f"no job seen pending in {attempts} turns")

    def _request_for(self, service: str, attempt: int) -> Callable[[], str]:
        """A turn whose job in `service`'s pool takes long enough to be caught pending."""
        if service == "llm-monitor":
            return lambda: self._spoken_turn()
        if service == "audio-encoder":
            speech = np.tile(self.query_clip, 8)
            audio = [Audio(data=_pcm16(speech), encoding=Audio.PCM16, sample_rate_hz=16000) for _ in range(3)]
            request = GenerateRequest(text=f"what was said? {attempt}", audio=audio,
                                      sampling=SamplingParams(max_tokens=4))
        elif service == "vision-encoder":
            images = [Image(data=_noise_png(1344, 896, seed=attempt * 8 + k)) for k in range(2)]  # 3584 tokens
            request = GenerateRequest(text=f"what is shown? {attempt}", images=images,
                                      sampling=SamplingParams(max_tokens=4))
        else:
            request = GenerateRequest(text=f"Tell me a long story, number {attempt}.",
                                      sampling=SamplingParams(max_tokens=160, ignore_eos=True))
        return lambda: self._generate(request)

    def _generate(self, request: GenerateRequest) -> str:
        with self.client() as client:
            last = None
            for response in client.generate(request):
                last = response
        assert last is not None and last.HasField("completed"), "the stream ended without a completion"
        return "completed"

    def _spoken_turn(self) -> str:
        with self.client() as client, ConverseSession(client) as s:
            s.send(*speech_events(self.query_clip, realtime=False, chunk_ms=100))
            judged = s.wait("judged", timeout_s=self.hang_s)
            if judged.judged.outcome == UtteranceJudged.QUERY:  # (a model not tuned for duplex may ignore it)
                s.wait("completed", turn_id=judged.turn_id, timeout_s=self.hang_s)
        return "completed"

    def _kill_holder(self, pool: Pool, service: str, done: threading.Event) -> str | None:
        """SIGKILL the process of `service` whose consumer holds a pending job of `pool`; its consumer name."""
        pids = {s.pid: s for s in self.stack.services if s.name.startswith(service)}
        stream = self.bus.jobs(pool)
        with Redis.from_url(self.server.url) as redis:
            while not done.is_set():
                try:
                    pending = redis.xpending_range(stream, pool.group, min="-", max="+", count=16)
                except Exception:
                    pending = []
                for entry in pending:
                    name = entry["consumer"].decode()
                    pid = int(name.rsplit("-", 2)[1])
                    if pid in pids:
                        self._kill(pids[pid])
                        return name
                time.sleep(0.002)
        return None

    def _kill(self, service: ServiceProcess) -> None:
        """SIGKILL; the survivor of its kind takes the kind's name, so `stack.service(kind)` still finds one."""
        os.killpg(service.pid, signal.SIGKILL)
        os.waitpid(service.pid, 0)
        self.stack.services.remove(service)
        kind = service.name.rsplit("-", 1)[0] if service.name[-1].isdigit() else service.name
        if not any(s.name == kind for s in self.stack.services):
            next(s for s in self.stack.services if s.name.startswith(kind)).name = kind

    def _consumers(self, pool: Pool) -> set[str]:
        with Redis.from_url(self.server.url) as redis:
            return {c["name"].decode() for c in redis.xinfo_consumers(self.bus.jobs(pool), pool.group)}

    # ----------------------------------------------------------------------------------------------------------
    # kill -9 of the orchestrator

    def kill_orchestrator_mid_answer(self) -> Outcome:
        """The call in flight (and a Generate) end UNAVAILABLE; after a restart the session resumes with the cut
        answer in its history, and its next question is answered."""
        start = time.monotonic()
        with self.client() as client:
            s = ConverseSession(client, session_config(max_tokens=400, ignore_eos=True))
            s.send(text_event("Tell me a long story."))
            s.wait("delta", timeout_s=self.hang_s)
            self.stack.kill("orchestrator")
            try:
                s.wait("completed", timeout_s=self.hang_s)
                return self._record("kill orchestrator", start, False, "the call outlived its orchestrator")
            except grpc.RpcError as e:
                if e.code() not in CLEAR:
                    return self._record("kill orchestrator", start, False, f"the call ended {e.code()}")
            except EOFError:
                return self._record("kill orchestrator", start, False, "the call ended with no status")
        self.stack.respawn("orchestrator", timeout_s=self.hang_s)
        with self.client() as client, ConverseSession(client, session_config(session_id=s.session_id,
                                                                             resume=True)) as resumed:
            started = resumed.of("session_started")[0].session_started
            resumed.send(text_event("And then?"))
            answer = resumed.wait("answer_started", timeout_s=self.hang_s)
            resumed.wait("completed", turn_id=answer.turn_id, timeout_s=self.hang_s)
        ok = started.resumed and started.history_turns == 2
        return self._record("kill orchestrator", start, ok,
                            f"resumed with {started.history_turns} turns; next question answered")

    def orphaned_generations(self, max_tokens: int = 4000) -> Outcome:
        """kill -9 of the orchestrator while it streams a Generate answer (the generator pool) and a Converse
        answer that interrupted another, so that the roles swapped and the monitor pool generates it. Nobody is
        left to cancel them: each worker stops its generation once the orchestrator's lease on it has expired (a
        CANCELLED finish on its reply stream, long before `max_tokens`, within `lease.stop_bound_s` plus
        LEASE_MARGIN_S of the kill, and the worker's log says why); after a restart the next request is answered."""
        start = time.monotonic()
        generate_id = f"orphan-{uuid.uuid4().hex[:12]}"
        streaming = threading.Event()

        def one_shot() -> None:  # its call ends UNAVAILABLE with the orchestrator
            request = GenerateRequest(request_id=generate_id, text="Tell me a very long story.",
                                      sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            try:
                with self.client() as client:
                    for _ in client.generate(request):
                        streaming.set()
            except grpc.RpcError:
                pass
            finally:
                streaming.set()

        with self.client() as client, ConverseSession(
                client, session_config(max_tokens=max_tokens, ignore_eos=True)) as s:
            s.send(text_event("Tell me a long story."))
            first = s.wait("answer_started", timeout_s=self.hang_s)
            s.wait("delta", turn_id=first.turn_id, timeout_s=self.hang_s)
            s.send(text_event("No, tell me another one."))  # interrupts the first answer: the roles swap
            second = s.wait("answer_started", where=lambda e: e.turn_id != first.turn_id, timeout_s=self.hang_s)
            s.wait("delta", turn_id=second.turn_id, timeout_s=self.hang_s)
            active = self._session(s.session_id).active
            threading.Thread(target=one_shot, daemon=True).start()
            if not streaming.wait(self.hang_s):
                return self._record("orphaned generations", start, False, "Generate never streamed")
            generation = self._generation_of(generate_id)
            killed_at = time.time()
            self.stack.kill("orchestrator")
        orphans = {generation: Pool.LLM_GENERATOR, active.request_id: ROLE_POOLS[active.role]}
        bound = stop_bound_s(self.bus) + LEASE_MARGIN_S
        details, ok = [], active.role == GenerationJob.MONITOR
        for request_id, pool in orphans.items():
            finished, finished_at = self._finished(request_id)
            after = finished_at - killed_at
            logged = self._logged(pool, request_id, "owner is gone")
            reason = Completed.FinishReason.Name(finished.finish_reason) if finished else "no finish"
            tokens = finished.usage.completion_tokens if finished else 0
            ok = ok and reason == "CANCELLED" and tokens < max_tokens and after <= bound and logged
            details.append(f"{pool.value} {reason} after {tokens} tokens, {after:.1f} s after the kill "
                           f"(bound {bound:g} s){'' if logged else ', not logged'}")
        self.stack.respawn("orchestrator", timeout_s=self.hang_s)
        with self.client() as client:
            _, done = client.ask("Still there?", max_tokens=4)
        ok = ok and done.usage.completion_tokens > 0
        return self._record("orphaned generations", start, ok, "; ".join(details) + "; next request answered")

    def _generation_of(self, request_id: str) -> str:
        """The bus's id of the Generate call whose caller's id is `request_id` (the orchestrator's own, unique per
        call: `vita.bus.streams.unique_id`), found by its reply stream."""
        pattern = self.bus.reply(f"{request_id}.gen.x").replace(".gen.x}", ".gen.*}")
        with Redis.from_url(self.server.url) as redis:
            [key] = [k.decode() for k in redis.scan_iter(match=pattern)]
        return key[key.index("{") + 1 : -1]

    def _session(self, session_id: str) -> SessionState:
        with Redis.from_url(self.server.url) as redis:
            return SessionState.FromString(redis.get(self.bus.session(session_id)))

    def _finished(self, request_id: str) -> tuple[Completed | None, float]:
        """The worker's last event for `request_id` (its finish, or None after an error or `hang_s` of silence),
        and when Redis received it (unix seconds, from the entry id)."""
        stream, after = self.bus.reply(request_id), "0-0"
        deadline = time.monotonic() + self.hang_s
        with Redis.from_url(self.server.url) as redis:
            while time.monotonic() < deadline:
                for _, entries in redis.xread({stream: after}, block=1000) or []:
                    for entry_id, fields in entries:
                        after = entry_id.decode()
                        event = decode_entry(fields, REPLY_TYPES)
                        if isinstance(event, GenerationEvent) and event.WhichOneof("event") in ("finished", "error"):
                            at = int(after.split("-")[0]) / 1000
                            return (event.finished if event.HasField("finished") else None), at
        return None, time.time()

    def _logged(self, pool: Pool, request_id: str, words: str) -> bool:
        """Whether a worker of `pool` logged a line with `words` about `request_id`."""
        name = next(service for service, p in POOLS.items() if p == pool)
        for service in self.stack.services:
            if service.name.startswith(name) and Path(service.log_path).exists():
                for line in Path(service.log_path).read_text(errors="replace").splitlines():
                    if request_id in line and words in line:
                        return True
        return False

    # ----------------------------------------------------------------------------------------------------------
    # Redis

    def redis_restart(self, *, keep_data: bool, down_s: float = 0.0) -> Outcome:
        """Redis killed mid-answer and started again (after `down_s`), with its data or without.

        With data: the answer completes, the call goes on. Without: the answer completes or ends with a clear
        status, the lost session is NOT_FOUND on resume, and a new session is answered.
        """
        name = f"redis restart ({'with' if keep_data else 'without'} data, down {down_s:g} s)"
        start = time.monotonic()
        with self.client() as client:
            s = ConverseSession(client, session_config(max_tokens=200, ignore_eos=True))
            s.send(text_event("Tell me a long story."))
            first = s.wait("answer_started", timeout_s=self.hang_s)
            s.wait("delta", timeout_s=self.hang_s)
            self.server.kill()
            if not keep_data:
                shutil.rmtree(self.server.data_dir, ignore_errors=True)
            time.sleep(down_s)  # the outage itself
            self.server.start()
            end = s.wait(("completed", "interrupted", "error"), turn_id=first.turn_id, timeout_s=self.hang_s)
            kind = end.WhichOneof("event")
            if kind == "error":
                kind = f"error {_status(end.error.code).name}"
            if kind.startswith("error") and _status(end.error.code) not in CLEAR:
                return self._record(name, start, False, f"the answer ended {end.error}")
            if keep_data and kind != "completed":
                return self._record(name, start, False, f"the answer ended {kind}: {end}")
            s.send(text_event("And then?"))
            nxt = s.wait(("answer_started", "error"), where=lambda e: e.turn_id != first.turn_id,
                         timeout_s=self.hang_s)
            if keep_data:
                s.wait("completed", turn_id=nxt.turn_id, timeout_s=self.hang_s)
                s.close()
                return self._record(name, start, True, f"answer {kind}; the session went on")
            s.cancel()
            if nxt.WhichOneof("event") != "error" or nxt.error.code != grpc.StatusCode.NOT_FOUND.value[0]:
                return self._record(name, start, False, f"a lost session answered {nxt}")
        with self.client() as client:  # the resume is refused before any session_started
            call = client.converse(iter([session_config(session_id=s.session_id, resume=True)]))
            refused = next(call)
            ok = refused.WhichOneof("event") == "error" and refused.error.code == grpc.StatusCode.NOT_FOUND.value[0]
            with ConverseSession(client) as fresh:
                fresh.send(text_event("Hello again."))
                answer = fresh.wait("answer_started", timeout_s=self.hang_s)
                fresh.wait("completed", turn_id=answer.turn_id, timeout_s=self.hang_s)
        return self._record(name, start, ok, f"answer {kind}; lost session NOT_FOUND; a new session answered")

    def redis_stall(self, seconds: float = 5.0) -> Outcome:
        """Redis paused (SIGSTOP: connections hang, as in a network stall) while an answer streams; it completes,
        and the next request is answered."""
        start = time.monotonic()
        first_token = threading.Event()
        result: dict[str, object] = {}

        def run() -> None:
            try:
                with self.client() as client:
                    request = GenerateRequest(text="Tell me a long story.",
                                              sampling=SamplingParams(max_tokens=200, ignore_eos=True))
                    for response in client.generate(request):
                        first_token.set()
                        if response.HasField("completed"):
                            result["completed"] = response.completed
            except BaseException as e:
                result["error"] = e
            finally:
                first_token.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        first_token.wait(self.hang_s)
        self.server.pause()
        time.sleep(seconds)  # the outage itself
        self.server.resume()
        thread.join(self.hang_s)
        if thread.is_alive() or "completed" not in result:
            return self._record(f"redis stalled {seconds:g} s", start, False, f"answer: {result or 'hung'}")
        with self.client() as client:
            _, done = client.ask("Still there?", max_tokens=4)
        ok = result["completed"].usage.completion_tokens == 200 and done.usage.completion_tokens > 0
        return self._record(f"redis stalled {seconds:g} s", start, ok, "answer completed; next request answered")

    # ----------------------------------------------------------------------------------------------------------
    # A consumer slower than its producer

    def slow_consumer(self, requests: int = 4, deadline_s: float = 4.0) -> Outcome:
        """The generator pool stops consuming (SIGSTOP) while requests with a deadline arrive: each ends
        DEADLINE_EXCEEDED by its deadline (plus a second), none hangs; once the pool consumes again its backlog
        drains to zero (expired jobs are answered DEADLINE_EXCEEDED by the worker) and the next request is
        answered."""
        start = time.monotonic()
        generators = [s for s in self.stack.services if s.name.startswith("llm-generator")]
        for g in generators:
            os.killpg(g.pid, signal.SIGSTOP)
        ends: list[tuple[grpc.StatusCode | None, float]] = []
        try:
            def one(k: int) -> None:
                t = time.monotonic()
                code = None
                try:
                    with self.client(timeout_s=deadline_s) as client:
                        client.ask(f"Question {k}", max_tokens=8)
                except grpc.RpcError as e:
                    code = e.code()
                ends.append((code, time.monotonic() - t))

            threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(requests)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(self.hang_s)
        finally:
            for g in generators:
                os.killpg(g.pid, signal.SIGCONT)
        late = [e for e in ends if e[0] != grpc.StatusCode.DEADLINE_EXCEEDED or e[1] > deadline_s + 1.0]
        pool = Pool.LLM_GENERATOR
        drained = self._wait(lambda: self._backlog(pool) == 0, self.hang_s)
        with self.client() as client:
            _, done = client.ask("Now?", max_tokens=4)
        ok = len(ends) == requests and not late and drained and done.finish_reason in (Completed.STOP,
                                                                                      Completed.LENGTH)
        return self._record("slow consumer", start, ok,
                            f"{len(ends)} requests ended, {len(late)} not DEADLINE_EXCEEDED in time; "
                            f"backlog drained: {drained}")

    def _backlog(self, pool: Pool) -> int:
        with Redis.from_url(self.server.url) as redis:
            groups = redis.xinfo_groups(self.bus.jobs(pool))
        g = next(g for g in groups if g["name"].decode() == pool.group)
        return (g["lag"] or 0) + g["pending"]

    @staticmethod
    def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


def _status(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)


def _pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def _noise_png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def drill_stack(model_dir: str, server: RedisServer, log_dir: str, prefix: str) -> LocalStack:
    """The stack the drills run on: a short reclaim time (a dead worker's job moves on after 1.5 s), dead
    consumers removed after 3 s, and waits long enough for a replacement to start on a busy machine."""
    common = ["--dead-consumer-ms", "3000"]
    extra = {name: list(common) for name in ("audio-encoder", "vision-encoder", "llm-generator", "llm-monitor")}
    extra["orchestrator"] = [*common, "--encode-timeout", "120", "--token-timeout", "120", "--judge-timeout", "120"]
    return LocalStack(model_dir=model_dir, redis_url=server.url, prefix=prefix, log_dir=log_dir,
                      reclaim_idle_ms=1500, extra_args=extra)


__all__ = ["CLEAR", "Drills", "Outcome", "drill_stack", "wait_healthy"]
