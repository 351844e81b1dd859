"""`vita train` from a config and a JSONL manifest, under torchrun with 2 processes; mistakes are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import training_helpers as th

pytest.importorskip("vita.training.data", reason="the manifest reader (vita.training.data) is not in this tree")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT / "services"), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("cli")
    th.write_model(work / "init")
    manifest = th.write_manifest(work / "train.jsonl", th.mixed_samples(work / "media"))
    config = work / "stage2.yaml"
    config.write_text(f"""\
stage: 2
init: {{model: "{work / 'init'}"}}
trainable: [vision_connector, audio_connector]
data:
  manifests: ["{manifest}"]
  packing_length: 512
max_steps: 2
save_every: 1
output_dir: "{work / 'run'}"
threads: 1
progress: false
""")
    return work, config


def test_vita_train_under_torchrun(setup):
    work, config = setup
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "vita.cli", "train", "--stage", "2", "--config", str(config)],
                         capture_output=True, text=True, env=_env(), timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (work / "run" / "final" / "config.json").is_file()
    assert len((work / "run" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    (["--stage", "1"], "is a stage 2 config, not stage 1"),
    (["--stage", "2", "--set", "data.manifests=[/nonexistent.jsonl]"], "/nonexistent.jsonl"),
    (["--stage", "2", "--set", "optim.lr=fast"], "optim.lr must be float"),
])
def test_mistakes_are_one_line(setup, args, message):
    _, config = setup
    out = subprocess.run([sys.executable, "-m", "vita.cli", "train", "--config", str(config), *args],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_a_resume_on_other_samples_is_one_line_and_restart_trains_again_under_torchrun(setup, tmp_path):
    """`--resume` of a finished run whose manifest now holds other samples: exit 2 naming what changed; with
    `--on-input-change restart` both ranks drop the old run and train the stage again."""
    work, config = setup
    run, manifest = tmp_path / "run", tmp_path / "train.jsonl"
    th.write_manifest(manifest, th.mixed_samples(work / "media"))
    sets = ["--set", f"output_dir={run}", "--set", f"data.manifests=[{manifest}]"]
    train = [sys.executable, "-m", "vita.cli", "train", "--stage", "2", "--config", str(config), *sets]
    first = subprocess.run(train, capture_output=True, text=True, env=_env(), timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    th.write_manifest(manifest, th.mixed_samples(work / "media")[:-1])

    refused = subprocess.run([*train, "--resume"], capture_output=True, text=True, env=_env(), timeout=240)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-3000:]
    assert "(samples changed)" in refused.stderr and "--on-input-change restart" in refused.stderr

    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            *train[1:], "--resume", "--on-input-change", "restart"],
                           capture_output=True, text=True, env=_env(), timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert "training it again from its init" in again.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
