"""The trainer: per-stage freezing, exact resume (in process and after kill -9), DDP and FSDP over gloo.

Runs use a micro model (`training_helpers.micro_model`) on text, image, audio and two-turn samples; every run
is a few steps of a few hundred tokens, one thread per process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import training_helpers as th
from tests.integration.train_entry import prepare
from vita.errors import CheckpointError
from vita.model.checkpoint import load_sharded, save_sharded
from vita.model.inputs import SlotIds
from vita.training.config import (
    PARAMETER_GROUPS,
    ConfigError,
    DataConfig,
    InitConfig,
    OptimConfig,
    StageConfig,
)
from vita.training.examples import ExampleEncoder
from vita.training.forward import TrainingModel, batch_loss_sum
from vita.training.metrics import read_metrics
from vita.training.packing import Row, collate
from vita.training.trainer import freeze, run_stage

pytestmark = pytest.mark.slow

ENTRY = Path(__file__).with_name("train_entry.py")
ROOT = Path(__file__).resolve().parents[2]
TRAINABLE = ["llm", "vision_connector", "audio_encoder"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train")
    prepare(path)
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "services"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _command(work: Path, fields: dict, *, nproc: int = 1, resume: bool = False) -> list[str]:
    args = [str(ENTRY), str(work), json.dumps(fields)] + (["--resume"] if resume else [])
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def _train(work: Path, fields: dict, **kw) -> dict:
    out = subprocess.run(_command(work, fields, **kw), capture_output=True, text=True, env=_env(), timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _losses(run_dir: Path) -> list[float]:
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


def _fields(run: Path, **kw) -> dict:
    fields = {"output_dir": str(run), "trainable": TRAINABLE, "save_every": 2,
              "optim": {"lr": 3e-3, "warmup_steps": 2}, "data": {"packing_length": 400, "grad_accum": 2}}
    for key, value in kw.items():
        if isinstance(value, dict):
            fields[key] = {**fields.get(key, {}), **value}
        else:
            fields[key] = value
    return fields


# --- freezing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [
    ["llm"], ["vision_connector"], ["audio_encoder", "audio_connector"],
    ["llm", "vision_connector", "audio_connector"], ["vision_encoder"],
], ids=lambda g: "+".join(g))
def test_exactly_the_declared_groups_receive_gradients(work, groups):
    tok = th.tokenizer()
    model = th.micro_model(tok.vocab_size)
    freeze(model, groups)
    module = TrainingModel(model, SlotIds(tok.image_id, tok.video_id, tok.audio_id))
    encoder = ExampleEncoder(tok, model.vita_config)
    batch = collate([Row([encoder(s, i) for i, s in enumerate(th.mixed_samples(work / "media"))])], tok.eos_id)
    batch_loss_sum(module, batch).backward()
    prefixes = tuple(p for g in groups for p in PARAMETER_GROUPS[g])
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    declared = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert trained == declared
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trained and p.ndim >= 2)


# --- exact resume -------------------------------------------------------------------------------------------


def _config(work: Path, run: Path, max_steps: int = 6) -> StageConfig:
    return StageConfig(stage=2, init=InitConfig(model=str(work / "init")), trainable=TRAINABLE,
                       optim=OptimConfig(lr=3e-3, warmup_steps=2), max_steps=max_steps, save_every=2,
                       data=DataConfig(packing_length=400, grad_accum=2), output_dir=str(run), progress=False)


def test_stopped_and_resumed_run_draws_the_same_loss_curve(work, tmp_path):
    """Warmup + cosine schedule, gradient accumulation: stop after step 3 (last checkpoint: 2), resume."""
    samples = th.mixed_samples(work / "media")
    run_stage(_config(work, tmp_path / "a"), samples)
    run_stage(_config(work, tmp_path / "b"), samples, stop_after=3)
    assert len(_losses(tmp_path / "b")) == 3 and not (tmp_path / "b" / "final").exists()
    with pytest.raises(Exception, match="pass --resume"):
        run_stage(_config(work, tmp_path / "b"), samples)
    summary = run_stage(_config(work, tmp_path / "b"), samples, resume=True)
    assert summary["steps"] == 6
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    a, b = load_sharded(tmp_path / "a" / "final"), load_sharded(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Resuming the finished stage (a job's retry) trains nothing and keeps its record (it used to be rewritten
    # with final_loss null and wall_s 0).
    record = (tmp_path / "b" / "final" / "training.json").read_text()
    again = run_stage(_config(work, tmp_path / "b"), samples, resume=True)
    assert again["final_loss"] == summary["final_loss"] is not None
    assert (tmp_path / "b" / "final" / "training.json").read_text() == record
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")


def test_a_resume_that_lengthens_the_run_follows_the_new_schedule(work, tmp_path):
    """A user's try (2026-12-04): 3 steps, then `--resume --set max_steps=5` trained its first resumed step at the
    old schedule's floor (1e-4 of 1e-3, between 5.5e-4 and 2.3e-4). After the resume the rates are those of a run
    started with max_steps=5."""
    samples = th.mixed_samples(work / "media")
    run_stage(_config(work, tmp_path / "fresh", max_steps=5), samples)
    run_stage(_config(work, tmp_path / "longer", max_steps=3), samples)
    run_stage(_config(work, tmp_path / "longer", max_steps=5), samples, resume=True)
    fresh = [r["lr"] for r in read_metrics(tmp_path / "fresh" / "metrics.jsonl")]
    longer = [r["lr"] for r in read_metrics(tmp_path / "longer" / "metrics.jsonl")]
    assert len(longer) == 5
    assert longer[3:] == pytest.approx(fresh[3:], rel=1e-12)


def test_a_resume_whose_inputs_changed_is_refused_or_trains_the_stage_again(work, tmp_path):
    """A user's try (2026-12-06): after the vision stand-in was trained again, `make train-tiny` resumed each stage,
    found it finished, and exported the model the old stand-in had made. A resume now compares what the stage
    learns from with what its run started with: another init model or other samples are refused, naming what
    changed, or (`restart`) trained from the init again, as a fresh run on the new inputs is."""
    samples = th.mixed_samples(work / "media")
    init = tmp_path / "init"
    shutil.copytree(work / "init", init)

    def config(run: Path, **fields) -> StageConfig:
        return dataclasses.replace(_config(work, run, **fields), init=InitConfig(model=str(init)))

    run = tmp_path / "run"
    run_stage(config(run), samples)
    assert run_stage(config(run, max_steps=6), samples, resume=True)["steps"] == 6  # the same inputs: finished
    weights = load_sharded(init)  # the stage before trained again: other weights in its directory
    name = next(k for k, v in weights.items() if v.ndim == 2)
    weights[name] = weights[name] + 0.01
    save_sharded(weights, init)
    with pytest.raises(ConfigError, match=r"run holds a run of other inputs than this one's \(init\.model "
                                          r"changed\).*pass --on-input-change restart"):
        run_stage(config(run), samples, resume=True)
    with pytest.raises(ConfigError, match=r"\(init\.model, samples changed\)"):
        run_stage(config(run), samples[:-1], resume=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000004", "step-000006"]

    summary = run_stage(config(run), samples, resume=True, on_input_change="restart")
    run_stage(config(tmp_path / "fresh"), samples)
    assert summary["steps"] == 6 and _losses(run) == _losses(tmp_path / "fresh")
    a, b = load_sharded(run / "final"), load_sharded(tmp_path / "fresh" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Settings a resume may change (the optimisation, max_steps) are not inputs: the run goes on.
    longer = run_stage(config(run, max_steps=8), samples, resume=True)
    assert longer["steps"] == 8 and len(_losses(run)) == 8


def test_a_checkpoint_past_max_steps_is_refused_not_published(work, tmp_path):
    """A user's try (2026-12-04): a run stopped at step 4, resumed with a config whose max_steps is 3, 'finished'
    at once and published `final/` as a 3-step model. It now says what to do; nothing is published."""
    samples = th.mixed_samples(work / "media")
    run_stage(_config(work, tmp_path / "run"), samples, stop_after=4)
    with pytest.raises(ConfigError, match=r"step-000004 is at step 4, past this config's max_steps 3: resume with "
                                          r"--set max_steps=N \(N >= 4\)"):
        run_stage(_config(work, tmp_path / "run", max_steps=3), samples, resume=True)
    assert not (tmp_path / "run" / "final").exists()


def test_an_exported_model_repository_is_not_an_output_dir(work, tmp_path):
    """A user's try (2026-12-04): `--set output_dir=` an exported model wrote checkpoints into the repository."""
    repository = tmp_path / "exported"
    repository.mkdir()
    (repository / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"exported holds a model repository .*choose another output_dir"):
        run_stage(_config(work, repository), th.mixed_samples(work / "media"))
    assert sorted(p.name for p in repository.iterdir()) == ["manifest.json"]


