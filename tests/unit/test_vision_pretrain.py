"""The stand-in vision pretraining: labels true to the pictures, a loss that falls, weights that load by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vita.errors import CheckpointError
from vita.model.config import VitaConfig
from vita.model.vision import VisionEncoder
from vita.model.vita import VitaForCausalLM
from vita.training import curriculum as cur
from vita.training.vision_pretrain import (
    ATTRIBUTES,
    IGNORE,
    AttributeHeads,
    VisionPretrainConfig,
    attribute_pictures,
    load_vision_encoder,
    pretrain_vision_encoder,
    shift_pictures,
)

VISION = VitaConfig.preset("tiny-224").vision


def _ink(pixels: torch.Tensor) -> torch.Tensor:
    """(S, S) mask of a uint8 (3, S, S) picture's pixels far from its background (the corner pixel's colour)."""
    return (pixels.float() - pixels[:, :1, :1].float()).norm(dim=0) > 60


def _dominant_colour(pixels: torch.Tensor) -> str:
    """The curriculum colour nearest the median of the picture's ink."""
    centre = pixels.permute(1, 2, 0)[_ink(pixels)].float().median(0).values
    return min(cur.COLOURS, key=lambda c: float((torch.tensor(cur.COLOURS[c]).float() - centre).norm()))


def test_pictures_are_seeded_and_labelled_with_what_they_show() -> None:
    pixels, labels = attribute_pictures(24, seed=7, vision=VISION, frame_share=0.5)
    again, labels_again = attribute_pictures(24, seed=7, vision=VISION, frame_share=0.5)
    assert pixels.shape == (24, 3, 224, 224) and pixels.dtype == torch.uint8
    assert torch.equal(pixels, again) and all(torch.equal(labels[k], labels_again[k]) for k in labels)
    assert not torch.equal(pixels, attribute_pictures(24, seed=8, vision=VISION, frame_share=0.5)[0])
    for k in range(24):
        assert ATTRIBUTES["colour"][labels["colour"][k]] == _dominant_colour(pixels[k])
        word = labels["word"][k] != IGNORE
        # a word picture has no shape or count; a frame (position known) has one shape
        assert word == (labels["shape"][k] == IGNORE) == (labels["count"][k] == IGNORE)
        if labels["column"][k] != IGNORE:
            assert ATTRIBUTES["count"][labels["count"][k]] == "one"
            column, row = int(labels["column"][k]), int(labels["row"][k])
            ink = _ink(pixels[k]).nonzero().float().mean(0)  # (row, column) of the shape's pixels
            size = VISION.image_size / 4
            assert int(ink[0] // size) == row and int(ink[1] // size) == column
    assert (labels["word"] != IGNORE).any() and (labels["column"] != IGNORE).any()
    # every single shape (a frame's or a picture's) has its centre, as (x, y) fractions of the side, where its ink is
    single = labels["count"] == ATTRIBUTES["count"].index("one")
    assert torch.equal(labels["centre"][:, 0] != IGNORE, single) and torch.equal(labels["column"] != IGNORE, single)
    for k in single.nonzero().flatten().tolist():
        row, column = _ink(pixels[k]).nonzero().float().mean(0) / VISION.image_size
        assert abs(float(labels["centre"][k, 0] - column)) < 0.05 and abs(float(labels["centre"][k, 1] - row)) < 0.05


def test_pictures_are_the_same_rendered_by_one_process_or_several() -> None:
    """The pictures are drawn in order and rendered in worker processes: their number changes nothing."""
    one, labels_one = attribute_pictures(40, seed=3, vision=VISION, frame_share=0.5, workers=1)
    three, labels_three = attribute_pictures(40, seed=3, vision=VISION, frame_share=0.5, workers=3, chunk=6)
    assert torch.equal(one, three) and all(torch.equal(labels_one[k], labels_three[k]) for k in labels_one)


@pytest.mark.parametrize("options", [{}, {"pooled": ("count",), "word_shift": 0}], ids=["recipe", "count-pooled"])
def test_pretraining_lowers_the_loss_writes_internvit_names_and_is_reused(tmp_path, options) -> None:
    config = VisionPretrainConfig(pictures=48, steps=30, batch_size=16, probe_pictures=16, log_every=10, threads=2,
                                  **options)
    summary = pretrain_vision_encoder(config, tmp_path / "enc", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "enc" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0]
    assert set(summary["heldout_accuracy"]) == {*ATTRIBUTES, "count_several", "column_centre", "row_centre"}
    info = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert info["vision"]["image_size"] == 112 and info["pretraining"]["key"] == config.key()  # tiny-112's tile

    model = VitaForCausalLM(VitaConfig.preset(config.preset))
    load_vision_encoder(model.vision_tower.encoder, tmp_path / "enc")
    from vita.model.checkpoint import load_sharded

    saved = load_sharded(tmp_path / "enc")
    assert "encoder.layers.0.attn.qkv.weight" in saved and "embeddings.patch_embedding.weight" in saved
    for name, tensor in model.vision_tower.encoder.state_dict().items():
        assert torch.equal(tensor, saved[name]), name

    stamp = (tmp_path / "enc" / "model.safetensors").stat().st_mtime_ns
    assert pretrain_vision_encoder(config, tmp_path / "enc", progress=False) == summary
    assert (tmp_path / "enc" / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained


def test_an_internvl_checkpoint_loads_and_a_wrong_one_is_named(tmp_path) -> None:
    source = VisionEncoder(VISION)
    (tmp_path / "internvl").mkdir()
    save_file({f"vision_model.{k}": v.contiguous() for k, v in source.state_dict().items()}
              | {"mlp1.0.weight": torch.zeros(2)}, str(tmp_path / "internvl" / "model.safetensors"))
    target = VisionEncoder(VISION)
    load_vision_encoder(target, tmp_path / "internvl")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))

    with pytest.raises(CheckpointError, match=r"wrong shapes: .*position_embedding"):
        load_vision_encoder(VisionEncoder(VitaConfig.preset("tiny").vision), tmp_path / "internvl")
    with pytest.raises(CheckpointError, match=r"init\.vision_encoder"):
        load_vision_encoder(target, tmp_path / "nowhere")


