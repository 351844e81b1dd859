"""Stage configs: one dataclass tree per training stage, read from a YAML or JSON file in `training/configs/`.

A file names only what differs from the defaults below; an unknown key, a wrong type or a bad value is a
`ConfigError` naming the file and the key. `${VAR}` in a string is replaced by the environment variable VAR
(`${VAR:-default}` with a default), so one file serves a laptop and a cluster. `--set key.sub=value` on the
command line overrides any field after the file is read (values are YAML: `--set max_steps=5`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vita.errors import VitaError

# Parameter groups a stage may train, by parameter-name prefix of VitaForCausalLM.
PARAMETER_GROUPS: dict[str, tuple[str, ...]] = {
    "llm": ("model.", "lm_head."),
    "vision_encoder": ("vision_tower.encoder.",),
    "vision_connector": ("vision_tower.connector.",),
    "audio_encoder": ("audio_tower.encoder.",),
    "audio_connector": ("audio_tower.connector.",),
}


class ConfigError(VitaError):
    """A stage config that cannot be used; the message names the file and the key."""


@dataclass
class InitConfig:
    """Where the stage's weights come from: a model directory, else a preset with seeded random weights."""

    model: str | None = None  # our model directory, a previous stage's output, or a Hugging Face Mixtral one
    preset: str | None = None  # VitaConfig.preset name; with `model` text-only, its towers are added (random)
    seed: int = 0
    tokenizer: str | None = None  # tokenizer.model (or its directory); default: the model directory's
    # Tiny runs only: train an English-only base tokenizer of this size on the built-in corpus (the role Mixtral's
    # 32,000-piece vocabulary plays at full size), so that stage 1 has Chinese pieces to add.
    base_tokenizer_vocab: int | None = None
    # A pretrained InternViT to put in the vision tower (InternViT-300M-448px's directory at full size;
    # `vita pretrain-vision`'s output, the stand-in, for tiny runs); default: the tower's weights as they come.
    vision_encoder: str | None = None
    # A pretrained audio encoder for the audio tower (WeNet names; `vita pretrain-audio`'s output, the stand-in,
    # for tiny runs), its global CMVN included; default: the tower's weights as they come.
    audio_encoder: str | None = None


