"""Hugging Face Mixtral checkpoints <-> this package's decoder: config fields and tensor names.

The hub stores each expert's matrices apart (`block_sparse_moe.experts.E.w1.weight`, (I, H)); transformers 5 keeps
them fused (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)) and can save that too. The
decoder (`vita.model.llm`) stacks them per layer, `block_sparse_moe.w1`/`w3` (E, I, H) and `w2` (E, H, I), backed
by input-major memory; every other tensor keeps its hub name.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from vita.errors import CheckpointError
from vita.model.config import LLMConfig


def input_major(w: Tensor) -> Tensor:
    """Stacked expert matrices (E, out, in) backed by (E, in, out) memory; no copy when they already are."""
    return w if w.mT.is_contiguous() else w.mT.contiguous().mT


def read_hf_config(directory: Path) -> LLMConfig:
    """LLMConfig from a Hugging Face Mixtral `config.json` (transformers 4 or 5 layout)."""
    path = directory / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the model config ({e})") from None
    if d.get("model_type") != "mixtral":
        raise CheckpointError(f"{path}: model_type is {d.get('model_type')!r}, expected 'mixtral'")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{path}: RoPE scaling {rope} is not supported")
    if "rope_theta" not in d and "rope_theta" in rope:  # transformers 5 nests it under rope_parameters
        d["rope_theta"] = rope["rope_theta"]
    try:
        return LLMConfig.from_hf_dict(d)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: {e}") from None


# Hub names: model.layers.N.block_sparse_moe.experts.E.w1.weight. transformers 5 keeps the experts fused in
# memory (mlp.experts.gate_up_proj (E, 2I, H) = [w1; w3], mlp.experts.down_proj (E, H, I)) and can save that too.
_STACKED = re.compile(r"^(?P<layer>.*\.)block_sparse_moe\.(?P<w>w[123])$")
_PER_EXPERT = re.compile(r"^(?P<layer>.*\.)block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_FUSED = re.compile(r"^(?P<layer>.*\.)mlp\.(?P<name>experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")


def llm_state_dict_to_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our names -> hub names: split stacked experts into per-expert matrices; other keys pass through."""
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        m = _STACKED.match(key)
        if m is None:
            out[key] = tensor
            continue
        for e, matrix in enumerate(tensor.unbind(0)):
            out[f"{m['layer']}block_sparse_moe.experts.{e}.{m['w']}.weight"] = matrix
    return out


def llm_state_dict_from_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hub (or transformers-5 fused) names -> ours: stack per-expert matrices input-major; other keys pass through."""
    out: dict[str, Tensor] = {}
    experts: dict[str, dict[int, Tensor]] = defaultdict(dict)
    for key, tensor in state_dict.items():
        if m := _PER_EXPERT.match(key):
            experts[f"{m['layer']}block_sparse_moe.{m['w']}"][int(m["e"])] = tensor
        elif m := _FUSED.match(key):
            moe = f"{m['layer']}block_sparse_moe."
            if m["name"] == "gate.weight":
                out[moe + "gate.weight"] = tensor
            elif m["name"] == "experts.down_proj":
                out[moe + "w2"] = input_major(tensor)
            else:
                out[moe + "w1"], out[moe + "w3"] = (input_major(half) for half in tensor.chunk(2, dim=1))
        else:
            out[key] = tensor
    for key, by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
            raise CheckpointError(f"{key}: experts {missing} are missing from the checkpoint")
        out[key] = torch.stack([by_index[e].mT for e in range(len(by_index))]).mT  # input-major, as the model keeps it
    return out