def test_the_heads_have_a_weight_decay_of_their_own(tmp_path) -> None:
    """AdamW's decoupled decay with a zero gradient: one step scales each parameter by 1 - lr x its group's decay."""
    from vita.training.stand_in import one_cycle_lr, train_loop

    encoder, head = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    train_loop([encoder, head], lambda step: (encoder.sum() + head.sum()) * 0.0, steps=10, lr=0.5,
               weight_decay=0.01, out=tmp_path, log_every=10, desc="", progress=False, start=0.0,
               decay_overrides=[([head], 1.0)])
    factor = 1.0
    for step in range(1, 11):
        factor *= 1 - one_cycle_lr(step, 0.5, 10) * 1.0
    assert torch.allclose(head.detach(), torch.full((3,), factor))
    assert encoder.detach()[0] > 0.97 > factor  # 0.01: barely moved
    assert VisionPretrainConfig().head_weight_decay == 1.0 and "head_weight_decay" in VisionPretrainConfig().key()


def test_the_patch_embedding_starts_as_the_pictures_whitening() -> None:
    """After `whiten_patch_embedding` the patch features of the pictures it saw are centred and decorrelated, the
    strongest at unit variance (the top principal components, the weakest damped by eps); the default random init
    is not decorrelated."""
    from vita.processing.image import normalise_pixels
    from vita.training.vision_pretrain import whiten_patch_embedding

    pixels, _ = attribute_pictures(64, seed=3, vision=VISION)
    x = normalise_pixels(pixels, VISION)
    conv = VisionEncoder(VISION).embeddings.patch_embedding

    def covariance() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            features = conv(x).flatten(2).transpose(1, 2).flatten(0, 1).double()  # (N * P, K)
        return features.mean(0), torch.cov(features.T)

    _, cov = covariance()
    assert not torch.allclose(cov, torch.eye(len(cov), dtype=cov.dtype), atol=0.1)
    whiten_patch_embedding(conv, x)
    mean, cov = covariance()
    assert mean.abs().max() < 1e-3
    # decorrelated; variance lambda / (lambda + eps * lambda_max): 1 for the strongest component, falling with the
    # eigenvalue (the eps damping of the weakest), never above 1
    variance = cov.diagonal()
    assert (cov - torch.diag(variance)).abs().max() < 1e-3
    assert abs(float(variance[0]) - 1) < 0.01 and (variance <= 1 + 1e-9).all() and (variance > 0.05).all()
    assert (variance[1:] <= variance[:-1] + 1e-9).all()  # largest components first
    assert VisionPretrainConfig().whiten_patches and "whiten_patches" in VisionPretrainConfig().key()


