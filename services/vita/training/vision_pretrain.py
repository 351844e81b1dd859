"""A stand-in for the pretrained vision encoder, for tiny runs: teach the tiny InternViT what the pictures hold.

At full size VITA starts from InternViT-300M-448px, an encoder that arrives knowing colours, shapes, counts and
text; stage 2 only aligns a connector to it. No such weights exist for the tiny preset and none can be downloaded
here, and a random tiny ViT is close to a linear map of its patches: linear probes of it read a held-out picture's
colour but not its shape, count or word (docs/training.md, "What a frozen random encoder holds"). This step gives
the tiny tower what pretraining gives InternViT, on pictures of its own: it renders pictures the way the curriculum
does (`curriculum.image_spec`/`render_image`, and frames of `curriculum.video_spec` clips) from a seed of its own,
written words twice as often as the curriculum's other picture tasks, and trains the encoder with one linear head
per attribute (colour, shape, count, word, and for a single shape its column and row, classified, and its centre,
regressed) on every output token: each of the tokens the connector receives is trained to tell the whole picture's
attributes, so that the LLM can read any of them; the count and the word are trained on the tokens' mean
(`POOLED`), and word pictures are shifted by a few pixels at every draw (`word_shift`). The heads
are dropped; the encoder is written in InternViT's parameter names, which is what a stage's `init.vision_encoder`
loads (a real InternViT-300M-448px directory loads the same way at full size).

    vita pretrain-vision --preset tiny-112 --output .artifacts/train-tiny/vision-encoder

Writes `model.safetensors` (the encoder), `config.json` (its VisionConfig and these settings), `metrics.jsonl`
(loss per logged step) and `probe.json` (per-attribute accuracy on pictures drawn from another seed,
`count_several`: count on the pictures of two or more shapes alone, and `column_centre` / `row_centre`: the quarter
of the regressed centre).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vita.errors import InvalidInputError
from vita.model.checkpoint import load_pretrained_encoder, save_sharded
from vita.model.config import VisionConfig, VitaConfig
from vita.model.vision import VisionEncoder, shuffled_features
from vita.processing.image import normalise_pixels, square_rgb
from vita.training import curriculum as cur
from vita.training.stand_in import reused_summary, train_loop

log = logging.getLogger("vita.training")

POSITION_BINS = 4  # a single shape's centre: which quarter of the width (column) and of the height (row)
ATTRIBUTES = {
    "colour": tuple(cur.COLOURS),
    "shape": cur.SHAPES,
    "count": cur.NUMBER_WORDS[1:7],
    "word": cur.WORDS,
    "column": tuple(range(POSITION_BINS)),
    "row": tuple(range(POSITION_BINS)),
}
IGNORE = -100  # an attribute the picture does not have (a word picture's shape)
# One classifier head each. A single shape's column and row are classified as well as regressed (`centre`): the
# regression alone left position 2% of a frame's token variance (colour 44%), too quiet for the LLM to read; classified
# under the heads' decay it is 6.5% after the connector, and the held-out pictures' shapes, words and counts read
# better too (docs/training.md, "Position classified").
CLASSIFIED = ("colour", "shape", "count", "word", "column", "row")
# Attributes classified from the tokens' mean instead of from every token: each token may then say how much of the
# picture's ink it holds and the mean sums them, where one token alone must gather the whole count by attention. Held
# out, 2-6 shapes counted 0.34 -> 0.48 at the same steps (docs/training.md, "Counting from the tokens' mean"). The
# word too, with word pictures shifted (`word_shift`): the tokens away from the text need not guess it; in four
# stage-3 pairs over two data seeds, image 0.588 -> 0.605, 0.593 -> 0.615, 0.550 -> 0.608, 0.610 -> 0.600 and spoken
# 0.450 -> 0.497, 0.453 -> 0.507, 0.453 -> 0.500, 0.430 -> 0.480 (docs/training.md, "Words: what stage 3's 200 word
# pictures let a reader learn").
POOLED = ("count", "word")
# The centre's regression loss, against the classifiers' cross-entropies (about 1.6 at the start, where the centre's
# squared error is about 0.3): weighted so that position is learnt alongside them.
CENTRE_WEIGHT = 4.0
VERSION = 5  # bump when the pictures or the objective change, so a saved encoder is not reused


@dataclass
class VisionPretrainConfig:
    """What `pretrain_vision_encoder` does; the defaults are `make train-tiny`'s."""

    preset: str = "tiny-112"
    seed: int = 0  # the encoder's random init (torch.manual_seed), as stage 1's init.seed
    data_seed: int = 1_000_003  # the pictures' seed: not the curriculum's (0), so they are pictures of their own
    # rendered once and drawn from at random (3,000 over-fit, 8,000 at 2,200 steps too; at 24,000 the word head
    # still reads 0.60 of its training words against 0.36-0.43 held out: 36,000 with words drawn twice as often)
    pictures: int = 36000
    frame_share: float = 0.3  # share of the pictures that are frames of moving-shape clips
    # How often each IMAGE_QUESTIONS task is drawn for the pictures that are not frames (the curriculum: uniformly).
    # Words twice as often: held-out words 0.43 -> 0.53 with POOLED and 36,000 pictures (docs/training.md, same
    # section); counts twice as often read no better (2-6 shapes 0.32 -> 0.32).
    task_weights: dict[str, float] = field(default_factory=lambda: {"colour": 1.0, "shape": 1.0, "count": 1.0,
                                                                    "word": 2.0})
    # 4,400 at tiny-112 take the time of 1,100 at tiny-224 and read more held out: shape 0.90 -> 0.96, words 0.21 ->
    # 0.39, 2-6 shapes counted 0.17 -> 0.30, a shape's column and row 0.72 -> 0.88 (docs/training.md, "112-pixel tiles")
    steps: int = 4400
    batch_size: int = 32
    lr: float = 3e-3  # peak of a one-cycle schedule (10% warmup, cosine down)
    weight_decay: float = 0.01
    # The heads' own (decoupled) weight decay: with small head weights the encoder must carry each answer in
    # large feature directions, so the attributes are loud in what the LLM is given (shape's share of the token
    # variance 0.018 -> 0.142 at the same held-out accuracy: docs/training.md, "Why the LLM does not read shapes")
    head_weight_decay: float = 1.0
    # Per attribute, a multiple of head_weight_decay for that head alone (`head_decay_groups`): a larger decay keeps an
    # attribute louder once it is learnt, as head_weight_decay does for all. At 8,800 steps {colour: 3, shape: 3} kept
    # colour's share after the connector at 0.082 instead of 0.055 (docs/training.md, "Colour louder by its head's decay").
    head_decay_scale: dict[str, float] = field(default_factory=dict)
    probe_pictures: int = 2000  # scored after training, from data_seed + 1 (400 held ~70 words: +-0.06)
    whiten_patches: bool = True  # patch embedding initialised as the pictures' PCA whitening (whiten_patch_embedding)
    # position embedding initialised as 2-D sin-cos codes (sincos_position_embedding) instead of random: a shape's
    # position read +0.12 per axis, shape +0.01 to +0.12, at the same steps (docs/training.md, "Sin-cos positions")
    sincos_positions: bool = True
    # The attributes classified from the tokens' mean (`AttributeHeads`); ("count",) and `word_shift` 0 were the
    # recipe until 2026-12-05 (POOLED says why they changed).
    pooled: tuple[str, ...] = POOLED
    # Each draw of a word picture moves it by up to this many pixels each way (edges repeated; `shift_pictures`); 7 is
    # half a 14-pixel patch, so a word falls across the patch grid at every offset. Pictures with a position label
    # or several shapes to count keep their place. 0: none, and no draw (the batches of the recipe before).
    word_shift: int = 7
    threads: int | None = None
    log_every: int = 50

    def key(self) -> dict[str, Any]:
        """What decides the weights: an output directory holding the same key is reused as is."""
        d = dataclasses.asdict(self)
        d.pop("threads"), d.pop("log_every")
        d["pooled"] = list(d["pooled"])  # as config.json holds it, so that a saved key compares equal
        return {"version": VERSION, **d}