@dataclass
class VocabConfig:
    """Stage 1 vocabulary extension (`vita.training.vocab`)."""

    enabled: bool = False
    text_files: list[str] = field(default_factory=list)  # Chinese text, one sentence per line
    builtin_corpus: bool = False  # add the Chinese lines of vita.processing.corpus
    from_data: bool = True  # add the Chinese lines of the stage's training conversations
    sp_vocab_size: int = 20000  # size of the SentencePiece model trained on the Chinese text
    target_vocab_size: int | None = None  # 51747 at full size; None adds every piece the base lacks
    max_sentences: int = 2_000_000


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio` of the peak (nanoGPT)."""

    lr: float = 2e-5
    group_lr: dict[str, float] = field(default_factory=dict)  # peak lr per parameter group, overriding `lr`
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off


@dataclass
class DataConfig:
    manifests: list[str] = field(default_factory=list)  # JSONL manifests (`vita.training.data`)
    # Upsampling: a manifest's file name -> how many times its samples are in each epoch (default 1)
    repeat: dict[str, int] = field(default_factory=dict)
    packing_length: int = 6144  # text and image samples are packed into rows of at most this many tokens
    pack: bool = True
    # A packed row holds the context its samples start with (the system prompt) once (`vita.training.packing`):
    # the same loss and gradients, more samples per row.
    share_prefix: bool = True
    max_length: int | None = None  # longer samples are skipped (counted); default: the model's context
    micro_batch_size: int = 1  # rows per forward on each rank
    grad_accum: int = 1  # forwards per optimizer step on each rank
    shuffle: bool = True
    seed: int = 0
    media_cache: str | None = None  # where stage 3 writes synthesised speech; default: <output_dir>/media


@dataclass
class SpokenConfig:
    """Stage 3: spoken versions of questions (TTS) and noisy-audio negatives."""

    p_spoken: float = 0.0  # share of samples whose last question is replaced by its spoken version
    p_negative: float = 0.0  # share of samples turned into a noisy-audio negative (answer `<2>` + eos)
    voices: list[str] = field(default_factory=lambda: ["en-m", "en-f", "en-gb"])  # for English questions
    chinese_voices: list[str] = field(default_factory=lambda: ["zh", "zh-f"])  # none: Chinese questions stay typed
    negative_voices: list[str] = field(default_factory=lambda: ["en-f-fast", "en-m-low"])  # English chatter
    p_noise: float = 0.5  # share of negatives that are noise rather than someone else's speech
    # Share of the speech negatives that are the sample's own (English) question asked by someone else, in a
    # `negative_voices` voice: the wording of a query, so that the voice, not the words, says it is not for the
    # assistant (questions asked of someone else, "can you pick up the kids", were the chatter let through).
    p_asked_aside: float = 0.0


@dataclass
class StageConfig:
    stage: int
    name: str = ""
    init: InitConfig = field(default_factory=InitConfig)
    trainable: list[str] = field(default_factory=lambda: ["llm"])
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    spoken: SpokenConfig = field(default_factory=SpokenConfig)
    max_steps: int = 1000
    output_dir: str = "runs/stage"
    save_every: int = 500  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    state_tokens: bool = False  # answers start with their state token (stage 3)
    fit_audio_cmvn: bool = False  # set the audio encoder's global CMVN from the training audio first
    fit_connectors: list[str] = field(default_factory=list)  # data-dependent init of these connectors: vision, audio
    precision: str = "fp32"  # fp32 or bf16 (autocast; GPUs)
    fsdp: bool = False  # shard parameters with FullyShardedDataParallel instead of DDP
    tensorboard: bool = False
    threads: int | None = None  # torch CPU threads per process
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ConfigError(f"stage must be 1, 2 or 3, got {self.stage}")
        unknown = [g for g in self.trainable if g not in PARAMETER_GROUPS]
        if unknown or not self.trainable:
            raise ConfigError(f"trainable must name parameter groups among {sorted(PARAMETER_GROUPS)}, "
                              f"got {self.trainable}")
        for group in self.optim.group_lr:
            if group not in PARAMETER_GROUPS:
                raise ConfigError(f"optim.group_lr names {group!r}, not a parameter group")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        for name in ("max_steps", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("packing_length", "micro_batch_size", "grad_accum"):
            if getattr(self.data, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self.data, name)}")
        names = [Path(m).name for m in self.data.manifests]
        for name, times in self.data.repeat.items():
            if names.count(name) != 1:
                raise ConfigError(f"data.repeat names {name!r}, which is not the file name of exactly one of "
                                  f"data.manifests ({', '.join(names) or 'none'})")
            if not isinstance(times, int) or times < 1:
                raise ConfigError(f"data.repeat[{name!r}] must be an integer >= 1, got {times!r}")
        for name in ("p_spoken", "p_negative", "p_noise", "p_asked_aside"):
            if not 0.0 <= getattr(self.spoken, name) <= 1.0:
                raise ConfigError(f"spoken.{name} must be in [0, 1], got {getattr(self.spoken, name)}")
        if any(c not in ("vision", "audio") for c in self.fit_connectors):
            raise ConfigError(f"fit_connectors names connectors among vision, audio; got {self.fit_connectors}")
        if self.init.model is None and self.init.preset is None:
            raise ConfigError("init needs a model directory (init.model) or a preset (init.preset)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand(value: Any, source: str) -> Any:
    if isinstance(value, str):
        def replace(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise ConfigError(f"{source}: environment variable {name} is not set (write ${{{name}:-default}} "
                                  "for a default)")
            return default
        return _ENV.sub(replace, value)
    if isinstance(value, list):
        return [_expand(v, source) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, source) for k, v in value.items()}
    return value


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    """A dataclass of `cls` from a dict, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'the file'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key {_key(where, unknown[0])}; {cls.__name__} has {sorted(names)}")
    values = {name: _coerce(hints[name], value, _key(where, name), source) for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{source}: {where or 'the file'}: {e}") from None


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{source}: {key} must be a list of {len(args)}, got {value!r}")
        return tuple(_coerce(a, v, key, source) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    return value


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1's SafeLoader, but reading `1e-3` as the float YAML 1.2 and JSON make of it: 1.1 requires a dot in
    the mantissa, so a learning rate written `1e-3` was the string '1e-3' (PyYAML issue #173). The resolver is
    PyYAML's own float pattern with the dot optional."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """`key.sub=value` strings (values parsed as YAML) written into a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: {item!r} is not key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {key}: {part} is not a mapping")
        node[parts[-1]] = _yaml(raw)
    return data


def load_stage_config(path: str | Path, overrides: list[str] = ()) -> StageConfig:
    """Reads a YAML (.yaml/.yml) or JSON stage config; every problem is a ConfigError naming the file."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read the config ({e.strerror or e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        detail = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{source}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({where}{detail})"
                          ) from None
    if data is None:
        raise ConfigError(f"{source}: the config is empty")
    if not (isinstance(data, dict) and overrides):
        return _build(StageConfig, _expand(data, source), "", source)
    merged = apply_overrides(copy.deepcopy(data), list(overrides))
    try:
        return _build(StageConfig, _expand(merged, source), "", source)
    except ConfigError as e:
        try:  # the file alone is fine: the fault is in an override, and the message says so
            _build(StageConfig, _expand(data, source), "", source)
        except ConfigError:
            raise e from None
        raise ConfigError(f"--set: {str(e).removeprefix(f'{source}: ')}") from None
