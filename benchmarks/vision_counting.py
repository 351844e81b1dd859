"""Can the vision stand-in count? Trains it the way `vita pretrain-vision` does, with optional extra counting
objectives, and scores the count on 600 held-out counting pictures of 1-6 shapes (docs/training.md, "Counting").

The stand-in's recipe (`vita.training.vision_pretrain`) asks every token for the picture's count; its `probe.json`
scores `count_several` on the 47 of its 400 probe pictures that hold 2-6 shapes. This script scores 504 such
pictures, and can add:

- `--count-share S`: redraw a share S of the pictures as 1-6 shapes to count;
- `--pooled W`: a count classifier on the mean of the tokens, weight W;
- `--count-map {density,centres} --map-weight W`: a token-level count map, either the Gaussian density of the
  shapes' centres regressed per token (Lempitsky & Zisserman, "Learning To Count Objects in Images", 2010) or a
  binary "a shape's centre lies in this token" per token; scored by the map's sum;
- `--map-layer K`: the count map reads layer K's output (deep supervision of an earlier layer) instead of the last;
- `--positions sincos`: the position embedding starts as 2-D sin-cos codes (`vita pretrain-vision`'s default since
  2026-12-04; `random`: as before), and `--lr` another peak learning rate;
- `--layers L`: a tower of L layers instead of the preset's;
- `--save DIR`: write the trained encoder as `vita pretrain-vision` does (sharded safetensors), so that stage 2's
  `init.vision_encoder` can start from it and the learning proof be measured with it.

    python benchmarks/vision_counting.py --count-map centres --map-weight 1 --threads 2

Prints one JSON line: the usual held-out probe on 400 mixed pictures, the count on 2-6 shapes by the per-token
head, by the mean head and by the map's sum, and for `centres` the token-level hit and false-alarm rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vita.model.checkpoint import save_sharded
from vita.model.config import VitaConfig
from vita.model.vision import VisionEncoder, pixel_shuffle, shuffled_features
from vita.processing.image import normalise_pixels, square_rgb
from vita.training import curriculum as cur
from vita.training import vision_pretrain as vp
from vita.training.stand_in import train_loop


def shape_centres(spec: dict) -> list[tuple[float, float]]:
    """The shape centres of `cur.render_image(spec)` as fractions of the side (`cur.picture_shapes`)."""
    return [(cx / cur.IMAGE_SIZE, cy / cur.IMAGE_SIZE) for cx, cy, _ in cur.picture_shapes(spec)]


def count_map(centres: list[tuple[float, float]], side: int, kind: str, sigma: float = 0.6) -> Tensor:
    """(side * side,) in the tokens' row-major order: Gaussian densities summing to the count, or centre flags."""
    out = torch.zeros(side, side)
    if kind == "centres":
        for cx, cy in centres:
            out[min(side - 1, int(cy * side)), min(side - 1, int(cx * side))] = 1
        return out.flatten()
    ys, xs = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    for cx, cy in centres:
        g = torch.exp(-((xs - cx * side) ** 2 + (ys - cy * side) ** 2) / (2 * sigma**2))
        out += g / g.sum()
    return out.flatten()


def pictures(n: int, seed: int, vision, side: int, kind: str, count_share: float, frame_share: float = 0.3):
    """`n` pictures as `vp.attribute_pictures` draws them (uint8 pixels and labels), with their count maps;
    `count_share` of the non-frame pictures redrawn as 1-6 shapes to count (1.0: counting pictures only)."""
    rng = random.Random(seed)
    pixels = torch.empty(n, 3, vision.image_size, vision.image_size, dtype=torch.uint8)
    maps = torch.zeros(n, side * side)
    labels = {name: torch.full((n,), vp.IGNORE) for name in vp.ATTRIBUTES}
    labels["centre"] = torch.full((n, 2), float(vp.IGNORE))
    for k in range(n):
        if rng.random() < frame_share and count_share < 1:
            spec = cur.video_spec(rng)
            image, (cx, cy) = cur.video_frame(spec, 1.0, rng.randrange(cur.clip_frames(1.0)))  # = rng.choice of all
            centres = [(cx / cur.VIDEO_SIZE, cy / cur.VIDEO_SIZE)]
            found = {"colour": spec["colour"], "shape": spec["shape"], "count": "one"}
        else:
            spec = cur.image_spec(rng)
            if rng.random() < count_share:
                spec = dict(spec, task="count", count=rng.randint(1, 6), word=None)
            image, centres = cur.render_image(spec), shape_centres(spec)
            found = {t: a for t, a in cur.image_answers(spec).items() if a is not None}
        pixels[k] = torch.from_numpy(np.array(square_rgb(image, vision.image_size))).permute(2, 0, 1)
        maps[k] = count_map(centres, side, kind)
        for name, value in found.items():
            labels[name][k] = vp.ATTRIBUTES[name].index(value)
    return pixels, maps, labels