def test_sincos_positions_code_the_offset_between_patches() -> None:
    """The 2-D sin-cos init (MAE's): the class token's row is zero, each patch's code is unique, and the dot product
    of two patches' codes depends on their offset alone (what makes attention to neighbours expressible at the
    first step), unlike the default random init."""
    from vita.training.vision_pretrain import sincos_position_embedding

    side = VISION.patches_per_side
    position = VisionEncoder(VISION).embeddings.position_embedding
    assert position.shape == (1, 1 + side * side, VISION.hidden_size)

    def dot(a: tuple[int, int], b: tuple[int, int]) -> float:
        return float(position[0, 1 + a[0] * side + a[1]] @ position[0, 1 + b[0] * side + b[1]])

    assert abs(dot((0, 0), (1, 2)) - dot((5, 7), (6, 9))) > 1e-3  # random: not a function of the offset
    sincos_position_embedding(position, side)
    assert float(position[0, 0].abs().max()) == 0
    codes = position[0, 1:].detach()
    assert torch.cdist(codes, codes).add(torch.eye(side * side)).min() > 1e-3  # no two patches share a code
    for a, b, c, d in (((0, 0), (1, 2), (5, 7), (6, 9)), ((3, 3), (3, 4), (10, 0), (10, 1))):
        assert abs(dot(a, b) - dot(c, d)) < 1e-4
    assert dot((4, 4), (4, 4)) > dot((4, 4), (4, 5)) > dot((4, 4), (4, 9))  # nearer patches are more alike
    assert VisionPretrainConfig().sincos_positions and "sincos_positions" in VisionPretrainConfig().key()
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(torch.nn.Parameter(torch.zeros(1, 5, 6)), 2)


@torch.no_grad()
def test_count_several_scores_the_pictures_of_two_or_more_shapes_alone() -> None:
    """A head that always answers "one" reads half of these counts right, and none of the pictures of several shapes:
    `count` alone would hide that the encoder cannot count past one."""
    heads = AttributeHeads(VISION)
    head = heads.heads["count"]
    head.weight.zero_(), head.bias.zero_()
    head.bias[ATTRIBUTES["count"].index("one")] = 1.0
    counts = torch.tensor([ATTRIBUTES["count"].index(c) for c in ("one", "one", "three", "five")])
    labels = {name: torch.full((4,), IGNORE) for name in ATTRIBUTES}
    labels["count"] = counts
    tokens = torch.randn(4, 64, VISION.connector_in_features)
    scores = heads.accuracy(tokens, labels)
    assert scores["count"] == 0.5 and scores["count_several"] == 0.0
    head.bias.zero_()
    head.bias[ATTRIBUTES["count"].index("three")] = 1.0
    assert heads.accuracy(tokens, labels)["count_several"] == 0.5


def test_pooled_attributes_are_classified_from_the_tokens_mean_and_the_others_from_every_token() -> None:
    """Two tokens whose count logits cancel: their mean says nothing (the loss is ln C); one token alone is sure.
    Classified token by token, the same logits give the mean of the two tokens' cross-entropies instead."""
    torch.manual_seed(0)
    labels = {name: torch.full((1,), IGNORE) for name in ATTRIBUTES}
    labels["centre"] = torch.full((1, 2), float(IGNORE))
    labels["count"] = torch.tensor([2])
    tokens = torch.randn(1, 2, VISION.connector_in_features)
    tokens[0, 1] = -tokens[0, 0]
    classes = len(ATTRIBUTES["count"])
    pooled, every = AttributeHeads(VISION, pooled=("count",)), AttributeHeads(VISION, pooled=())
    every.load_state_dict(pooled.state_dict())
    for heads in (pooled, every):
        heads.heads["count"].bias.data.zero_()
    assert pooled.pooled == ("count",)
    assert torch.allclose(pooled.loss(tokens, labels), torch.tensor(classes).log())
    logits = every.heads["count"](tokens[0])  # (2, C)
    assert torch.allclose(every.loss(tokens, labels), torch.nn.functional.cross_entropy(logits, torch.tensor([2, 2])))
    with pytest.raises(ValueError, match="pooled names"):
        AttributeHeads(VISION, pooled=("size",))


def test_shift_pictures_moves_the_movable_pictures_by_the_drawn_offsets_and_repeats_their_edges() -> None:
    """A single bright pixel lands where the drawn (dx, dy) puts it; the picture not movable is untouched; what a
    shift uncovers repeats the edge, so no black border appears; a shift of 0 changes nothing."""
    pixels = torch.zeros(3, 1, 8, 8)
    pixels[:, 0, 3, 4] = 1.0  # row 3, column 4
    pixels[:, 0, :, 0] = 0.5  # a left edge to repeat
    movable = torch.tensor([True, False, True])
    drawn = torch.randint(-2, 3, (3, 2), generator=torch.Generator().manual_seed(17))  # one right, one left
    out = shift_pictures(pixels, movable, 2, torch.Generator().manual_seed(17))
    assert torch.equal(out[1], pixels[1])
    for i in (0, 2):
        dx, dy = drawn[i].tolist()
        edge = 0.5 * 8 * (1 + dx) if dx >= 0 else 0.0  # moved left, the edge column leaves the picture
        assert out[i, 0, 3 + dy, 4 + dx] == 1.0 and out[i].sum() == pytest.approx(1.0 + edge)
    untouched = torch.Generator().manual_seed(3)
    assert torch.equal(shift_pictures(pixels, movable, 0, untouched), pixels)
    assert torch.equal(untouched.get_state(), torch.Generator().manual_seed(3).get_state())  # the recipe's draws kept
    with pytest.raises(ValueError, match="max_shift"):
        shift_pictures(pixels, movable, -1, torch.Generator())


