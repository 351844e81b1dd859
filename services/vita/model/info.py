"""Parameter accounting on the meta device: full-size shapes without allocating a byte."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vita.model.config import VitaConfig


@dataclass(frozen=True)
class ParameterCounts:
    llm_total: int
    llm_active: int  # per token: all but the (E - k) experts a token does not use; both embedding matrices count
    vision_encoder: int
    vision_connector: int
    audio_encoder: int
    audio_connector: int


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_parameters(config: VitaConfig) -> ParameterCounts:
    from vita.model.vita import VitaForCausalLM

    with torch.device("meta"):
        model = VitaForCausalLM(config)
    llm = config.llm
    experts = sum(p.numel() for n, p in model.named_parameters() if ".block_sparse_moe.w" in n)
    unused_share = (llm.num_local_experts - llm.num_experts_per_tok) / llm.num_local_experts
    towers = _numel(model.vision_tower) + _numel(model.audio_tower)
    llm_total = _numel(model) - towers
    return ParameterCounts(
        llm_total=llm_total,
        llm_active=llm_total - round(experts * unused_share),
        vision_encoder=_numel(model.vision_tower.encoder) if model.vision_tower else 0,
        vision_connector=_numel(model.vision_tower.connector) if model.vision_tower else 0,
        audio_encoder=_numel(model.audio_tower.encoder) if model.audio_tower else 0,
        audio_connector=_numel(model.audio_tower.connector) if model.audio_tower else 0,
    )


def parameter_report(preset: str) -> str:
    config = VitaConfig.preset(preset)
    c = count_parameters(config)
    rows = [
        ("LLM total", c.llm_total),
        (f"LLM active per token (top-{config.llm.num_experts_per_tok} of {config.llm.num_local_experts})",
         c.llm_active),
        ("vision encoder", c.vision_encoder),
        ("vision connector", c.vision_connector),
        ("audio encoder", c.audio_encoder),
        ("audio connector", c.audio_connector),
        ("all", c.llm_total + c.vision_encoder + c.vision_connector + c.audio_encoder + c.audio_connector),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"preset {preset}: vocab {config.llm.vocab_size}, hidden {config.llm.hidden_size}, "
             f"{config.llm.num_hidden_layers} layers"]
    lines += [f"  {name:<{width}}  {n:>16,d}  ({_human(n)})" for name, n in rows]
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
