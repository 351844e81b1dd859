"""Audio tower: token counts, padding independence, relative-position attention, CMVN and the full-size shape."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vita.errors import InvalidInputError
from vita.model.audio import (
    AudioEncoder,
    AudioTower,
    RelPositionMultiHeadedAttention,
    compute_cmvn_stats,
    rel_shift,
    relative_positions,
)
from vita.model.config import AudioConfig, VitaConfig
from vita.processing.audio import audio_features, fbank, num_audio_tokens

TINY = VitaConfig.preset("tiny")


@pytest.fixture(scope="module")
def tower() -> AudioTower:
    torch.manual_seed(0)
    return AudioTower(TINY.audio, TINY.llm.hidden_size).eval()


def _noise(num_samples: int, seed: int) -> torch.Tensor:
    return 0.1 * torch.randn(num_samples, generator=torch.Generator().manual_seed(seed))


def _encode(tower: AudioTower, waves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Waveforms -> filterbanks (processing) -> the tower, as the processor and the model do it."""
    return tower.encode_features(audio_features(waves, tower.config))


def test_full_size_encoder_has_341m_parameters() -> None:
    with torch.device("meta"):
        encoder = AudioEncoder(AudioConfig())
    total = sum(t.numel() for t in encoder.state_dict().values())  # CMVN buffers included: what a checkpoint holds
    assert abs(total - 341e6) / 341e6 < 0.03, total


@torch.no_grad()
def test_two_seconds_give_25_tokens(tower: AudioTower) -> None:
    (embeds,) = _encode(tower, [_noise(32000, 0)])
    assert embeds.shape == (25, TINY.llm.hidden_size)


@torch.no_grad()
def test_token_counts_and_embeddings_do_not_depend_on_batching(tower: AudioTower) -> None:
    # 0.1 s .. 7.3 s, odd sample counts, frame counts on both sides of every rounding step
    lengths = [1600, 1601, 2479, 4801, 12345, 20003, 32000, 45677, 116800]
    waves = [_noise(n, seed) for seed, n in enumerate(lengths)]
    batched = _encode(tower, waves)
    for wave, together in zip(waves, batched):
        (alone,) = _encode(tower, [wave])
        assert alone.shape[0] == together.shape[0] == num_audio_tokens(len(wave), TINY.audio)
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@torch.no_grad()
def test_padded_frames_do_not_reach_valid_ones(tower: AudioTower) -> None:
    feats, num_frames = fbank(torch.stack([_noise(24000, 1), _noise(24000, 2)]), torch.tensor([24000, 9001]))
    clean, tokens = tower(feats, num_frames)
    feats[1, num_frames[1] :] = torch.randn_like(feats[1, num_frames[1] :]) * 100
    noisy, _ = tower(feats, num_frames)
    torch.testing.assert_close(noisy[1, : tokens[1]], clean[1, : tokens[1]], atol=1e-5, rtol=0)


def test_rel_shift_puts_position_i_minus_j_at_i_j() -> None:
    t = 5
    positions = torch.arange(t - 1, -t, -1).float()  # relative_positions' row order
    shifted = rel_shift(positions.expand(2, 3, t, 2 * t - 1))
    i = torch.arange(t)
    assert torch.equal(shifted, (i[:, None] - i[None]).float().expand(2, 3, t, t))


def _espnet_attention(attn: RelPositionMultiHeadedAttention, x, pos_emb, key_mask):
    """ESPnet/WeNet's computation: explicit scores, the zero-pad-and-reshape rel_shift, masked softmax."""
    b, t, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    q = attn.linear_q(x).view(b, t, h, d)
    k = attn.linear_k(x).view(b, t, h, d).transpose(1, 2)
    v = attn.linear_v(x).view(b, t, h, d).transpose(1, 2)
    p = attn.linear_pos(pos_emb).view(1, -1, h, d).transpose(1, 2)
    ac = (q + attn.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)
    bd = (q + attn.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1)
    padded = torch.cat([bd.new_zeros(b, h, t, 1), bd], dim=-1).view(b, h, 2 * t, t)
    bd = padded[:, :, 1:].reshape(b, h, t, 2 * t - 1)[..., :t]
    scores = ((ac + bd) / math.sqrt(d)).masked_fill(~key_mask[:, None, None], float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.linear_out(out.transpose(1, 2).reshape(b, t, h * d))


def test_attention_matches_espnet_formulation() -> None:
    torch.manual_seed(0)
    attn = RelPositionMultiHeadedAttention(32, 4)
    x = torch.randn(2, 7, 32)
    key_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    pos_emb = relative_positions(7, 32, x.device, x.dtype)
    torch.testing.assert_close(attn(x, pos_emb, key_mask), _espnet_attention(attn, x, pos_emb, key_mask))


def test_cmvn_stats_are_in_the_state_dict_and_ignore_padding() -> None:
    torch.manual_seed(0)
    feats = torch.randn(3, 20, 80) * 2 + 5
    num_frames = torch.tensor([20, 7, 13])
    feats[1, 7:] = 1e6  # padding must not count
    mean, istd = compute_cmvn_stats([(feats[:2], num_frames[:2]), (feats[2:], num_frames[2:])])
    valid = torch.cat([feats[0], feats[1, :7], feats[2, :13]]).double()
    torch.testing.assert_close(mean, valid.mean(0).float())
    torch.testing.assert_close(istd, valid.var(0, unbiased=False).rsqrt().float())

    tower = AudioTower(TINY.audio, TINY.llm.hidden_size)
    tower.encoder.global_cmvn.set_stats(mean, istd)
    state = tower.state_dict()
    torch.testing.assert_close(state["encoder.global_cmvn.mean"], mean)
    torch.testing.assert_close(state["encoder.global_cmvn.istd"], istd)
    normed = tower.encoder.global_cmvn(valid.float())
    torch.testing.assert_close(normed.mean(0), torch.zeros(80), atol=1e-4, rtol=0)


def test_gradients_are_finite_with_padding() -> None:
    torch.manual_seed(0)
    tower = AudioTower(TINY.audio, TINY.llm.hidden_size)
    feats, num_frames = fbank(torch.stack([_noise(8000, 3), _noise(8000, 4)]), torch.tensor([8000, 3001]))
    embeds, num_tokens = tower(feats, num_frames)
    valid = torch.arange(embeds.shape[1])[None] < num_tokens[:, None]
    embeds[valid].square().mean().backward()
    grads = [p.grad for p in tower.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unusable_lengths_are_rejected(tower: AudioTower) -> None:
    with pytest.raises(InvalidInputError, match="at least 10 ms"):
        _encode(tower, [_noise(16000, 5), _noise(50, 6)])
    short = AudioTower(AudioConfig(**{**vars(TINY.audio), "max_relative_positions": 8}), 16)
    with pytest.raises(InvalidInputError, match="max_relative_positions"):
        _encode(short, [_noise(16000, 7)])


def test_connector_pairs_frames_and_pads_odd_tails(tower: AudioTower) -> None:
    x = torch.randn(2, 5, TINY.audio.hidden_size)
    out, lengths = tower.connector(x, torch.tensor([5, 3]))
    assert out.shape == (2, 3, TINY.llm.hidden_size) and lengths.tolist() == [3, 2]
    lin = tower.connector.linear_1
    last = torch.cat([x[0, 4], torch.zeros(TINY.audio.hidden_size)])  # frame 4 paired with zeros
    torch.testing.assert_close(out[0, 2], tower.connector.linear_2(F.gelu(lin(last))))
