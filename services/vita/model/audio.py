"""Audio tower: global CMVN, 4x conv subsampling, relative-position transformer, 2x connector to the LLM width.

Module names follow WeNet (`global_cmvn`, `embed`, `encoders.N.self_attn.linear_pos`, `after_norm`, ...) so that
converted WeNet/ESPnet encoder checkpoints map onto it by name. 2 s of 16 kHz audio -> 200 frames -> 50 -> 25 tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vita.errors import InvalidInputError
from vita.model.config import AudioConfig


def length_mask(lengths: Tensor, max_length: int) -> Tensor:
    """(B, max_length) bool, True on each row's first `lengths[b]` positions."""
    return torch.arange(max_length, device=lengths.device)[None] < lengths[:, None]


class GlobalCMVN(nn.Module):
    """Per-bin mean/variance normalisation whose statistics travel in the checkpoint as buffers."""

    def __init__(self, num_bins: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_bins))
        self.register_buffer("istd", torch.ones(num_bins))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) * self.istd

    @torch.no_grad()
    def set_stats(self, mean: Tensor, istd: Tensor) -> None:
        if mean.shape != self.mean.shape or istd.shape != self.istd.shape:
            raise ValueError(f"CMVN stats must have shape {tuple(self.mean.shape)}")
        self.mean.copy_(mean)
        self.istd.copy_(istd)


@torch.no_grad()
def compute_cmvn_stats(batches: Iterable[tuple[Tensor, Tensor]], min_variance: float = 1e-20) -> tuple[Tensor, Tensor]:
    """(mean, inverse std) per bin over the valid frames of (feats (B, T, bins), num_frames (B,)) batches."""
    total = total_sq = None
    count = 0
    for feats, num_frames in batches:
        valid = feats[length_mask(num_frames.to(feats.device), feats.shape[1])].double()
        total = valid.sum(0) if total is None else total + valid.sum(0)
        total_sq = valid.square().sum(0) if total_sq is None else total_sq + valid.square().sum(0)
        count += valid.shape[0]
    if count == 0:
        raise ValueError("compute_cmvn_stats needs at least one valid frame")
    mean = total / count
    variance = (total_sq / count - mean.square()).clamp(min=min_variance)
    return mean.float(), variance.rsqrt().float()


class Conv2dSubsampling4(nn.Module):
    """Two Conv2d(kernel 3, stride 2, padding 1) + ReLU over (time, mel), then a Linear: T -> ceil(ceil(T/2)/2)."""

    def __init__(self, num_bins: int, channels: int, hidden_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)
        bins = (num_bins + 1) // 2
        bins = (bins + 1) // 2
        self.out = nn.Linear(channels * bins, hidden_size)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = x[:, None]  # (B, 1, T, bins)
        for conv in (self.conv1, self.conv2):
            x = F.relu(conv(x))
            lengths = (lengths + 1) // 2
            # Zero the padded tail so the next kernel's edge sees what zero padding gives a row alone.
            x = x * length_mask(lengths, x.shape[2])[:, None, :, None]
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), lengths