def attribute_pictures(n: int, seed: int, vision: VisionConfig, frame_share: float = 0.3, *, workers: int = 2,
                       chunk: int = 500, task_weights: dict[str, float] | None = None
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """`n` pictures as uint8 pixels (n, 3, S, S) at the encoder's tile size S, and their attribute labels
    {attribute: (n,) class indices, IGNORE where the picture lacks it}, with "centre": (n, 2) the single shape's
    centre (x, y) as fractions of the side (IGNORE where the picture holds no single shape; the clip's own centre in
    a frame, the ink's centroid in a picture). A picture that is not a frame asks an IMAGE_QUESTIONS task drawn
    with `task_weights` ({task: weight}; None: uniformly, as the curriculum). Deterministic in `seed`: the pictures
    are drawn one after another and rendered by `workers` processes, `chunk` pictures per task, the same pixels for
    any number. Raises ValueError for a weight naming no task, or no positive weight."""
    rng = random.Random(seed)
    tasks = weights = None
    if task_weights is not None:
        if unknown := set(task_weights) - set(cur.IMAGE_QUESTIONS):
            raise ValueError(f"task_weights names {sorted(unknown)}, not tasks of {', '.join(cur.IMAGE_QUESTIONS)}")
        tasks, weights = list(task_weights), list(task_weights.values())
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"task_weights must be >= 0 with a positive sum, got {task_weights}")
    frames = cur.clip_frames(1.0)
    drawn: list[tuple[dict[str, Any], int | None]] = []  # (spec, the frame of a clip, None for a picture)
    for _ in range(n):
        if rng.random() < frame_share:
            spec = cur.video_spec(rng)
            drawn.append((spec, rng.randrange(frames)))
        else:
            task = rng.choices(tasks, weights)[0] if tasks else None
            drawn.append((cur.image_spec(rng, task), None))
    size = vision.image_size
    pixels = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = {name: torch.full((n,), IGNORE) for name in ATTRIBUTES}
    labels["centre"] = torch.full((n, 2), float(IGNORE))
    chunks = [drawn[i : i + chunk] for i in range(0, n, chunk)]  # 500 tiny-112 pictures: 18 MB sent back
    if workers > 1 and len(chunks) > 1:
        # Processes, not threads: Pillow's drawing holds the GIL (two threads rendered no faster than one). Forked,
        # so the workers start at once and import nothing; they run Pillow and numpy alone, never torch.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        rendered = (p for part in pool.map(_attribute_chunk, chunks, itertools.repeat(size)) for p in part)
    else:
        pool, rendered = None, (p for part in chunks for p in _attribute_chunk(part, size))
    try:
        for k, (picture, found, centre) in enumerate(rendered):
            pixels[k] = torch.from_numpy(picture).permute(2, 0, 1)
            for name, value in found.items():
                labels[name][k] = ATTRIBUTES[name].index(value)
            if centre is not None:
                labels["centre"][k] = torch.tensor(centre)
                labels["column"][k], labels["row"][k] = (min(POSITION_BINS - 1, int(c * POSITION_BINS)) for c in centre)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return pixels, labels


