"""InternViT-300M vision encoder, pixel shuffle and MLP connector: 448x448 tile -> 256 LLM-width tokens.

Module and parameter names follow InternVL's `InternVisionModel` (`embeddings.*`, `encoder.layers.N.*`) so a
real checkpoint's `vision_model.*` tensors load 1:1 into `VisionTower.encoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vita.model.config import VisionConfig


class VisionEmbeddings(nn.Module):
    """Patchify with a strided conv, prepend the class token, add learned absolute positions."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, width))
        self.patch_embedding = nn.Conv2d(config.num_channels, width, config.patch_size, config.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, 1 + config.patches_per_side**2, width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (N, P, width)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding


class Attention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, seq, width = x.shape
        q, k, v = self.qkv(x).view(n, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional: every patch sees the whole tile
        return self.proj(out.transpose(1, 2).reshape(n, seq, width))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm block whose residual branches are scaled by learned per-channel layer-scale vectors."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.ls1 = nn.Parameter(torch.full((width,), config.layer_scale_init))
        self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.ls2 = nn.Parameter(torch.full((width,), config.layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionEncoder(nn.Module):
    """InternViT: (N, 3, 448, 448) -> (N, 1024, width) patch features; the class token is dropped."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = Encoder(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c, size = self.config.num_channels, self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c, size, size):
            raise ValueError(f"pixel_values must be (N, {c}, {size}, {size}), got {tuple(pixel_values.shape)}")
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        return self.encoder(x)[:, 1:]


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """(N, h, w, c) -> (N, h*ratio, w*ratio, c/ratio^2), InternVL's `pixel_shuffle` with ps_version "v2".

    Output cell (i, j) concatenates the input cells (i/ratio + di, j/ratio + dj) in row-major order of (di, dj);
    the reshape/permute sequence is InternVL's because the connector weights depend on that channel order.
    """
    n, h, w, c = x.shape
    factor = round(1 / ratio)
    if factor * ratio != 1 or h % factor or w % factor:
        raise ValueError(f"cannot pixel-shuffle a {h}x{w} grid by {ratio}: 1/ratio must be an integer dividing both")
    x = x.reshape(n, h, w // factor, c * factor).permute(0, 2, 1, 3)
    x = x.reshape(n, w // factor, h // factor, c * factor * factor)
    return x.permute(0, 2, 1, 3).contiguous()


class VisionConnector(nn.Module):
    """MISSION.md's two-layer MLP (VITA's `mm_projector` "mlp2x_gelu": indices 0 and 2 are `fc1` and `fc2`).

    Unlike InternVL's `mlp1` there is no LayerNorm in front: it is scale-invariant, so it would undo the 0.5
    feature scale the spec asks for.
    """

    def __init__(self, in_features: int, llm_hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, llm_hidden_size)
        self.fc2 = nn.Linear(llm_hidden_size, llm_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionTower(nn.Module):
    """Tiles -> LLM embeddings: (N, 3, 448, 448) -> (N, tokens_per_tile, llm_hidden_size), all tiles in one pass."""

    def __init__(self, config: VisionConfig, llm_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = VisionEncoder(config)
        self.connector = VisionConnector(config.connector_in_features, llm_hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.connector(shuffled_features(self.encoder, pixel_values))


def shuffled_features(encoder: VisionEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the connector receives: (N, 3, S, S) -> (N, tokens_per_tile, connector_in_features), the encoder's
    patch features scaled by `feature_scale` and pixel-shuffled."""
    config = encoder.config
    features = encoder(pixel_values) * config.feature_scale
    side = config.patches_per_side
    grid = features.reshape(features.shape[0], side, side, -1)
    return pixel_shuffle(grid, config.downsample_ratio).flatten(1, 2)
