"""Sharded safetensors I/O in the Hugging Face layout, and the errors a broken model directory produces."""

from __future__ import annotations

import json
import re

import pytest
import torch

from vita.errors import CheckpointError
from vita.model.checkpoint import INDEX_FILE, SINGLE_FILE, load_sharded, save_sharded, validate_state_dict


def make_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    stacked = torch.randn(4, 8, 16, generator=gen)
    return {
        "embed.weight": torch.randn(32, 16, generator=gen),
        "norm.weight": torch.ones(16, dtype=torch.bfloat16),
        "positions": torch.arange(10),
        # views of one stacked tensor, as llm_state_dict_to_hf produces them
        **{f"experts.{e}.weight": w for e, w in enumerate(stacked.unbind(0))},
        "transposed": torch.randn(16, 8, generator=gen).t(),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_single_file_round_trip(tmp_path):
    sd = make_state_dict()
    assert save_sharded(sd, tmp_path) == [tmp_path / SINGLE_FILE]
    assert not (tmp_path / INDEX_FILE).exists()
    assert_same(load_sharded(tmp_path), sd)


def test_sharded_round_trip_writes_a_hf_index(tmp_path):
    sd = make_state_dict()
    files = save_sharded(sd, tmp_path, max_shard_bytes=1024)
    assert len(files) > 2
    assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert not (tmp_path / SINGLE_FILE).exists()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert index["weight_map"].keys() == sd.keys()
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert_same(load_sharded(tmp_path), sd)


def test_saving_again_in_the_other_layout_leaves_no_stale_files(tmp_path):
    sd = make_state_dict()
    save_sharded(sd, tmp_path, max_shard_bytes=1024)
    save_sharded(sd, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    save_sharded(sd, tmp_path, max_shard_bytes=1024)
    assert not (tmp_path / SINGLE_FILE).exists()
    assert_same(load_sharded(tmp_path), sd)


def test_validate_names_every_problem_in_one_error():
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(5), "d": torch.zeros(2, dtype=torch.float32)}
    loaded = {"a": torch.zeros(3, 2), "c": torch.zeros(5), "d": torch.zeros(2, dtype=torch.int64), "z": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        validate_state_dict(expected, loaded)
    message = str(info.value)
    assert "1 missing tensors: b" in message
    assert "1 unexpected tensors: z" in message
    assert "1 wrong shapes: a (expected (2, 3), got (3, 2))" in message
    assert "1 wrong dtypes: d (expected torch.float32, got torch.int64)" in message


def test_validate_accepts_another_float_precision_and_truncates_long_lists():
    expected = {f"layer.{i}": torch.zeros(2) for i in range(20)}
    validate_state_dict(expected, {k: v.to(torch.bfloat16) for k, v in expected.items()})
    with pytest.raises(CheckpointError, match=r"20 missing tensors: layer\.0, layer\.1, .* and 15 more"):
        validate_state_dict(expected, {})


def test_truncated_shard_is_named(tmp_path):
    shard = save_sharded(make_state_dict(), tmp_path, max_shard_bytes=1024)[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=re.escape(f"{shard.name}: truncated or corrupt")):
        load_sharded(tmp_path)


def test_corrupt_single_file_is_named(tmp_path):
    (tmp_path / SINGLE_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=re.escape(f"{SINGLE_FILE}: truncated or corrupt")):
        load_sharded(tmp_path)


def test_index_naming_a_missing_shard_is_named(tmp_path):
    files = save_sharded(make_state_dict(), tmp_path, max_shard_bytes=1024)
    files[-1].unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"names shard {files[-1].name}, which does not exist")):
        load_sharded(tmp_path)


def test_shard_lacking_an_indexed_tensor_is_named(tmp_path):
    first = save_sharded(make_state_dict(), tmp_path, max_shard_bytes=1024)[0]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["ghost"] = first.name
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"{first.name} lacks ghost")):
        load_sharded(tmp_path)


def test_directory_without_weights_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor"):
        load_sharded(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_sharded(tmp_path)


def test_a_path_without_a_model_says_what_it_is(tmp_path):
    """A user's try (2026-12-04): `vita generate --model RUN` (a training run's output_dir) read "cannot read the
    model config ([Errno 2] ...)"; a missing directory and a file were not told apart."""
    from vita.model.vita import read_model_config

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG")
    for path, message in [(run, f"a training run's output directory; its model is {run / 'final'}"),
                          (tmp_path / "nope", "no such directory"),
                          (tmp_path / "picture.png", "a file, not a model directory"),
                          (run / "final" / "..", "its model is"),
                          (tmp_path, "no config.json here")]:
        with pytest.raises(CheckpointError, match=message):
            read_model_config(path)


def test_loading_weights_from_a_missing_directory_says_so(tmp_path):
    """`init.audio_encoder` at a directory `vita pretrain-audio` had not made read "neither model.safetensors nor
    model.safetensors.index.json found"."""
    with pytest.raises(CheckpointError, match=r"nope: no such directory$"):
        load_sharded(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match=r"f: a file, not a checkpoint directory$"):
        load_sharded(tmp_path / "f")
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor"):
        load_sharded(tmp_path)
