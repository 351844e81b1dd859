"""`vita export`: the model repository loads in the serving path and in transformers with the same logits, and
its manifest catches a changed file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import training_helpers as th
from vita.errors import CheckpointError
from vita.inference import GenerationRequest, VitaPipeline
from vita.model.generation import SamplingParams
from vita.model.vita import VitaForCausalLM
from vita.processing.tokenizer import VitaTokenizer
from vita.training.checkpoints import save_model_dir
from vita.training.export import export_model, resolve_checkpoint, verify_repository

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A stage output directory: final/ plus a checkpoint, as the trainer writes them (micro model, seed 5)."""
    run = tmp_path_factory.mktemp("run")
    tok = th.tokenizer()
    model = th.micro_model(tok.vocab_size, seed=5)
    save_model_dir(run / "final", model.state_dict(), model.vita_config, tok)
    (run / "final" / "training.json").write_text(json.dumps({"stage": 3, "steps": 1}))
    return run


@pytest.fixture(scope="module")
def repo(trained, tmp_path_factory) -> Path:
    return export_model(trained, tmp_path_factory.mktemp("out") / "repo", max_shard_bytes=300_000)


def test_layout_and_manifest(repo):
    names = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json", "training.json", "manifest.json", "triton/tensorrt_llm/config.pbtxt"} <= names
    assert sum(n.endswith(".safetensors") for n in names) > 1  # sharded
    manifest = verify_repository(repo)
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert manifest["versions"]["torch"] == torch.__version__
    config = json.loads((repo / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 4 and config["vita"]["vision"]["hidden_size"] == 32
    assert (repo / "triton/tensorrt_llm/config.pbtxt").read_text() == \
        (ROOT / "model_repository/tensorrt_llm/config.pbtxt").read_text()


def test_serving_path_gives_identical_logits(trained, repo, wide_png, speech_wav):
    source = VitaForCausalLM.from_pretrained(trained / "final")
    exported = VitaForCausalLM.from_pretrained(repo)
    assert exported.vision_tower is not None and exported.audio_tower is not None
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    assert torch.equal(source(ids).logits, exported(ids).logits)
    # the serving pipeline (what `vita serve llm --model REPO` loads) on a multimodal request, greedy
    request = GenerationRequest(text="What colour is the square?", images=[str(wide_png)], audio=[str(speech_wav)],
                                sampling=SamplingParams(max_new_tokens=8))
    tokens = [[t for e in VitaPipeline.load(d).stream(request) for t in e.token_ids] for d in (trained / "final",
                                                                                              repo)]
    assert tokens[0] == tokens[1] and len(tokens[0]) > 0


def test_transformers_reads_the_config_and_the_text_model(repo):
    """What TensorRT-LLM's Mixtral convert_checkpoint.py reads: a MixtralConfig and HF-named expert tensors."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(repo)
    assert type(config).__name__ == "MixtralConfig" and config.vocab_size == 1024
    hf = transformers.MixtralForCausalLM.from_pretrained(repo, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    ours = VitaForCausalLM.from_pretrained(repo)
    torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-4)


def test_a_changed_file_fails_the_manifest_check(repo, tmp_path):
    import shutil

    copy = shutil.copytree(repo, tmp_path / "copy")
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in a tensor: safetensors itself would not notice
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: sha256 .* does not match the manifest"):
        verify_repository(copy)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(CheckpointError, match="truncated or was changed"):
        verify_repository(copy)
    shutil.copy2(repo / shard.name, shard)
    verify_repository(copy)
    (copy / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer.model: listed in manifest.json but missing"):
        verify_repository(copy)


def test_resolve_checkpoint_accepts_run_final_and_step_dirs(trained, tmp_path):
    assert resolve_checkpoint(trained) == trained / "final"
    assert resolve_checkpoint(trained / "final") == trained / "final"
    with pytest.raises(CheckpointError, match="no model here"):
        resolve_checkpoint(tmp_path)


def test_cli_export_verify_and_errors(trained, tmp_path, capsys):
    from vita.cli import main

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "services"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "vita.cli", "export", "--checkpoint", str(trained), "--output",
                          str(tmp_path / "r")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    verify_repository(tmp_path / "r")
    assert VitaTokenizer.from_file(tmp_path / "r").vocab_size == 1024
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(trained), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    (tmp_path / "r" / "config.json").write_text("{}")
    assert main(["export", "--verify", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: 2 bytes, the manifest says" in err
    assert main(["export", "--verify", str(tmp_path)]) == 2
    assert "not an exported model repository" in capsys.readouterr().err


def test_overwrite_never_destroys_the_checkpoint_or_a_directory_it_did_not_write(trained, tmp_path, capsys):
    """A new user's try (2026-12-04): `--checkpoint OUT/checkpoints/stage3 --output OUT --overwrite` used to replace
    OUT, the checkpoint and every other file in it included."""
    from vita.cli import main

    claim = tmp_path / "claim"
    (claim / "checkpoints").mkdir(parents=True)
    stage = claim / "checkpoints" / "stage3"
    model = VitaForCausalLM.from_pretrained(trained / "final")
    save_model_dir(stage / "final", model.state_dict(), model.vita_config, VitaTokenizer.from_file(trained / "final"))
    (claim / "precious.txt").write_text("keep me")
    for output in (claim, stage, stage / "final"):
        capsys.readouterr()
        assert main(["export", "--checkpoint", str(stage), "--output", str(output), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds the checkpoint being exported" in err, err
    assert (claim / "precious.txt").read_text() == "keep me" and (stage / "final" / "config.json").is_file()
    # a directory that is not a repository this command wrote is not replaced; an exported one is
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(stage), "--output", str(other), "--overwrite"]) == 2
    assert "is not a model repository `vita export` wrote" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"
    assert main(["export", "--checkpoint", str(stage), "--output", str(claim / "model")]) == 0
    assert main(["export", "--checkpoint", str(stage), "--output", str(claim / "model"), "--overwrite"]) == 0
    verify_repository(claim / "model")
    # an output under a file: one line, not an OS error number
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(stage), "--output", str(claim / "precious.txt" / "x")]) == 2
    assert "precious.txt is a file, not a directory" in capsys.readouterr().err


def test_exported_weights_are_readable_by_other_users(repo):
    """safetensors writes 0600; the repository is read by other containers' uids (Triton, the engine Job)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for shard in repo.glob("*.safetensors"):
        assert shard.stat().st_mode & 0o777 == 0o666 & ~mask, shard