def _attribute_chunk(chunk: list[tuple[dict[str, Any], int | None]], size: int
                     ) -> list[tuple[np.ndarray, dict[str, str], tuple[float, float] | None]]:
    return [_attribute_picture(spec, frame, size) for spec, frame in chunk]


def _attribute_picture(spec: dict[str, Any], frame: int | None, size: int
                       ) -> tuple[np.ndarray, dict[str, str], tuple[float, float] | None]:
    """One picture of `attribute_pictures`: (S, S, 3) uint8 pixels, its attributes' answers, its single shape's
    centre (fractions of the side) or None."""
    if frame is not None:
        image, (cx, cy) = cur.video_frame(spec, 1.0, frame)
        found = {"colour": spec["colour"], "shape": spec["shape"], "count": "one"}
        centre: tuple[float, float] | None = (cx / cur.VIDEO_SIZE, cy / cur.VIDEO_SIZE)
    else:
        image = cur.render_image(spec)
        found = {t: a for t, a in cur.image_answers(spec).items() if a is not None}
        centre = None
    picture = np.array(square_rgb(image, size))
    if centre is None and found.get("count") == "one":
        centre = _ink_centre(picture)
    return picture, found, centre


def _ink_centre(picture: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid, as fractions of the side, of a uint8 (S, S, 3) picture's pixels far from its background
    (the corner pixel's colour: the curriculum's backgrounds are plain): more than 60 away in RGB."""
    far = picture.astype(np.int32) - picture[:1, :1].astype(np.int32)
    y, x = np.nonzero((far * far).sum(-1) > 60 * 60)  # integer squares: the same pixels as a float norm > 60
    mean_x, mean_y = (float(np.float32(a.sum()) / np.float32(a.size)) for a in (x, y))  # float32, as torch's mean
    return (mean_x + 0.5) / picture.shape[1], (mean_y + 0.5) / picture.shape[0]


WHITEN_PICTURES = 256  # pictures whose patches estimate the whitening (16,384 patches at tiny-112)


@torch.no_grad()
def whiten_patch_embedding(conv: nn.Conv2d, pixels: Tensor, eps: float = 1e-3) -> None:
    """Data-dependent init of the patch embedding (C -> K channels, kernel = stride = p) from normalised pixels
    (N, C, S, S): its K filters become the top K principal components of the pictures' p x p patches, each scaled to
    unit variance, and its bias centres them. The encoder then starts from decorrelated, equally loud patch features
    instead of random projections dominated by colour: PCA whitening of patches (Coates & Ng, "An Analysis of
    Single-Layer Networks in Unsupervised Feature Learning", 2011), as airbench initialises its first convolution
    (Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", 2024). `eps` (a share of the largest eigenvalue)
    keeps the weakest components from being amplified without bound."""
    p = conv.kernel_size[0]
    patches = F.unfold(pixels, p, stride=p).transpose(1, 2).flatten(0, 1).double()  # (N * P, C * p * p)
    mean = patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((patches - mean).T))  # ascending
    k = conv.out_channels
    top = eigenvectors[:, -k:].flip(-1)  # (C * p * p, K), largest first
    scale = (eigenvalues[-k:].flip(-1) + eps * eigenvalues[-1]).rsqrt()
    weight = (top * scale).T  # (K, C * p * p)
    conv.weight.copy_(weight.view_as(conv.weight).to(conv.weight.dtype))
    conv.bias.copy_((-(weight @ mean)).to(conv.bias.dtype))


@torch.no_grad()
def sincos_position_embedding(position: nn.Parameter, side: int) -> None:
    """Initialises a (1, 1 + side * side, D) position embedding as fixed 2-D sin-cos codes: half the channels encode
    the patch's row and half its column, each as sin and cos of D/4 frequencies from 1 to 1/10000 (MAE's
    `get_2d_sincos_pos_embed`: He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021); the class
    token's row is zero. Dot products of these codes depend on the offset between patches, so attention to
    neighbours is expressible from the first step instead of learnt per position."""
    width = position.shape[-1]
    if width % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def codes(pos: Tensor) -> Tensor:
        angle = pos.flatten().double()[:, None] * omega  # (side * side, D/4)
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    table = torch.cat([codes(rows), codes(cols)], dim=1)  # (side * side, D)
    position.zero_()
    position[0, 1:] = table.to(position.dtype)


def shift_pictures(pixels: Tensor, movable: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """pixels (N, C, S, S) float, movable (N,) bool -> (N, C, S, S): each movable picture moved by (dx, dy) drawn
    uniformly from [-max_shift, max_shift], its edge pixels repeated into what it uncovers; the others unchanged.

    Random translation, the oldest augmentation for reading (LeCun et al. 1998 trained on shifted digits): a ViT's
    patch embedding sees a letter differently at each offset from the 14-pixel grid, and the rendered word pictures
    are too few to show every word at every offset. The shifts are drawn for every picture, so the draws do not
    depend on which pictures move; a `max_shift` of 0 draws nothing. Raises ValueError for a negative `max_shift`."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return pixels
    shifts = torch.randint(-max_shift, max_shift + 1, (pixels.shape[0], 2), generator=generator)  # (N, 2) dx, dy
    if not movable.any():
        return pixels
    side = pixels.shape[-1]
    padded = F.pad(pixels, (max_shift,) * 4, mode="replicate")  # (N, C, S + 2m, S + 2m)
    out = pixels.clone()
    for i in movable.nonzero().flatten().tolist():
        top, left = max_shift - int(shifts[i, 1]), max_shift - int(shifts[i, 0])
        out[i] = padded[i, :, top : top + side, left : left + side]
    return out


class AttributeHeads(nn.Module):
    """Linear heads applied to every token the connector would receive (`shuffled_features`): one classifier per
    attribute of CLASSIFIED (a single shape's column and row among them), and a regression of a single shape's
    centre (x, y), so that position is also one linear direction per axis in the tokens. The attributes of `pooled`
    are classified from the tokens' mean instead."""

    def __init__(self, vision: VisionConfig, pooled: tuple[str, ...] = POOLED) -> None:
        super().__init__()
        if unknown := set(pooled) - set(CLASSIFIED):
            raise ValueError(f"pooled names {sorted(unknown)}, not attributes of {', '.join(CLASSIFIED)}")
        self.pooled = tuple(pooled)
        self.heads = nn.ModuleDict({name: nn.Linear(vision.connector_in_features, len(ATTRIBUTES[name]))
                                    for name in CLASSIFIED})
        self.centre = nn.Linear(vision.connector_in_features, 2)

    def loss(self, tokens: Tensor, labels: dict[str, Tensor]) -> Tensor:
        """tokens (N, T, D). Mean over attributes of the token-wise cross-entropy against the picture's label (for
        `pooled` attributes, of the tokens' mean), and CENTRE_WEIGHT x the token-wise squared error of the centre
        (in [-1, 1] per axis). The pictures that have an attribute are picked with `index_select`, whose backward
        adds rows back (`index_add_`), not with a boolean mask, whose backward (`index_put_` accumulating) took a
        tenth of a step on CPU."""
        losses = []
        for name, head in self.heads.items():
            rows = (labels[name] != IGNORE).nonzero().squeeze(1)
            if len(rows):
                y = labels[name].index_select(0, rows)
                if name in self.pooled:
                    losses.append(F.cross_entropy(head(tokens.index_select(0, rows).mean(1)), y))  # (n, C), (n,)
                    continue
                logits = head(tokens.index_select(0, rows))  # (n, T, C)
                losses.append(F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(logits.shape[1])))
        rows = (labels["centre"][:, 0] != IGNORE).nonzero().squeeze(1)
        if len(rows):
            guess = self.centre(tokens.index_select(0, rows))  # (n, T, 2)
            target = (labels["centre"].index_select(0, rows) * 2 - 1).unsqueeze(1).expand_as(guess)
            losses.append(CENTRE_WEIGHT * F.mse_loss(guess, target))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def accuracy(self, tokens: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
        """Per attribute: how often the tokens' mean logits pick the picture's label; `column_centre` and
        `row_centre`: how often the tokens' mean regressed centre falls in the label's quarter. `count_several`:
        count on the pictures of two or more shapes alone (about one counted picture in seven: the others hold a
        single shape, so `count` mostly says whether the encoder tells one shape from several)."""
        out = {}
        for name, head in self.heads.items():
            keep = labels[name] != IGNORE
            if keep.any():
                truth = labels[name][keep]
                right = head(tokens[keep]).mean(1).argmax(-1) == truth
                out[name] = round(float(right.float().mean()), 3)
                if name == "count" and (several := truth > ATTRIBUTES[name].index("one")).any():
                    out["count_several"] = round(float(right[several].float().mean()), 3)
        keep = labels["column"] != IGNORE
        if keep.any():
            centre = (self.centre(tokens[keep]).mean(1) + 1) / 2  # (n, 2) in [0, 1]
            bins = (centre * POSITION_BINS).floor().clamp(0, POSITION_BINS - 1).long()
            for axis, name in enumerate(("column", "row")):
                out[f"{name}_centre"] = round(float((bins[:, axis] == labels[name][keep]).float().mean()), 3)
        return out


def head_decay_groups(heads: AttributeHeads, decay: float, scale: dict[str, float]
                      ) -> list[tuple[list[nn.Parameter], float]]:
    """The heads' weight decay as `train_loop`'s (parameters, decay) overrides: `decay` for every head, times
    `scale[name]` for the heads it names (the centre regression keeps `decay`).

    Raises `ValueError` for a name that is not a classified attribute or a scale that is not positive.
    """
    if unknown := set(scale) - set(heads.heads):
        raise ValueError(f"head_decay_scale names {sorted(unknown)}, not attributes of {', '.join(CLASSIFIED)}")
    if bad := {k: v for k, v in scale.items() if not v > 0}:
        raise ValueError(f"head_decay_scale must be > 0, got {bad}")
    return [(list(head.parameters()), decay * scale.get(name, 1.0)) for name, head in heads.heads.items()] + [
        (list(heads.centre.parameters()), decay)]


def pretrain_vision_encoder(config: VisionPretrainConfig, output: str | Path, *, progress: bool = True,
                            overwrite: bool = False) -> dict[str, Any]:
    """Trains the preset's vision encoder on attribute pictures, writes it under `output`, returns the summary
    (what `config.json` holds under "pretraining"). A directory that already holds this config's key is reused.

    Raises `InvalidInputError` for an unknown preset or one without a vision tower.
    """
    out = Path(output)
    if not overwrite and (reused := reused_summary(out, config.key(), "vision encoder")) is not None:
        return reused
    vision = VitaConfig.preset(config.preset).vision
    if vision is None:
        raise InvalidInputError(f"preset {config.preset!r} has no vision tower")
    if config.threads:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    pixels, labels = attribute_pictures(config.pictures, config.data_seed, vision, config.frame_share,
                                        workers=config.threads or 2, task_weights=config.task_weights)
    render_s = time.perf_counter() - start
    torch.manual_seed(config.seed)
    encoder = VisionEncoder(vision)
    if config.whiten_patches:
        whiten_patch_embedding(encoder.embeddings.patch_embedding, normalise_pixels(pixels[:WHITEN_PICTURES], vision))
    if config.sincos_positions:
        sincos_position_embedding(encoder.embeddings.position_embedding, vision.patches_per_side)
    heads = AttributeHeads(vision, tuple(config.pooled))
    params = [*encoder.parameters(), *heads.parameters()]
    draw = torch.Generator().manual_seed(config.data_seed)
    encoder.train()

    def batch_loss(step: int) -> Tensor:
        idx = torch.randint(0, config.pictures, (config.batch_size,), generator=draw)
        batch = {k: v[idx] for k, v in labels.items()}
        x = shift_pictures(normalise_pixels(pixels[idx], vision), batch["word"] != IGNORE, config.word_shift, draw)
        return heads.loss(shuffled_features(encoder, x), batch)

    train_loop(params, batch_loss, steps=config.steps, lr=config.lr, weight_decay=config.weight_decay, out=out,
               log_every=config.log_every, desc="vision encoder", progress=progress, start=start,
               decay_overrides=head_decay_groups(heads, config.head_weight_decay, config.head_decay_scale))
    encoder.eval()
    probe = probe_encoder(encoder, heads, vision, config.probe_pictures, config.data_seed + 1)
    summary = {"key": config.key(), "train_s": round(time.perf_counter() - start, 1), "render_s": round(render_s, 1),
               "heldout_accuracy": probe}
    save_sharded({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, out)
    (out / "probe.json").write_text(json.dumps(probe, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps({"vision": dataclasses.asdict(vision), "pretraining": summary}, indent=2) + "\n")
    log.info("vision encoder written to %s: held-out accuracy %s", out, probe)
    return summary


@torch.no_grad()
def probe_encoder(encoder: VisionEncoder, heads: AttributeHeads, vision: VisionConfig, n: int, seed: int
                  ) -> dict[str, float]:
    """Per-attribute accuracy of the trained heads on `n` new pictures from `seed`."""
    pixels, labels = attribute_pictures(n, seed, vision)
    tokens = torch.cat([shuffled_features(encoder, normalise_pixels(pixels[b : b + 64], vision)) for b in range(0, n, 64)])
    return heads.accuracy(tokens, labels)


def load_vision_encoder(encoder: VisionEncoder, directory: str | Path) -> None:
    """Loads InternViT weights (ours from `pretrain_vision_encoder`, or InternVL's with a `vision_model.` prefix)
    into `encoder`. Raises `CheckpointError` when a tensor is missing, extra or of another shape."""
    load_pretrained_encoder(encoder, directory, prefix="vision_model.", what="init.vision_encoder")


__all__ = ["ATTRIBUTES", "AttributeHeads", "VisionPretrainConfig", "attribute_pictures", "load_vision_encoder",
           "pretrain_vision_encoder", "shift_pictures", "sincos_position_embedding", "whiten_patch_embedding"]