def test_task_weights_draw_the_pictures_tasks_and_without_them_every_task_is_drawn() -> None:
    _, words = attribute_pictures(40, seed=3, vision=VISION, frame_share=0.0,
                                  task_weights={"colour": 0.0, "shape": 0.0, "count": 0.0, "word": 1.0})
    assert (words["word"] != IGNORE).all()
    _, uniform = attribute_pictures(40, seed=3, vision=VISION, frame_share=0.0)
    assert 0 < int((uniform["word"] != IGNORE).sum()) < 40
    with pytest.raises(ValueError, match="task_weights names"):
        attribute_pictures(4, seed=3, vision=VISION, task_weights={"size": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        attribute_pictures(4, seed=3, vision=VISION, task_weights={"word": 0.0})
    assert VisionPretrainConfig().task_weights["word"] == 2.0 and "task_weights" in VisionPretrainConfig().key()


def test_the_heads_loss_picks_rows_without_a_boolean_mask_and_gives_the_masked_loss_and_gradients() -> None:
    """`AttributeHeads.loss` selects the pictures that have each attribute with `index_select` (a faster backward on
    CPU); the loss and the tokens' gradient are those of boolean-mask indexing, bit for bit."""
    import torch.nn.functional as F

    from vita.training.vision_pretrain import CENTRE_WEIGHT

    torch.manual_seed(0)
    heads = AttributeHeads(VISION)
    n = 6
    labels = {name: torch.randint(0, len(values), (n,)) for name, values in ATTRIBUTES.items() if name != "centre"}
    labels["word"][:4] = IGNORE  # shape pictures: no word
    labels["shape"][4:] = IGNORE  # word pictures: no shape
    labels["centre"] = torch.rand(n, 2)
    labels["centre"][::2] = IGNORE
    tokens = torch.randn(n, 4, VISION.connector_in_features, requires_grad=True)

    def masked(x: torch.Tensor) -> torch.Tensor:
        losses = []
        for name, head in heads.heads.items():
            keep = labels[name] != IGNORE
            if name in heads.pooled:
                losses.append(F.cross_entropy(head(x[keep].mean(1)), labels[name][keep]))
            else:
                logits = head(x[keep])
                losses.append(F.cross_entropy(logits.flatten(0, 1),
                                              labels[name][keep].repeat_interleave(logits.shape[1])))
        keep = labels["centre"][:, 0] != IGNORE
        guess = heads.centre(x[keep])
        losses.append(CENTRE_WEIGHT * F.mse_loss(guess, (labels["centre"][keep] * 2 - 1).unsqueeze(1).expand_as(guess)))
        return torch.stack(losses).mean()

    got = heads.loss(tokens, labels)
    (got_grad,) = torch.autograd.grad(got, tokens)
    want = masked(tokens)
    (want_grad,) = torch.autograd.grad(want, tokens)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_head_decay_scale_gives_the_heads_it_names_a_decay_of_their_own() -> None:
    from vita.training.vision_pretrain import head_decay_groups

    heads = AttributeHeads(VISION)
    groups = head_decay_groups(heads, 0.5, {"colour": 3.0, "shape": 2.0})
    decay = {id(p): d for params, d in groups for p in params}
    assert len(decay) == sum(len(params) for params, _ in groups) == len(list(heads.parameters()))
    assert all(decay[id(p)] == 1.5 for p in heads.heads["colour"].parameters())
    assert all(decay[id(p)] == 1.0 for p in heads.heads["shape"].parameters())
    assert all(decay[id(p)] == 0.5 for p in [*heads.heads["word"].parameters(), *heads.centre.parameters()])
    with pytest.raises(ValueError, match=r"names \['size'\]"):
        head_decay_groups(heads, 1.0, {"size": 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        head_decay_groups(heads, 1.0, {"colour": 0.0})
    assert VisionPretrainConfig().head_decay_scale == {} and "head_decay_scale" in VisionPretrainConfig().key()
