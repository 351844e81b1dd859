"""benchmarks/learning_arms.py: each arm's commands are what `make train-tiny` runs after stage 1, chained through
the arm's own directories, and read by the real CLI and config loader; bad input and a failing stage are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

from vita import cli
from vita.training.config import load_stage_config

learning_arms = load_benchmark("learning_arms")


def test_an_arm_chains_its_stages_through_its_own_directory_on_its_data_seed(tmp_path: Path, monkeypatch) -> None:
    train, out = tmp_path / "train", tmp_path / "arms" / "seed-2"
    monkeypatch.setenv("VITA_TRAIN_DIR", str(train))
    monkeypatch.setenv("VITA_CURRICULUM", str(train / "curriculum"))
    commands = learning_arms.arm_commands(train, out, 2, tmp_path / "v", tmp_path / "a", 3,
                                          ["max_steps=40", "optim.lr=2.0e-3"])
    assert [name for name, _ in commands] == ["stage 2 vision", "stage 2 audio", "stage 3", "export", "eval"]
    parser = cli.build_parser()
    configs = []
    for _, args in commands:
        parsed = parser.parse_args(args)  # every command is one the vita CLI takes
        if args[0] == "train":
            configs.append(load_stage_config(parsed.config, parsed.set))
    vision, audio, stage3 = configs
    assert [c.data.seed for c in configs] == [2, 2, 2] and [c.threads for c in configs] == [3, 3, 3]
    assert not any(c.progress for c in configs)
    assert (vision.init.model, vision.init.vision_encoder) == (str(train / "stage1" / "final"), str(tmp_path / "v"))
    assert (audio.init.model, audio.init.audio_encoder) == (str(out / "s2v" / "final"), str(tmp_path / "a"))
    assert stage3.init.model == str(out / "s2a" / "final") and stage3.output_dir == str(out / "s3")
    assert stage3.data.media_cache == str(train / "stage3" / "media")
    assert (stage3.max_steps, stage3.optim.lr) == (40, 2.0e-3)
    # the stage 3 overrides are stage 3's alone; the rest is the tiny recipe's
    assert vision.max_steps == load_stage_config(learning_arms.CONFIGS / "stage2_vision_tiny.yaml").max_steps
    export, evaluation = (args for _, args in commands[3:])
    assert export[export.index("--checkpoint") + 1] == str(out / "s3")
    assert evaluation[evaluation.index("--model") + 1] == str(out / "model")
    assert evaluation[evaluation.index("--threads") + 1] == "3"


def test_a_stage_that_fails_names_the_arm_and_its_log(tmp_path: Path) -> None:
    out = tmp_path / "seed-0"
    commands = [("export", ["export", "--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path / "m")])]
    with pytest.raises(learning_arms.ArmFailed, match=rf"seed-0: export failed, see {out / 'log'}"):
        learning_arms.run_arm(commands, out, {})
    assert "== export: vita export --checkpoint" in (out / "log").read_text()


def test_without_a_finished_train_tiny_it_says_what_is_missing(tmp_path: Path, capsys) -> None:
    assert learning_arms.main(["--output", str(tmp_path / "o"), "--train-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stage1/final" in err and "run `make train-tiny` first" in err
    assert learning_arms.main(["--output", str(tmp_path / "o"), "--train-dir", str(tmp_path),
                               "--stage3", "max_steps"]) == 2


def test_finished_arms_are_read_back_not_run_again_and_their_mean_printed(tmp_path: Path, capsys) -> None:
    train = tmp_path / "train"
    for part in ("stage1/final", "curriculum", "stage3/media", "vision-encoder", "audio-encoder"):
        (train / part).mkdir(parents=True)
    out = tmp_path / "arms"
    metrics = {0: [0.5, 0.9, 0.4, 1.0, 0.9], 1: [0.7, 0.8, 0.6, 0.9, 1.0]}
    for seed, values in metrics.items():
        (out / f"seed-{seed}").mkdir(parents=True)
        (out / f"seed-{seed}" / "eval.json").write_text(json.dumps(
            {"metrics": {**dict(zip(learning_arms.COLUMNS, values)), "asr_wer": 1.0}}))
    assert learning_arms.main(["--output", str(out), "--train-dir", str(train), "--data-seeds", "0", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2] == "| 0 | 0.500 | 0.900 | 0.400 | 1.000 | 0.900 |"
    assert table[-1] == "| mean | 0.600 | 0.850 | 0.500 | 0.950 | 0.950 |"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["1"]["image_qa"] == 0.7 and summary["vision_encoder"] == str(train / "vision-encoder")
    assert not (out / "seed-0" / "log").exists()  # nothing ran