def tokens_and_map_input(encoder: VisionEncoder, pixel_values: Tensor, map_layer: int) -> tuple[Tensor, Tensor]:
    """The connector's tokens (N, T, C), and what the count map reads: the same tokens, or (map_layer > 0) the
    output of layer `map_layer` shuffled the same way (deep supervision of an earlier layer)."""
    if not map_layer:
        tokens = shuffled_features(encoder, pixel_values)
        return tokens, tokens
    config = encoder.config
    x = encoder.embeddings(pixel_values)
    early = None
    for i, layer in enumerate(encoder.encoder.layers, 1):
        x = layer(x)
        if i == map_layer:
            early = x

    def shuffle(h: Tensor) -> Tensor:
        side = config.patches_per_side
        grid = (h[:, 1:] * config.feature_scale).reshape(h.shape[0], side, side, -1)
        return pixel_shuffle(grid, config.downsample_ratio).flatten(1, 2)

    return shuffle(x), shuffle(early)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=1100, help="AdamW steps of 32 pictures (the recipe's 1,100)")
    ap.add_argument("--pictures", type=int, default=8000, help="training pictures, rendered once")
    ap.add_argument("--count-share", type=float, default=0.0, help="share of pictures redrawn as shapes to count")
    ap.add_argument("--pooled", type=float, default=0.0, help="weight of a count head on the tokens' mean")
    ap.add_argument("--count-map", choices=("none", "density", "centres"), default="none")
    ap.add_argument("--map-weight", type=float, default=1.0, help="weight of the count map's loss")
    ap.add_argument("--attributes", type=float, default=1.0, help="weight of the recipe's attribute heads")
    ap.add_argument("--map-layer", type=int, default=0,
                    help="the count map reads this layer's output (0: the last, as the other heads)")
    ap.add_argument("--layers", type=int, default=0, help="tower layers (0: the preset's)")
    ap.add_argument("--positions", choices=("sincos", "random"), default="sincos",
                    help="position embedding init: 2-D sin-cos (MAE; the recipe) or random normal")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (the recipe's 3e-3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, help="write the encoder here (stage 2's init.vision_encoder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vision = VitaConfig.preset("tiny-224").vision
    if args.layers:
        vision = dataclasses.replace(vision, num_hidden_layers=args.layers)
    side = vision.image_size // vision.patch_size // 2  # tokens per side after the pixel shuffle
    kind = "centres" if args.count_map == "none" else args.count_map
    start = time.perf_counter()
    pixels, maps, labels = pictures(args.pictures, 1_000_003, vision, side, kind, args.count_share)
    count_px, count_maps, count_labels = pictures(600, 7, vision, side, kind, 1.0)
    mix_px, _, mix_labels = pictures(400, 8, vision, side, kind, 0.0)

    torch.manual_seed(0)
    encoder = VisionEncoder(vision)
    vp.whiten_patch_embedding(encoder.embeddings.patch_embedding, normalise_pixels(pixels[:256], vision))
    if args.positions == "sincos":
        vp.sincos_position_embedding(encoder.embeddings.position_embedding, vision.patches_per_side)
    heads = vp.AttributeHeads(vision)
    map_head = nn.Linear(vision.connector_in_features, 1)
    mean_head = nn.Linear(vision.connector_in_features, len(vp.ATTRIBUTES["count"]))
    params = [*encoder.parameters(), *heads.parameters(), *map_head.parameters(), *mean_head.parameters()]
    draw = torch.Generator().manual_seed(1)
    encoder.train()

    def batch_loss(step: int) -> Tensor:
        idx = torch.randint(0, args.pictures, (32,), generator=draw)
        tokens, map_in = tokens_and_map_input(encoder, normalise_pixels(pixels[idx], vision), args.map_layer)
        batch = {k: v[idx] for k, v in labels.items()}
        loss = args.attributes * heads.loss(tokens, batch)
        if args.count_map == "density":
            loss = loss + args.map_weight * F.mse_loss(map_head(map_in).squeeze(-1), maps[idx] * 10)
        elif args.count_map == "centres":
            loss = loss + args.map_weight * F.binary_cross_entropy_with_logits(
                map_head(map_in).squeeze(-1), maps[idx], pos_weight=torch.tensor(8.0))
        keep = batch["count"] != vp.IGNORE
        if args.pooled and keep.any():
            loss = loss + args.pooled * F.cross_entropy(mean_head(tokens[keep].mean(1)), batch["count"][keep])
        return loss

    with tempfile.TemporaryDirectory() as out:
        train_loop(params, batch_loss, steps=args.steps, lr=args.lr, weight_decay=0.01, out=Path(out), log_every=50,
                   desc="vision stand-in", progress=True, start=start,
                   decay_overrides=[(list(heads.parameters()), 1.0)])
    encoder.eval()
    with torch.no_grad():
        def tokens_of(p: Tensor, which: int = 0) -> Tensor:
            return torch.cat([tokens_and_map_input(encoder, normalise_pixels(p[b:b + 64], vision), args.map_layer)[which]
                              for b in range(0, len(p), 64)])

        tokens, truth = tokens_of(count_px), count_labels["count"]
        several = truth > 0  # class 0 is "one"
        result = {"probe_400_mixed": heads.accuracy(tokens_of(mix_px), mix_labels),
                  "count_2_6_per_token_head": heads.heads["count"](tokens).mean(1).argmax(-1) == truth,
                  "count_2_6_mean_head": mean_head(tokens.mean(1)).argmax(-1) == truth}
        if args.count_map != "none":
            raw = map_head(tokens_of(count_px, 1)).squeeze(-1)  # (600, side * side)
            total = (raw > 0).float().sum(1) if args.count_map == "centres" else (raw / 10).sum(1)
            result["count_2_6_map_sum"] = total.round().clamp(1, 6).long() - 1 == truth
            result["map_sum_mean_by_count"] = [round(float(total[truth == c].mean()), 2) for c in range(6)]
            if args.count_map == "centres":
                hit = count_maps > 0.5
                result["centre_tokens_found"] = round(float((raw > 0)[hit].float().mean()), 3)
                result["false_alarms_per_empty_token"] = round(float((raw > 0)[~hit].float().mean()), 3)
        for key, value in result.items():
            if isinstance(value, Tensor):
                result[key] = round(float(value[several].float().mean()), 3)
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result["seconds"] = round(time.perf_counter() - start)
    if args.save:
        save_sharded({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, args.save)
        (args.save / "config.json").write_text(json.dumps({"vision": dataclasses.asdict(vision),
                                                           "pretraining": result}, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
