"""Stage configs: every shipped file loads; mistakes are one ConfigError naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vita.training.config import PARAMETER_GROUPS, ConfigError, InitConfig, StageConfig, load_stage_config

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
EXPECTED = {  # stage, trainable groups (MISSION.md "Training")
    "stage1_llm": (1, ["llm"]),
    "stage2_vision": (2, ["vision_connector"]),
    "stage2_audio": (2, ["audio_encoder", "audio_connector"]),
    "stage3_multimodal": (3, ["llm", "vision_connector", "audio_connector"]),
}
# The tiny run's stage 3 trains what the full one does: its random towers stay frozen (docs/training.md "Why the
# model ignored its inputs"), so the tiny configs differ from the full ones in size only.
EXPECTED_TINY = EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("variant", ["", "_tiny"])
def test_shipped_configs_load(name, variant, monkeypatch):
    for var in ("MIXTRAL_DIR", "INTERNVIT_DIR", "VITA_DATA", "VITA_TRAIN_DIR"):
        monkeypatch.setenv(var, f"/data/{var.lower()}")
    config = load_stage_config(CONFIGS / f"{name}{variant}.yaml")
    stage, trainable = (EXPECTED_TINY if variant else EXPECTED)[name]
    assert (config.stage, config.trainable) == (stage, trainable)
    assert config.data.manifests and all(m.endswith(".jsonl") for m in config.data.manifests)
    if variant:
        assert config.data.packing_length <= 4096 and config.precision == "fp32" and not config.fsdp
    else:
        assert config.data.packing_length == 6144 and config.precision == "bf16" and config.fsdp
        assert config.output_dir.startswith("/data/vita_train_dir")
    if name == "stage1_llm":
        assert config.vocab.enabled
        assert config.vocab.target_vocab_size == (None if variant else 51747)
    if name == "stage2_vision":  # the pretrained encoder joins with its connector: InternViT, or the tiny stand-in
        assert config.init.vision_encoder == ("/data/vita_train_dir/vision-encoder" if variant
                                              else "/data/internvit_dir")
    if name == "stage2_audio":  # tiny: the stand-in for what full-size ASR alignment teaches, with its own CMVN
        assert config.init.audio_encoder == ("/data/vita_train_dir/audio-encoder" if variant else None)
        assert config.fit_audio_cmvn == (not variant)
    if name == "stage3_multimodal":
        assert config.state_tokens and config.spoken.p_spoken == 0.5
        assert (config.spoken.p_negative == 0) == bool(variant)  # tiny: the curriculum brings its chatter


def test_defaults_are_the_mission_numbers():
    config = StageConfig(stage=1, init=InitConfig(preset="tiny"))
    assert config.data.packing_length == 6144
    assert set(PARAMETER_GROUPS) == {"llm", "vision_encoder", "vision_connector", "audio_encoder", "audio_connector"}


def _write(tmp_path: Path, text: str, suffix: str = ".yaml") -> Path:
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("stage: 1\ninit: {preset: tiny}\nmax_step: 3\n", r"c\.yaml: unknown key max_step"),
    ("stage: 1\ninit: {preset: tiny}\noptim: {lr: fast}\n", r"optim\.lr must be float, got 'fast'"),
    ("stage: 1\ninit: {preset: tiny}\ntrainable: [llm, eyes]\n", r"trainable must name parameter groups"),
    ("stage: 4\ninit: {preset: tiny}\n", r"stage must be 1, 2 or 3"),
    ("stage: 3\ninit: {preset: tiny}\ndata: {manifests: [a/x.jsonl], repeat: {y.jsonl: 2}}\n",
     r"data\.repeat names 'y\.jsonl', which is not the file name of exactly one of data\.manifests \(x\.jsonl\)"),
    ("stage: 3\ninit: {preset: tiny}\ndata: {manifests: [a/x.jsonl, b/x.jsonl], repeat: {x.jsonl: 2}}\n",
     r"data\.repeat names 'x\.jsonl', which is not the file name of exactly one"),
    ("stage: 3\ninit: {preset: tiny}\ndata: {manifests: [a/x.jsonl], repeat: {x.jsonl: 0}}\n",
     r"data\.repeat\['x\.jsonl'\] must be an integer >= 1, got 0"),
    ("stage: 3\ninit: {preset: tiny}\nspoken: {p_asked_aside: 1.5}\n", r"spoken\.p_asked_aside must be in \[0, 1\], got 1\.5"),
    ("stage: 1\n", r"init needs a model directory"),
    ("stage: 1\ninit: {preset: tiny}\ndata: {manifests: x.jsonl}\n", r"data\.manifests must be a list"),
    ("stage: 1\ninit: {model: '${NO_SUCH_VAR_G1}'}\n", r"environment variable NO_SUCH_VAR_G1 is not set"),
    ("stage: [1\n", r"not valid YAML"),
    ("", r"the config is empty"),
])
def test_mistakes_name_the_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_stage_config(_write(tmp_path, text))
    assert str(tmp_path / "c.yaml") in str(info.value) and "\n" not in str(info.value)


def test_json_env_defaults_and_overrides(tmp_path, monkeypatch):
    path = _write(tmp_path, '{"stage": 2, "init": {"model": "${G1_MODEL:-/m}"}, "max_steps": 5}', ".json")
    config = load_stage_config(path, ["max_steps=7", "data.grad_accum=3", "optim.group_lr={llm: 0.5}"])
    assert (config.init.model, config.max_steps, config.data.grad_accum) == ("/m", 7, 3)
    assert config.optim.group_lr == {"llm": 0.5}
    monkeypatch.setenv("G1_MODEL", "/elsewhere")
    assert load_stage_config(path).init.model == "/elsewhere"
    with pytest.raises(ConfigError, match="not key=value"):
        load_stage_config(path, ["max_steps"])


def test_exponents_without_a_dot_are_floats(tmp_path):
    """A user's try (2026-12-04): `lr: 1e-3` was refused (YAML 1.1 reads it as a string), in the file and in --set."""
    path = _write(tmp_path, "stage: 1\ninit: {preset: tiny}\noptim: {lr: 1e-3, group_lr: {llm: 5E-4}}\n")
    config = load_stage_config(path)
    assert config.optim.lr == 0.001 and config.optim.group_lr == {"llm": 0.0005}
    assert load_stage_config(path, ["optim.lr=3e-4", "max_steps=12"]).optim.lr == 0.0003
    assert load_stage_config(path, ["name=1e3x"]).name == "1e3x"  # not a number: still a string


