"""Model configuration: dataclasses whose defaults are the full-size numbers of MISSION.md.

`VitaConfig.preset("mixtral-8x7b")` is the production shape; `VitaConfig.preset("tiny")` keeps every structural
rule (448 tiles, 256 tokens per tile, 25 audio tokens per 2 s, top-2 of 8 experts) at a width that runs on a laptop.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vita.errors import InvalidInputError


@dataclass
class LLMConfig:
    """Mixtral-style sparse MoE decoder; field names match Hugging Face `MixtralConfig`."""

    vocab_size: int = 51747
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError("num_experts_per_tok must be in [1, num_local_experts]")
        if self.sliding_window is not None:
            raise NotImplementedError("sliding-window attention is not implemented (VITA's Mixtral uses none)")

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` body that transformers' MixtralConfig accepts."""
        d = dataclasses.asdict(self)
        d.update(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_act="silu",
                 torch_dtype="float32", attention_dropout=0.0, router_aux_loss_coef=0.02)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LLMConfig:
        """Reads transformers 4 and 5 layouts (5 nests rope_theta under rope_parameters)."""
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" not in cfg and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        if cfg.get("head_dim") is None:
            cfg.pop("head_dim", None)
        return cls(**cfg)


@dataclass
class VisionConfig:
    """InternViT-300M-448px encoder plus the pixel-shuffle and MLP connector of MISSION.md."""

    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.1
    feature_scale: float = 0.5  # MISSION.md: features are scaled by 0.5 before the pixel shuffle
    downsample_ratio: float = 0.5  # pixel shuffle factor: 32x32x1024 -> 16x16x4096
    max_tiles: int = 12
    min_tiles: int = 1
    use_thumbnail: bool = True
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        side = int(self.patches_per_side * self.downsample_ratio)
        return side * side

    @property
    def connector_in_features(self) -> int:
        return int(self.hidden_size / (self.downsample_ratio**2))


@dataclass
class AudioConfig:
    """Filterbank front end, 4x CNN subsampling, relative-position transformer, 2x connector."""

    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemphasis: float = 0.97
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    subsampling_channels: int = 512
    connector_downsample: int = 2
    layer_norm_eps: float = 1e-5
    max_relative_positions: int = 5000

    # The encoder's front end (`Conv2dSubsampling4`): two convolutions of stride 2 over time.
    subsampling: ClassVar[int] = 4

    @property
    def frame_shift_samples(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    def encoder_length(self, frames: int) -> int:
        """Encoder positions for `frames` filterbank frames: each stride-2 convolution keeps ceil(L / 2)."""
        for _ in range(self.subsampling.bit_length() - 1):
            frames = (frames + 1) // 2
        return frames

    @property
    def max_frames(self) -> int:
        """Filterbank frames the encoder takes: its relative positions (`max_relative_positions`) bound a clip's
        length after the 4x subsampling (5000 positions: 20000 frames)."""
        return self.subsampling * self.max_relative_positions

    @property
    def samples_per_token(self) -> int:
        """Samples behind one LLM token: frame shifts, subsampled by the encoder, then `connector_downsample`
        frames stacked into one token (160 x 4 x 2 = 1280 at 16 kHz: 12.5 tokens per second)."""
        return self.frame_shift_samples * self.subsampling * self.connector_downsample

    @property
    def max_seconds(self) -> float:
        """The longest clip the encoder takes, in seconds: `max_frames` frame shifts (20000 x 10 ms = 200 s). A clip
        of exactly this length gives `max_frames` frames (Kaldi's snip_edges=False rounds to the nearest frame)."""
        return self.max_frames * self.frame_shift_samples / self.sample_rate


@dataclass
class VitaConfig:
    """The whole omni-modal model; `vision`/`audio` are None for a text-only (plain Mixtral) model."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    audio: AudioConfig | None = field(default_factory=AudioConfig)
    model_type: str = "vita"

    @classmethod
    def preset(cls, name: str) -> VitaConfig:
        try:
            return PRESETS[name]()
        except KeyError:
            raise InvalidInputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "architectures": ["VitaForCausalLM"],
            "llm": self.llm.to_hf_dict(),
            "vision": None if self.vision is None else dataclasses.asdict(self.vision),
            "audio": None if self.audio is None else dataclasses.asdict(self.audio),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VitaConfig:
        """Accepts our own `config.json` and a Hugging Face Mixtral one: text-only, or with the towers under a
        "vita" key (what `vita export` writes, so that TensorRT-LLM reads the same file as a Mixtral config)."""
        if d.get("model_type") == "mixtral":
            towers = d.get("vita") or {}
            return cls(llm=LLMConfig.from_hf_dict(d), vision=_vision(towers.get("vision")),
                       audio=_audio(towers.get("audio")))
        if d.get("model_type") != "vita":
            raise ValueError(f"config.json has model_type {d.get('model_type')!r}; expected 'vita' or 'mixtral'")
        return cls(llm=LLMConfig.from_hf_dict(d["llm"]), vision=_vision(d.get("vision")), audio=_audio(d.get("audio")))

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> VitaConfig:
        path = Path(directory, "config.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a model directory needs a config.json")
        return cls.from_dict(json.loads(path.read_text()))


def _vision(d: dict[str, Any] | None) -> VisionConfig | None:
    if d is None:
        return None
    return VisionConfig(**{**d, "image_mean": tuple(d["image_mean"]), "image_std": tuple(d["image_std"])})


def _audio(d: dict[str, Any] | None) -> AudioConfig | None:
    return None if d is None else AudioConfig(**d)


def _mixtral_8x7b() -> VitaConfig:
    return VitaConfig()


def _tiny() -> VitaConfig:
    """~15M parameters: runs the whole pipeline on 2 CPU cores in well under a second per 512-token prompt."""
    return VitaConfig(
        llm=LLMConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096),
        vision=VisionConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384),
        audio=AudioConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                          subsampling_channels=64),
    )


def _tiny_one_tile(side: int) -> VitaConfig:
    """The tiny preset with one `side`-pixel tile per image or frame and no thumbnail: (side / 28)^2 tokens after
    MISSION.md's pixel shuffle instead of 256."""
    config = _tiny()
    config.vision = dataclasses.replace(config.vision, image_size=side, max_tiles=1)
    return config


def _tiny_224() -> VitaConfig:
    """64 tokens per image or frame: the learning proof's preset until 2026-12-05, where a quarter of the vision
    tokens let the 2-core budget see three times the samples."""
    return _tiny_one_tile(224)


def _tiny_112() -> VitaConfig:
    """16 tokens per image or frame: the learning proof's preset (`make train-tiny`). A quarter of tiny-224's patches
    makes the vision stand-in's step 4.4x cheaper and stage 3's pictures a quarter as long, so the 2-core budget
    trains both for more steps (docs/training.md, "112-pixel tiles")."""
    return _tiny_one_tile(112)


PRESETS = {"mixtral-8x7b": _mixtral_8x7b, "tiny": _tiny, "tiny-224": _tiny_224, "tiny-112": _tiny_112}
