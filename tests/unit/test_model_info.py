"""Parameter counts of the full-size preset, built on the meta device, against MISSION.md."""

import pytest

from vita.cli import main
from vita.model.config import VitaConfig
from vita.model.info import count_parameters


@pytest.fixture(scope="module")
def full():
    return count_parameters(VitaConfig.preset("mixtral-8x7b"))


def test_llm_total_and_active(full):
    # 46.9B total with the 51,747-token vocabulary; active per token: 2 of 8 experts plus everything shared.
    assert full.llm_total == pytest.approx(46.9e9, rel=0.01)
    assert full.llm_active == pytest.approx(12.9e9, rel=0.02)
    # Exact arithmetic from the config, so a silently missing module cannot pass.
    h, inter, layers, vocab = 4096, 14336, 32, 51747
    attn = 2 * h * h + 2 * h * 1024
    per_layer = attn + 8 * 3 * h * inter + 8 * h + 2 * h
    assert full.llm_total == layers * per_layer + 2 * vocab * h + h
    assert full.llm_total - full.llm_active == layers * 6 * 3 * h * inter


def test_encoders(full):
    assert full.vision_encoder == pytest.approx(0.30e9, rel=0.03)
    assert full.audio_encoder == pytest.approx(0.341e9, rel=0.03)
    assert full.vision_connector > 0 and full.audio_connector > 0


def test_tiny_preset_is_small():
    tiny = count_parameters(VitaConfig.preset("tiny"))
    total = tiny.llm_total + tiny.vision_encoder + tiny.vision_connector + tiny.audio_encoder + tiny.audio_connector
    assert total < 50e6


def test_cli_prints_counts(capsys):
    assert main(["model-info", "--preset", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "LLM total" in out and "46.86B" in out and "audio encoder" in out


def test_cli_unknown_preset(capsys):
    assert main(["model-info", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
