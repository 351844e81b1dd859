"""Is what the image questions ask in the vision encoder's features? A linear probe per task, scored on held-out.

For the curriculum's pictures (training split to fit, held-out split to score) the vision encoder's patch features
(N, patches, width) are pooled (mean over patches, or all patches flattened) and one linear classifier per task
(colour, shape, count, word) is fitted on the training pictures' answers. Held-out accuracy bounds what the LLM can
read through a frozen encoder from this much data: a task the probe cannot tell apart on unseen pictures is one
the connector and the LLM will not learn either (docs/training.md, "What a frozen random encoder holds").

`--pretrain-epochs N` first trains the encoder (and a linear head) to tag each training picture with the words of
its answers (multi-label binary cross-entropy on the mean-pooled features), as an encoder pretrained elsewhere
would arrive: the probe then says what that pretraining bought.

    python benchmarks/encoder_probe.py --model .artifacts/train-tiny/stage1/final \
        --data .artifacts/train-tiny/curriculum --pretrain-epochs 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vita.model.vita import VitaForCausalLM
from vita.processing.image import preprocess_image
from vita.training.curriculum import QUESTION_TASKS
from vita.training.data import read_manifest
from vita.training.sample import Sample

TASKS = ("colour", "shape", "count", "word")


def task_of(question: str) -> str:
    """The curriculum's task a typed question asks; `question` may start with the picture's `<image>` line."""
    return QUESTION_TASKS[question.rsplit("\n", 1)[-1]]


def answers(sample: Sample) -> dict[str, str]:
    """{task: answer} for every question of a picture's conversation."""
    turns = sample.conversation
    return {task_of(q["content"]): a["content"] for q, a in zip(turns[0::2], turns[1::2])}


def load(data: Path, split: str, model: VitaForCausalLM) -> tuple[Tensor, list[dict[str, str]]]:
    """Pixels (N, 3, S, S) of the split's image pictures and their answers by task."""
    samples = read_manifest(data / split / "image.jsonl")
    pixels = torch.stack([preprocess_image(s.images[0], model.vita_config.vision)[0] for s in samples])
    return pixels, [answers(s) for s in samples]


def features(encoder: torch.nn.Module, pixels: Tensor, batch: int = 64) -> Tensor:
    """(N, patches, width) encoder features, no gradients."""
    with torch.no_grad():
        return torch.cat([encoder(pixels[b : b + batch]) for b in range(0, len(pixels), batch)])


def pretrain(encoder: torch.nn.Module, pixels: Tensor, labels: list[dict[str, str]], epochs: int,
             lr: float) -> list[float]:
    """Multi-label tagging of each picture with its answer words; returns the mean loss per epoch."""
    words = sorted({w for y in labels for w in y.values()})
    index = {w: i for i, w in enumerate(words)}
    target = torch.zeros(len(labels), len(words))
    for n, y in enumerate(labels):
        target[n, [index[w] for w in y.values()]] = 1.0
    width = features(encoder, pixels[:1]).shape[-1]
    head = torch.nn.Linear(width, len(words))
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    encoder.train()
    losses = []
    for _ in range(epochs):
        order, total = torch.randperm(len(pixels)), 0.0
        for b in range(0, len(order), 32):
            idx = order[b : b + 32]
            loss = F.binary_cross_entropy_with_logits(head(encoder(pixels[idx]).mean(1)), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(round(total / len(order), 4))
    encoder.eval()
    return losses


def linear_probe(train: Tensor, train_y: list[str], test: Tensor, test_y: list[str],
                 iterations: int = 150) -> tuple[float, float]:
    """(training, held-out) accuracy of a softmax classifier, weights and bias, fitted on standardised features by
    L-BFGS with a small L2 penalty (the usual linear probe: CLIP's paper fits its probes with L-BFGS too)."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mu) / sd, (test - mu) / sd
    labels = sorted(set(train_y))
    index = {a: i for i, a in enumerate(labels)}
    y = torch.tensor([index[a] for a in train_y])
    w = torch.zeros(train.shape[1], len(labels), requires_grad=True)
    b = torch.zeros(len(labels), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(train @ w + b, y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        fit = round(float(((train @ w + b).argmax(1) == y).float().mean()), 3)
        seen = [k for k, a in enumerate(test_y) if a in index]
        if not seen:
            return fit, float("nan")
        guess = (test[seen] @ w + b).argmax(1)
        return fit, round(float((guess == torch.tensor([index[test_y[k]] for k in seen])).float().mean()), 3)


def probe(train: Tensor, train_labels: list[dict[str, str]], test: Tensor,
          test_labels: list[dict[str, str]]) -> dict[str, dict[str, dict[str, float]]]:
    """{pool: {task: {"train": accuracy, "heldout": accuracy}}} for mean-pooled and flattened features."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for pool, reduce in (("mean", lambda f: f.mean(1)), ("flat", lambda f: f.flatten(1))):
        a, b = reduce(train), reduce(test)
        out[pool] = {}
        for task in TASKS:
            tr = [(k, y[task]) for k, y in enumerate(train_labels) if task in y]
            te = [(k, y[task]) for k, y in enumerate(test_labels) if task in y]
            if tr and te:
                fit, heldout = linear_probe(a[[k for k, _ in tr]], [v for _, v in tr],
                                            b[[k for k, _ in te]], [v for _, v in te])
                out[pool][task] = {"train": fit, "heldout": heldout}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory with a vision tower")
    parser.add_argument("--data", required=True, help="a curriculum directory (train/ and heldout/image.jsonl)")
    parser.add_argument("--pretrain-epochs", type=int, default=0, help="tag-pretrain the encoder first (default: 0)")
    parser.add_argument("--lr", type=float, default=1e-3, help="tag pretraining's AdamW rate (default: 1e-3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        model = VitaForCausalLM.from_pretrained(args.model).eval()
        if model.vision_tower is None:
            raise ValueError(f"{args.model} has no vision tower")
        encoder = model.vision_tower.encoder
        train, train_labels = load(Path(args.data), "train", model)
        test, test_labels = load(Path(args.data), "heldout", model)
    except Exception as e:  # a one-line error for a wrong path or a broken checkpoint
        print(f"encoder_probe: error: {e}", file=sys.stderr)
        return 2
    report: dict = {"train_pictures": len(train), "heldout_pictures": len(test)}
    report["frozen"] = probe(features(encoder, train), train_labels, features(encoder, test), test_labels)
    if args.pretrain_epochs:
        t = time.perf_counter()
        report["pretrain_loss"] = pretrain(encoder, train, train_labels, args.pretrain_epochs, args.lr)
        report["pretrain_seconds"] = round(time.perf_counter() - t, 1)
        report["pretrained"] = probe(features(encoder, train), train_labels, features(encoder, test), test_labels)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
