"""How loud each attribute is in the picture tokens: the share of their variance that an attribute explains.

For the first `--limit` training pictures of the curriculum, the vision tower's tokens are taken twice, as the
encoder gives them to the connector (`shuffled_features`) and as the connector gives them to the LLM; for each
attribute (colour, shape, count, word: read from the picture's answers) it prints the between-class variance over
the total variance, per token and for each picture's mean token. With `--clips N`, the same for the frames of the
first N training clips after the connector ("frames"): the shape's row and column in the first and the last frame
the video rule keeps (the 3 x 3 grid cell of the clip's start and end answers; the frames between have none), and
the clip's colour. A linear probe can read an attribute whose share is small (it rescales), while a learner
starting from small random weights, as the LLM does, picks up the loud directions first: docs/training.md, "Why
the LLM does not read shapes".

    python benchmarks/feature_variance.py --model .artifacts/train-tiny/stage3/final \\
        --data .artifacts/train-tiny/curriculum
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from vita.model.vision import shuffled_features
from vita.model.vita import VitaForCausalLM
from vita.processing.image import preprocess_image
from vita.processing.video import decode_video, video_to_pixel_values
from vita.training import curriculum as cur
from vita.training.data import read_manifest

VOCABULARIES = {"colour": tuple(cur.COLOURS), "shape": cur.SHAPES, "count": cur.NUMBER_WORDS, "word": cur.WORDS}


def explained(tokens: Tensor, labels: list[str | None]) -> float:
    """Between-class variance / total variance of the tokens (N, T, D) of the pictures that have a label."""
    keep = [i for i, label in enumerate(labels) if label is not None]
    x = tokens[keep].flatten(0, 1)
    classes = sorted({labels[i] for i in keep})
    y = torch.tensor([classes.index(labels[i]) for i in keep]).repeat_interleave(tokens.shape[1])
    mean = x.mean(0)
    between = sum(((x[y == k].mean(0) - mean) ** 2).sum() * (y == k).sum() for k in range(len(classes)))
    return round(float(between / len(y) / x.var(0, correction=0).sum()), 4)


def _cell(answer: str) -> tuple[str, str]:
    """A grid cell answer ("top left", "left", "centre", ...) as (row, column), "middle" where it names neither."""
    words = answer.split()
    row = next((w for w in words if w in cur.GRID_ROWS), "middle")
    column = next((w for w in words if w in cur.GRID_COLUMNS), "middle")
    return row, column


def _answer(sample, question: str) -> str | None:
    turns = sample.conversation
    return next((turns[k + 1]["content"] for k, t in enumerate(turns[:-1])
                 if t["role"] == "user" and t["content"].endswith(question)), None)


@torch.no_grad()
def measure_frames(tower, vision, data: str | Path, clips: int) -> dict:
    """The shares of the clips' frames: row and column (first and last frame), colour (every frame)."""
    samples = read_manifest(Path(data) / "train" / "video.jsonl")[:clips]
    labels: dict[str, list[str | None]] = {"colour": [], "row": [], "column": []}
    pixels = []
    start_q, end_q = cur.CLIP_POSITION_QUESTIONS["start"][0], cur.CLIP_POSITION_QUESTIONS["end"][0]
    for sample in samples:
        frames = video_to_pixel_values(decode_video(sample.video), vision)  # (F, 3, S, S)
        answers = {t["content"] for t in sample.conversation if t["role"] == "bot"}
        colour = next((a for a in answers if a in cur.COLOURS), None)
        cells = {0: _answer(sample, start_q), len(frames) - 1: _answer(sample, end_q)}
        for f in range(len(frames)):
            cell = _cell(cells[f]) if cells.get(f) else (None, None)
            labels["colour"].append(colour)
            labels["row"].append(cell[0])
            labels["column"].append(cell[1])
        pixels.append(frames)
    x = tower(torch.cat(pixels))
    return {"frames": len(labels["colour"]), "per_token": {n: explained(x, labels[n]) for n in labels},
            "frame_mean": {n: explained(x.mean(1, keepdim=True), labels[n]) for n in labels}}


@torch.no_grad()
def measure(model_dir: str | Path, data: str | Path, limit: int, clips: int = 0) -> dict:
    model = VitaForCausalLM.from_pretrained(model_dir).eval()
    tower = model.vision_tower
    if tower is None:
        raise ValueError(f"{model_dir} has no vision tower")
    samples = read_manifest(Path(data) / "train" / "image.jsonl")[:limit]
    labels: dict[str, list[str | None]] = {name: [] for name in VOCABULARIES}
    for sample in samples:
        answers = {turn["content"] for turn in sample.conversation if turn["role"] == "bot"}
        for name, vocabulary in VOCABULARIES.items():
            labels[name].append(next((a for a in answers if a in vocabulary), None))
    pixels = torch.cat([preprocess_image(s.images[0], model.vita_config.vision) for s in samples])
    stages = {"encoder": shuffled_features(tower.encoder, pixels), "connector": tower(pixels)}
    frames = {}
    if clips:
        frames["frames (after the connector)"] = measure_frames(tower, model.vita_config.vision, data, clips)
    return {"pictures": len(samples), **frames, **{
        stage: {"per_token": {n: explained(x, labels[n]) for n in VOCABULARIES},
                "picture_mean": {n: explained(x.mean(1, keepdim=True), labels[n]) for n in VOCABULARIES}}
        for stage, x in stages.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory with a vision tower")
    parser.add_argument("--data", required=True, help="a curriculum directory (with train/image.jsonl)")
    parser.add_argument("--limit", type=int, default=300, help="first N training pictures (default: %(default)s)")
    parser.add_argument("--clips", type=int, default=0,
                        help="also the frames of the first N training clips: row, column, colour (default: none)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        print(json.dumps(measure(args.model, args.data, args.limit, args.clips), indent=2))
    except Exception as e:  # a one-line error for a wrong path or a broken checkpoint
        print(f"feature_variance: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
