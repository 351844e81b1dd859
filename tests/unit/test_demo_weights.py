"""What the in-process demo says about the weights it loaded: random only when no training record is there."""

import json

from vita.demo import weights_note


def test_a_directory_without_a_training_record_is_random(tmp_path):
    assert weights_note(tmp_path) == "random weights: the words are noise"


def test_a_trained_model_names_its_stage_and_steps(tmp_path):
    (tmp_path / "training.json").write_text(json.dumps({"stage": 3, "name": "multimodal", "steps": 900}))
    assert weights_note(tmp_path) == "trained: stage 3 (multimodal), 900 steps, training.json"


def test_another_or_unreadable_record_still_says_trained(tmp_path):
    (tmp_path / "training.json").write_text(json.dumps({"recipe": "duplex", "steps": 300}))  # the duplex fine-tune's
    assert weights_note(tmp_path) == "trained: training.json"
    (tmp_path / "training.json").write_text("{not json")
    assert weights_note(tmp_path) == "trained: training.json"