@pytest.mark.parametrize("override, message", [
    ("max_steps=abc", r"^--set: max_steps must be int, got 'abc'$"),
    ("maxsteps=3", r"^--set: unknown key maxsteps; StageConfig has"),
])
def test_a_bad_override_is_blamed_on_set_not_the_file(tmp_path, override, message):
    path = _write(tmp_path, "stage: 1\ninit: {preset: tiny}\nmax_steps: 8\n")
    with pytest.raises(ConfigError, match=message):
        load_stage_config(path, [override])
    bad = _write(tmp_path, "stage: 1\ninit: {preset: tiny}\nmax_steps: many\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: max_steps must be int"):  # the file's own fault stays its own
        load_stage_config(bad, ["name=x"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_stage_config(tmp_path / "nope.yaml")


def test_tensorboard_flag_writes_or_says_what_is_missing(tmp_path):
    import importlib.util

    from vita.training.metrics import MetricsLog, read_metrics

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="needs the tensorboard package"):
            MetricsLog(tmp_path, tensorboard=True)
        return
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"step": 1, "loss": 2.5})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.5}]
    assert any((tmp_path / "tensorboard").iterdir())


def test_repeat_upsamples_a_manifest(tmp_path):
    """`data.repeat` lists a manifest's samples that many times per epoch; the others once, in manifest order."""
    from vita.training.train import load_samples

    for name, n in (("a.jsonl", 2), ("b.jsonl", 3)):
        lines = [json.dumps({"kind": "text", "conversation": [{"role": "user", "content": f"{name} {k}"},
                                                              {"role": "bot", "content": "ok"}]}) for k in range(n)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    config = load_stage_config(_write(tmp_path, (
        f"stage: 3\ninit: {{preset: tiny}}\n"
        f"data: {{manifests: [{tmp_path}/a.jsonl, {tmp_path}/b.jsonl], repeat: {{a.jsonl: 3}}}}\n")))
    asked = [s.conversation[0]["content"] for s in load_samples(config)]
    assert asked == ["a.jsonl 0", "a.jsonl 1"] * 3 + ["b.jsonl 0", "b.jsonl 1", "b.jsonl 2"]
