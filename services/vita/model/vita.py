"""The omni-modal model: the MoE decoder plus optional vision and audio towers that fill placeholder slots.

The LLM's parameters keep Hugging Face Mixtral names, so a plain Mixtral directory loads as a text-only model;
the towers live under `vision_tower.*` and `audio_tower.*` in the same sharded safetensors checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from vita.errors import CheckpointError, InvalidInputError
from vita.model.audio import AudioTower
from vita.model.checkpoint import load_sharded, save_sharded, validate_state_dict
from vita.model.config import VitaConfig
from vita.model.hf_names import llm_state_dict_from_hf, llm_state_dict_to_hf, read_hf_config
from vita.model.inputs import MultimodalInputs, SlotIds
from vita.model.llm import MoECausalLM
from vita.model.vision import VisionTower


class VitaForCausalLM(MoECausalLM):
    """MoE decoder + towers. With `config.vision`/`config.audio` None it is exactly a Mixtral text model."""

    def __init__(self, config: VitaConfig) -> None:
        super().__init__(config.llm)
        self.vita_config = config
        hidden = config.llm.hidden_size
        self.vision_tower = VisionTower(config.vision, hidden) if config.vision is not None else None
        self.audio_tower = AudioTower(config.audio, hidden) if config.audio is not None else None

    # --- multimodal prompt -------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed_multimodal(self, inputs: MultimodalInputs, slots: SlotIds) -> Tensor:
        """Token embeddings with every placeholder slot overwritten by its encoder output, shape (1, L, H)."""
        ids = inputs.input_ids
        embeds = self.get_input_embeddings()(ids).clone()
        for name, slot_id, produce in (
            ("image", slots.image, lambda: self._encode_pixels(inputs.image_pixels, "image")),
            ("video", slots.video, lambda: self._encode_pixels(inputs.video_pixels, "video")),
            ("audio", slots.audio, lambda: self._encode_audio(inputs.audio_features)),
        ):
            positions = (ids == slot_id).nonzero().squeeze(-1)
            media = produce()
            given = 0 if media is None else media.shape[0]
            if given != positions.numel():
                raise InvalidInputError(
                    f"the prompt has {positions.numel()} {name} slots but the {name} inputs give {given} embeddings"
                )
            if given:
                embeds[positions] = media.to(embeds.dtype)
        return embeds.unsqueeze(0)

    def _encode_pixels(self, pixels: Tensor | None, kind: str) -> Tensor | None:
        if pixels is None or pixels.numel() == 0:
            return None
        if self.vision_tower is None:
            raise InvalidInputError(f"this model has no vision tower; it cannot take {kind} input")
        tower_dtype = next(self.vision_tower.parameters()).dtype
        return self.vision_tower(pixels.to(tower_dtype)).flatten(0, 1)

    def _encode_audio(self, features: list[Tensor]) -> Tensor | None:
        if not features:
            return None
        if self.audio_tower is None:
            raise InvalidInputError("this model has no audio tower; it cannot take audio input")
        return torch.cat(self.audio_tower.encode_features(features), dim=0)

    # --- checkpoints --------------------------------------------------------------------------------------

    def hf_state_dict(self) -> dict[str, Tensor]:
        """State dict under checkpoint names: HF Mixtral names for the LLM, tower prefixes for the rest."""
        return llm_state_dict_to_hf(self.state_dict())

    def save_pretrained(self, directory: str | Path, *, tokenizer=None, max_shard_bytes: int = 2 << 30) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.vision_tower is None and self.audio_tower is None:
            directory.joinpath("config.json").write_text(_json(self.vita_config.llm.to_hf_dict()))
        else:
            self.vita_config.save(directory)
        save_sharded(self.hf_state_dict(), directory, max_shard_bytes=max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        towers: bool = True,
    ) -> VitaForCausalLM:
        """Load our own directory or a plain Hugging Face Mixtral one; any inconsistency is a CheckpointError.

        `towers=False` loads the language model alone (an LLM worker's model): the towers' tensors are not read.
        """
        directory = Path(directory)
        config = read_model_config(directory)
        if not towers:
            config = replace(config, vision=None, audio=None)
        with torch.device("meta"):
            model = cls(config)
        loaded = llm_state_dict_from_hf(load_sharded(directory, keep=None if towers else _not_a_tower))
        expected = model.state_dict()
        validate_state_dict(expected, loaded)
        model.load_state_dict(loaded, assign=True)
        return model.to(device=device, dtype=dtype).eval()


def load_tower(directory: str | Path, modality: str, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> VisionTower | AudioTower:
    """One tower of a checkpoint, `modality` "vision" or "audio": only its tensors are read (an encoder's model).

    CheckpointError when the checkpoint has no such tower or its tensors do not match the config.
    """
    if modality not in ("vision", "audio"):
        raise ValueError(f"modality must be 'vision' or 'audio', not {modality!r}")
    directory = Path(directory)
    config = read_model_config(directory)
    tower_config = getattr(config, modality)
    if tower_config is None:
        raise CheckpointError(f"{directory}: this model has no {modality} tower")
    tower_cls = VisionTower if modality == "vision" else AudioTower
    with torch.device("meta"):
        tower = tower_cls(tower_config, config.llm.hidden_size)
    prefix = f"{modality}_tower."
    loaded = {name.removeprefix(prefix): tensor
              for name, tensor in load_sharded(directory, keep=lambda name: name.startswith(prefix)).items()}
    validate_state_dict(tower.state_dict(), loaded)
    tower.load_state_dict(loaded, assign=True)
    return tower.to(device=device, dtype=dtype).eval()


def missing_model(directory: Path) -> str:
    """What to tell a user whose model path holds no `config.json`: that it does not exist, is a file, or is a
    training run's output directory (whose model is `final/`)."""
    if not directory.exists():
        return f"{directory}: no such directory"
    if not directory.is_dir():
        return f"{directory}: a file, not a model directory"
    if (directory / "final" / "config.json").is_file():
        return f"{directory}: a training run's output directory; its model is {directory / 'final'}"
    return f"{directory}: no config.json here; a model directory ({directory}/config.json, the weights, the tokenizer) " \
           "is expected"


def read_model_config(directory: Path) -> VitaConfig:
    """Our `config.json`, or a Hugging Face Mixtral one (text-only, or with towers under "vita": `vita export`)."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(missing_model(Path(directory)))
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the model config ({e})") from None
    try:
        if raw.get("model_type") == "mixtral":
            config = VitaConfig.from_dict(raw)
            config.llm = read_hf_config(directory)
            return config
        return VitaConfig.load(directory)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _not_a_tower(name: str) -> bool:
    return not name.startswith(("vision_tower.", "audio_tower."))


def _json(d: dict) -> str:
    return json.dumps(d, indent=2) + "\n"