def relative_positions(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Sinusoids for relative positions length-1, ..., 0, ..., -(length-1): (2*length - 1, dim), ESPnet's layout."""
    pos = torch.arange(length - 1, -length, -1, device=device, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = pos * inv_freq
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(2 * length - 1, dim).to(dtype)


def rel_shift(scores: Tensor) -> Tensor:
    """(..., T, 2T-1) scores against relative positions -> (..., T, T) with [i, j] taken at position i - j."""
    t = scores.shape[-2]
    i = torch.arange(t, device=scores.device)
    index = (t - 1) - i[:, None] + i[None]  # column of relative position i - j in relative_positions' order
    return scores.gather(-1, index.expand(*scores.shape[:-1], t))


class RelPositionMultiHeadedAttention(nn.Module):
    """Transformer-XL attention: score = (q + u)·k + (q + v)·W_pos p_(i-j), with learned biases u, v per head."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.linear_q = nn.Linear(hidden_size, hidden_size)
        self.linear_k = nn.Linear(hidden_size, hidden_size)
        self.linear_v = nn.Linear(hidden_size, hidden_size)
        self.linear_out = nn.Linear(hidden_size, hidden_size)
        self.linear_pos = nn.Linear(hidden_size, hidden_size, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)  # (..., H, T, d)

    def forward(self, x: Tensor, pos_emb: Tensor, key_mask: Tensor) -> Tensor:
        """x (B, T, D), pos_emb (2T-1, D), key_mask (B, T) True on valid frames."""
        q = self.linear_q(x).unflatten(-1, (self.num_heads, self.head_dim))  # (B, T, H, d): biases broadcast
        k, v = self._heads(self.linear_k(x)), self._heads(self.linear_v(x))
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        p = self._heads(self.linear_pos(pos_emb))  # (H, 2T-1, d)
        position_scores = rel_shift(q_v @ p.transpose(-2, -1)) / math.sqrt(self.head_dim)
        bias = position_scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        # The content term (q + u)·k / sqrt(d) is SDPA's own product; the position term rides in as an additive mask.
        out = F.scaled_dot_product_attention(q_u, k, v, attn_mask=bias)
        return self.linear_out(out.transpose(1, 2).flatten(-2))


class FeedForward(nn.Module):
    """ESPnet/WeNet position-wise FFN with ReLU, as in their transformer encoders."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(hidden_size, intermediate_size)
        self.w_2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(F.relu(self.w_1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + ffn(norm2(x))."""

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(config.hidden_size, config.num_attention_heads)
        self.feed_forward = FeedForward(config.hidden_size, config.intermediate_size)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, pos_emb: Tensor, key_mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm1(x), pos_emb, key_mask)
        return x + self.feed_forward(self.norm2(x))


class AudioEncoder(nn.Module):
    """Filterbanks (B, T, bins) -> hidden states (B, ceil(T/4), hidden_size); positions past a row's length are junk."""

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        self.config = config
        self.global_cmvn = GlobalCMVN(config.num_mel_bins)
        self.embed = Conv2dSubsampling4(config.num_mel_bins, config.subsampling_channels, config.hidden_size)
        self.encoders = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.after_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, feats: Tensor, num_frames: Tensor) -> tuple[Tensor, Tensor]:
        if bool((num_frames < 1).any()):
            raise InvalidInputError("audio gives no filterbank frame: it must be at least 10 ms long")
        x = self.global_cmvn(feats) * length_mask(num_frames, feats.shape[1])[..., None]
        x, lengths = self.embed(x, num_frames)
        if x.shape[1] > self.config.max_relative_positions:
            raise InvalidInputError(
                f"audio gives {x.shape[1]} encoder frames; at most {self.config.max_relative_positions} "
                f"(max_relative_positions) are supported"
            )
        x = x * math.sqrt(self.config.hidden_size)  # the usual embedding scale before adding positions
        pos_emb = relative_positions(x.shape[1], self.config.hidden_size, x.device, x.dtype)
        key_mask = length_mask(lengths, x.shape[1])
        for layer in self.encoders:
            x = layer(x, pos_emb, key_mask)
        return self.after_norm(x), lengths


class AudioConnector(nn.Module):
    """Stacks `downsample` adjacent frames (zero-padding an odd tail) and maps them to the LLM width with an MLP."""

    def __init__(self, hidden_size: int, llm_hidden_size: int, downsample: int = 2) -> None:
        super().__init__()
        self.downsample = downsample
        self.linear_1 = nn.Linear(hidden_size * downsample, llm_hidden_size)
        self.linear_2 = nn.Linear(llm_hidden_size, llm_hidden_size)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = x * length_mask(lengths, x.shape[1])[..., None]  # a row's odd tail pairs with zeros, batched or not
        x = F.pad(x, (0, 0, 0, -x.shape[1] % self.downsample))
        x = x.reshape(x.shape[0], -1, self.downsample * x.shape[2])
        return self.linear_2(F.gelu(self.linear_1(x))), -(-lengths // self.downsample)


class AudioTower(nn.Module):
    """Filterbanks -> LLM input embeddings: 12.5 tokens per second of audio."""

    def __init__(self, config: AudioConfig, llm_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config)
        self.connector = AudioConnector(config.hidden_size, llm_hidden_size, config.connector_downsample)

    def forward(self, feats: Tensor, num_frames: Tensor) -> tuple[Tensor, Tensor]:
        """feats (B, T, bins), num_frames (B,) -> embeds (B, N, llm_hidden), num_tokens (B,); rows past N_b are padding."""
        return self.connector(*self.encoder(feats, num_frames))

    def encode_features(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Encode clips given as (frames_i, num_mel_bins) filterbanks as one padded batch: one (n_i, llm_hidden) each.

        Filterbanks come from `vita.processing.audio` (`audio_features` for waveforms); padding frames never reach
        a row's valid ones, so a clip gives the same embeddings alone or in any batch.
        """
        param = next(self.parameters())
        num_frames = torch.tensor([f.shape[0] for f in features], device=param.device)
        feats = nn.utils.rnn.pad_sequence([f.to(param.device) for f in features], batch_first=True)
        embeds, num_tokens = self(feats.to(param.dtype), num_frames)
        return [e[:n] for e, n in zip(embeds, num_tokens.tolist())]
