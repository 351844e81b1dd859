"""The connectors' data-dependent init (`fit_connectors`): a random tower's outputs recentred and rescaled to the
token embeddings' norm, so the LLM can tell one image or clip from another from the first step."""

from __future__ import annotations

import pytest
import torch

from tests import training_helpers as th
from vita.processing.audio import audio_features
from vita.processing.image import preprocess_image
from vita.training.config import ConfigError, InitConfig, StageConfig
from vita.training.examples import load_waveform
from vita.training.model_init import fit_connectors, initial_model
from vita.training.sample import Sample


def _outputs(model, samples) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        pixels = torch.cat([preprocess_image(p, model.vita_config.vision) for s in samples for p in s.images])
        vision = model.vision_tower(pixels).flatten(0, 1)
        features = audio_features([load_waveform(r) for s in samples for r in s.audio], model.vita_config.audio)
        audio = torch.cat(model.audio_tower.encode_features(features))
    return vision, audio


def test_fitted_connectors_give_centred_outputs_at_the_token_embeddings_norm(tmp_path):
    samples = th.mixed_samples(tmp_path)
    samples += [Sample("image", [{"role": "user", "content": "<image>\nWhat is it?"},
                                    {"role": "bot", "content": "a square"}],
                          images=[th.write_image(tmp_path / f"i{k}.png", 10 + k)]) for k in range(3)]
    model = th.micro_model(1024)
    target = model.get_input_embeddings().weight.norm(dim=-1).mean()
    before_vision, before_audio = _outputs(model, samples)
    used = fit_connectors(model, samples, ["vision", "audio"])
    assert used == {"vision": 4, "audio": 1}
    for before, after in zip((before_vision, before_audio), _outputs(model, samples)):
        centred = after - after.mean(0)
        assert after.mean(0).norm() < 1e-3 * target  # the common component is gone
        torch.testing.assert_close(centred.norm(dim=-1).mean(), target, rtol=1e-4, atol=0)
        # an affine map of the same features: what tells two inputs apart is kept, only rescaled
        scale = centred.norm() / (before - before.mean(0)).norm()
        torch.testing.assert_close(centred, (before - before.mean(0)) * scale, rtol=1e-3, atol=1e-4)


def test_initial_model_fits_the_connectors_the_stage_names(tmp_path):
    samples = th.mixed_samples(tmp_path)
    init = th.write_model(tmp_path / "init")
    config = StageConfig(stage=2, init=InitConfig(model=str(init)), trainable=["vision_connector"],
                         fit_connectors=["vision"], output_dir=str(tmp_path / "run"))
    assert initial_model(config, samples, tmp_path / "work").notes["fit_connectors"] == {"vision": 1}


def test_fit_connectors_errors_name_the_problem(tmp_path):
    model = th.micro_model(1024)
    with pytest.raises(ConfigError, match="vision needs images"):
        fit_connectors(model, [th.text("Hi", "Hello")], ["vision"])
    with pytest.raises(ConfigError, match="fit_connectors names connectors among vision, audio"):
        StageConfig(stage=2, init=InitConfig(preset="tiny"), fit_connectors=["video"])


def test_a_stage_puts_the_pretrained_vision_encoder_named_by_init_into_the_tower(tmp_path):
    from vita.model.checkpoint import save_sharded
    from vita.model.vision import VisionEncoder

    samples = th.mixed_samples(tmp_path)
    init = th.write_model(tmp_path / "init")
    model_vision = initial_model(StageConfig(stage=2, init=InitConfig(model=str(init)), trainable=["vision_connector"],
                                             output_dir=str(tmp_path / "a")), samples, tmp_path / "wa").model
    torch.manual_seed(123)
    pretrained = VisionEncoder(model_vision.vita_config.vision)
    save_sharded({f"vision_model.{k}": v.contiguous() for k, v in pretrained.state_dict().items()}, tmp_path / "vit")
    config = StageConfig(stage=2, init=InitConfig(model=str(init), vision_encoder=str(tmp_path / "vit")),
                         trainable=["vision_connector"], fit_connectors=["vision"], output_dir=str(tmp_path / "run"))
    got = initial_model(config, samples, tmp_path / "work")
    assert got.notes["vision_encoder"] == str(tmp_path / "vit")
    for name, tensor in got.model.vision_tower.encoder.state_dict().items():
        assert torch.equal(tensor, pretrained.state_dict()[name]), name
    before = model_vision.vision_tower.encoder.state_dict()["encoder.layers.0.attn.qkv.weight"]
    assert not torch.equal(got.model.vision_tower.encoder.state_dict()["encoder.layers.0.attn.qkv.weight"], before)


def test_a_stage_puts_the_pretrained_audio_encoder_named_by_init_into_the_tower_with_its_cmvn(tmp_path):
    from vita.model.audio import AudioEncoder
    from vita.model.checkpoint import save_sharded

    samples = th.mixed_samples(tmp_path)
    init = th.write_model(tmp_path / "init")
    base = initial_model(StageConfig(stage=2, init=InitConfig(model=str(init)), trainable=["audio_connector"],
                                     output_dir=str(tmp_path / "a")), samples, tmp_path / "wa").model
    torch.manual_seed(321)
    pretrained = AudioEncoder(base.vita_config.audio)
    pretrained.global_cmvn.set_stats(torch.randn(pretrained.global_cmvn.mean.shape),
                                     torch.rand(pretrained.global_cmvn.istd.shape) + 0.5)
    # a WeNet checkpoint: the encoder under `encoder.`, beside its CTC and decoder tensors (ignored)
    save_sharded({f"encoder.{k}": v.contiguous() for k, v in pretrained.state_dict().items()}
                 | {"ctc.ctc_lo.weight": torch.zeros(3, 2)}, tmp_path / "wenet")
    config = StageConfig(stage=2, init=InitConfig(model=str(init), audio_encoder=str(tmp_path / "wenet")),
                         trainable=["audio_encoder", "audio_connector"], fit_connectors=["audio"],
                         output_dir=str(tmp_path / "run"))
    got = initial_model(config, samples, tmp_path / "work")
    assert got.notes["audio_encoder"] == str(tmp_path / "wenet")
    for name, tensor in got.model.audio_tower.encoder.state_dict().items():
        assert torch.equal(tensor, pretrained.state_dict()[name]), name
    assert not torch.equal(got.model.audio_tower.encoder.global_cmvn.mean, base.audio_tower.encoder.global_cmvn.mean)