def test_a_corrupt_or_incomplete_checkpoint_is_named(work, tmp_path, caplog):
    """A damaged trainer.pt is a one-line CheckpointError naming it (it was an internal ValueError); a newest
    checkpoint without one is passed over for the one before it, with a warning (it was passed over silently)."""
    samples = th.mixed_samples(work / "media")
    run = tmp_path / "run"
    run_stage(_config(work, run), samples, stop_after=4)
    newest = run / "checkpoints" / "step-000004"
    (newest / "trainer.pt").write_text("garbage\n")
    with pytest.raises(CheckpointError, match=r"step-000004/trainer\.pt: cannot read the trainer state: corrupt"):
        run_stage(_config(work, run), samples, resume=True)
    (newest / "trainer.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="vita.training"):
        summary = run_stage(_config(work, run), samples, resume=True)
    assert summary["steps"] == 6
    assert any("step-000004 is incomplete (no trainer.pt): resuming from step-000002" in r.getMessage()
               for r in caplog.records)


def test_sigterm_says_where_a_resume_goes_on_from(work, tmp_path):
    """`vita train` stopped by SIGTERM (a pod's eviction) exits as interrupted (130) with a line naming the last
    checkpoint, where it used to die without a word."""
    manifest = th.write_manifest(tmp_path / "train.jsonl", th.mixed_samples(work / "media"))
    config = tmp_path / "stage2.json"
    config.write_text(json.dumps({
        "stage": 2, "init": {"model": str(work / "init")}, "trainable": TRAINABLE, "max_steps": 10_000,
        "save_every": 2, "progress": False, "threads": 1, "output_dir": str(tmp_path / "run"),
        "optim": {"warmup_steps": 0, "min_lr_ratio": 1.0}, "data": {"manifests": [str(manifest)],
                                                                    "packing_length": 400}}))
    proc = subprocess.Popen([sys.executable, "-m", "vita.cli", "train", "--stage", "2", "--config", str(config)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    (line,) = [json.loads(x) for x in err.splitlines() if "interrupted at step" in x]
    assert "`--resume` goes on from" in line["msg"] and "step-0000" in line["checkpoint"]


def test_killed_run_resumes_to_the_uninterrupted_curve(work, tmp_path):
    """kill -9 while training (constant learning rate, so the run can be open-ended), then --resume."""
    constant = {"optim": {"warmup_steps": 0, "min_lr_ratio": 1.0}}
    reference = _fields(tmp_path / "ref", max_steps=6, **constant)
    killed = _fields(tmp_path / "killed", max_steps=10_000, **constant)
    proc = subprocess.Popen(_command(work, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    stopped_at = int(latest.read_text().strip().removeprefix("step-"))
    assert 2 <= stopped_at < 6

    _train(work, reference)
    _train(work, {**killed, "max_steps": 6}, resume=True)
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "ref")


# --- distributed --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(work, tmp_path_factory) -> Path:
    """One process, 2 micro-batches accumulated per step, 4 steps."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _train(work, _fields(run, max_steps=4))
    return run


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(work, reference, tmp_path):
    """2 ranks x 1 micro-batch vs 1 rank x 2 accumulated micro-batches; stated tolerance 1e-5 (seen: equal)."""
    ddp = _train(work, _fields(tmp_path / "two", max_steps=4, data={"grad_accum": 1}), nproc=2)
    assert ddp["world_size"] == 2
    assert _losses(tmp_path / "two") == pytest.approx(_losses(reference), abs=1e-5, rel=0)
    a, b = load_sharded(reference / "final"), load_sharded(tmp_path / "two" / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_fsdp_checkpoint_resumes_in_one_process(work, reference, tmp_path):
    """FSDP2 over gloo for 2 steps, then the same run resumed without FSDP in one process: the curve of the
    one-process run (the checkpoint holds full, unsharded states). Tolerance 1e-5."""
    run = tmp_path / "fsdp"
    # max_steps 2 then 4: both schedules are the same 2-step warmup for steps 1-2
    _train(work, _fields(run, max_steps=2, fsdp=True, data={"grad_accum": 1}), nproc=2)
    _train(work, _fields(run, max_steps=4), resume=True)
    assert _losses(run) == pytest.approx(_losses(reference), abs=1e-5, rel=0)


def test_fsdp_with_bf16_autocast_trains(work, tmp_path):
    """The GPU configuration's code path (FSDP + bf16 autocast) on CPU/gloo: it runs and the loss is finite."""
    summary = _train(work, _fields(tmp_path / "bf16", max_steps=2, fsdp=True, precision="bf16",
                                   data={"grad_accum": 1}), nproc=2)
    losses = _losses(tmp_path / "bf16")
    assert summary["world_size"] == 2 and len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert (tmp_path / "bf16" / "final" / "config.json").is_file()
