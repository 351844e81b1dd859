import pytest
import torch
import torch.nn.functional as F

from vita.model.config import VisionConfig, VitaConfig
from vita.model.vision import VisionEncoder, VisionTower, pixel_shuffle

TINY = VitaConfig.preset("tiny")


def tiny_tower() -> VisionTower:
    torch.manual_seed(0)
    tower = VisionTower(TINY.vision, TINY.llm.hidden_size).eval()
    with torch.no_grad():  # non-trivial norms, biases and layer scales, so a misplaced one shows up
        for p in tower.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5)
    return tower


def naive_pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Output cell (i, j) = input cells (factor*i + di, factor*j + dj) concatenated in row-major (di, dj) order."""
    n, h, w, c = x.shape
    out = torch.empty(n, h // factor, w // factor, c * factor * factor)
    for i in range(h // factor):
        for j in range(w // factor):
            cells = [x[:, factor * i + di, factor * j + dj] for di in range(factor) for dj in range(factor)]
            out[:, i, j] = torch.cat(cells, dim=-1)
    return out


def internvl_pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVLChatModel.pixel_shuffle (ps_version v2), also VITA's, as published."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def reference_tower(sd: dict[str, torch.Tensor], config: VisionConfig, pixels: torch.Tensor) -> torch.Tensor:
    """InternVisionModel + VITA's InternViTVisionTower + mlp2x_gelu, from the state dict with naive attention."""
    width, heads = config.hidden_size, config.num_attention_heads
    x = F.conv2d(pixels, sd["encoder.embeddings.patch_embedding.weight"],
                 sd["encoder.embeddings.patch_embedding.bias"], stride=config.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["encoder.embeddings.class_embedding"].expand(len(x), -1, -1), x], dim=1)
    x = x + sd["encoder.embeddings.position_embedding"]
    n, seq, _ = x.shape
    for layer in range(config.num_hidden_layers):
        def p(name, layer=layer):
            return sd[f"encoder.encoder.layers.{layer}.{name}"]

        h = F.layer_norm(x, (width,), p("norm1.weight"), p("norm1.bias"), config.layer_norm_eps)
        q, k, v = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(
            n, seq, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(n, seq, width)
        x = x + F.linear(h, p("attn.proj.weight"), p("attn.proj.bias")) * p("ls1")
        h = F.layer_norm(x, (width,), p("norm2.weight"), p("norm2.bias"), config.layer_norm_eps)
        h = F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        x = x + h * p("ls2")
    side = config.patches_per_side
    x = internvl_pixel_shuffle((x[:, 1:] * 0.5).reshape(n, side, side, width))
    x = x.reshape(n, -1, x.shape[-1])
    x = F.gelu(F.linear(x, sd["connector.fc1.weight"], sd["connector.fc1.bias"]))
    return F.linear(x, sd["connector.fc2.weight"], sd["connector.fc2.bias"])


def test_tower_gives_256_tokens_per_tile_and_matches_reference():
    tower = tiny_tower()
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = tower(pixels)
        expected = reference_tower(tower.state_dict(), TINY.vision, pixels)
    assert out.shape == (2, TINY.vision.tokens_per_tile, TINY.llm.hidden_size) == (2, 256, 256)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_batch_equals_one_by_one():
    tower = tiny_tower()
    pixels = torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = tower(pixels)
        single = torch.cat([tower(tile[None]) for tile in pixels])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_encoder_drops_the_class_token():
    encoder = VisionEncoder(TINY.vision).eval()
    with torch.no_grad():
        features = encoder(torch.zeros(1, 3, 448, 448))
    assert features.shape == (1, 32 * 32, TINY.vision.hidden_size)
    with pytest.raises(ValueError, match=r"\(N, 3, 448, 448\)"):
        encoder(torch.zeros(1, 3, 224, 224))


def test_parameter_names_follow_internvl():
    names = set(VisionEncoder(TINY.vision).state_dict())
    layer = {f"encoder.layers.1.{n}" for n in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "ls1", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        "ls2")}
    embeddings = {"embeddings.class_embedding", "embeddings.patch_embedding.weight",
                  "embeddings.patch_embedding.bias", "embeddings.position_embedding"}
    assert embeddings | layer <= names
    assert len(names) == len(embeddings) + TINY.vision.num_hidden_layers * len(layer)
    no_bias = VisionEncoder(VisionConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, qkv_bias=False))
    assert "encoder.layers.0.attn.qkv.bias" not in no_bias.state_dict()


@pytest.mark.parametrize("shape", [(2, 32, 32, 6), (1, 4, 6, 3), (3, 2, 8, 5)])
def test_pixel_shuffle_matches_naive_and_internvl(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3] * 4)
    assert torch.equal(out, naive_pixel_shuffle(x, 2))
    assert torch.equal(out, internvl_pixel_shuffle(x, 0.5))


def test_pixel_shuffle_other_ratio_and_bad_shapes():
    x = torch.randn(1, 8, 4, 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(pixel_shuffle(x, 0.25), naive_pixel_shuffle(x, 4))
    with pytest.raises(ValueError, match="cannot pixel-shuffle"):
        pixel_shuffle(torch.zeros(1, 5, 4, 2))
    with pytest.raises(ValueError, match="cannot pixel-shuffle"):
        pixel_shuffle(torch.zeros(1, 4, 4, 2), 0.4)


def test_full_size_parameter_counts():
    with torch.device("meta"):
        tower = VisionTower(VisionConfig(), llm_hidden_size=4096)
    encoder = sum(p.numel() for p in tower.encoder.parameters())
    connector = sum(p.numel() for p in tower.connector.parameters())
    assert abs(encoder - 0.30e9) / 0.30e9 < 0.03
    assert encoder == 304_012_288  # InternViT-300M-448px
    assert connector == 2 * (4096 * 4096 + 4096) == 33_562_624  # Linear(4096, 4096) x 2


def test_tiny_224_tower_gives_64_tokens_per_tile():
    config = VitaConfig.preset("tiny-224")
    tower = VisionTower(config.vision, config.llm.hidden_size).eval()
    with torch.no_grad():
        out = tower(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 64, config.llm.hidden_size)
