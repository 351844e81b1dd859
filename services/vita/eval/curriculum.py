"""The learning-proof eval: the curriculum's held-out split (or any manifest), scored the way issue 9 states it.

| metric | samples | correct when |
|---|---|---|
| `image_qa`, `video_qa`, `text_qa`, `caption` | typed questions (`<3>` or no state) of that kind | the answer matches exactly (case, spacing and surrounding punctuation aside) |
| `spoken_qa` | spoken questions (`<1>`) | the answer after the state token matches exactly |
| `query_acceptance` | spoken questions (`<1>`) | the model's first token is `<1>` |
| `nonquery_rejection` | chatter and noise (`<2>`) | the model's first token is `<2>` |
| `asr_wer` | ASR samples | corpus WER over all of them (jiwer), lower is better |

Each exact-match metric is also broken down by `meta["task"]` (`image_qa/colour`, ...), and paired with
`majority_baseline`: the score of always giving each task's most common reference answer, i.e. what a model that
ignores the picture, clip or speech can reach. Rejection is broken down by what was heard (`nonquery_rejection/en`,
`/zh`, ..., `/noise`), and `nonquery_accepted` counts the chatter taken for a question by phrase and voice
(`{"honey did you feed the cat (en-m-low)": 7}`, most often first): what a change to the monitor's training moves.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vita.eval.answer import Answer, Query
from vita.eval.core import Benchmark, Item
from vita.eval.metrics import exact_match, normalize, word_error_rate
from vita.processing.prompt import Message
from vita.training.data import DataError, read_manifest
from vita.training.sample import Sample

ASR_TOKENS = 64
ANSWER_TOKENS = 16


def manifests(path: Path) -> list[Path]:
    """A manifest file as is; a curriculum directory's held-out manifests (from its `curriculum.json`)."""
    if path.is_file():
        return [path]
    info = path / "curriculum.json"
    if not info.is_file():
        raise DataError(f"{path}: not a manifest file nor a curriculum directory (no curriculum.json)")
    try:
        listed = json.loads(info.read_text())["manifests"]
    except (ValueError, KeyError) as e:
        raise DataError(f"{info}: not a curriculum description: {e}") from None
    held = [path / rel for name, rel in sorted(listed.items()) if name.startswith("heldout/")]
    if not held:
        raise DataError(f"{info}: lists no held-out manifests")
    return held


def load(path: Path, limit: int | None) -> list[Item]:
    """Every sample of the held-out manifests (the first `limit` of each, so every category stays in)."""
    items = []
    for manifest in manifests(path):
        samples = read_manifest(manifest)
        for k, sample in enumerate(samples if limit is None else samples[:limit]):
            items.append(sample_item(sample, f"{manifest.stem}-{k}"))
    return items


def sample_item(sample: Sample, item_id: str) -> Item:
    """The query a sample's last user turn makes (earlier turns are history), its answer as the reference."""
    turns = list(sample.conversation)
    system = turns.pop(0)["content"] if turns and turns[0]["role"] == "system" else None
    if turns and turns[-1]["role"] == "bot":
        turns.pop()
    if not turns or turns[-1]["role"] != "user":
        raise DataError(f"sample {item_id}: the conversation does not end with a question and its answer")
    history = [Message.from_markup(t["role"], t["content"]) for t in turns[:-1]]
    query = Query(turns[-1]["content"], images=sample.images, video=sample.video, audio=sample.audio,
                  history=history, system=system,
                  max_new_tokens=ASR_TOKENS if sample.kind == "asr" else ANSWER_TOKENS)
    info = {"kind": sample.kind, "reference_state": sample.state, "task": sample.meta.get("task", ""),
            "metric": metric_of(sample)}
    if info["metric"] == "nonquery_rejection":  # what was heard: the curriculum's chatter meta, when it has one
        info.update({k: sample.meta[k] for k in ("language", "voice", "text", "noise") if k in sample.meta})
    return Item(item_id, query, sample.answer, info, sample.origin or "")


def metric_of(sample: Sample) -> str:
    if sample.state == "<2>":
        return "nonquery_rejection"
    if sample.state == "<1>":
        return "spoken_qa"
    return {"image": "image_qa", "video": "video_qa", "text": "text_qa", "caption": "caption", "asr": "asr_wer",
            "duplex": "spoken_qa"}[sample.kind]


def score(items: Sequence[Item], answers: Sequence[Answer]) -> tuple[dict[str, Any], list[bool | None]]:
    correct: list[bool | None] = []
    groups: dict[str, list[int]] = {}
    for k, (item, answer) in enumerate(zip(items, answers, strict=True)):
        metric = item.info["metric"]
        groups.setdefault(metric, []).append(k)
        if metric == "nonquery_rejection":
            correct.append(answer.state == "<2>")
        elif metric == "asr_wer":
            correct.append(None)
        else:
            correct.append(exact_match(answer.text, item.reference))
    metrics: dict[str, Any] = {}
    for metric, members in groups.items():
        if metric == "asr_wer":
            wer = word_error_rate([items[k].reference for k in members], [answers[k].text for k in members])
            metrics["asr_wer"] = wer["wer"]
            metrics["asr_wer_detail"] = wer
            continue
        metrics[metric] = _share(correct[k] for k in members)
        metrics[f"{metric}_n"] = len(members)
        if metric == "spoken_qa":
            metrics["query_acceptance"] = _share(answers[k].state == "<1>" for k in members)
        if metric == "nonquery_rejection":
            metrics.update(_rejection_breakdown([items[k] for k in members], [correct[k] for k in members]))
        else:
            by_task: dict[str, list[int]] = {}
            for k in members:
                by_task.setdefault(items[k].info["task"] or "all", []).append(k)
            for task, ks in sorted(by_task.items()):
                metrics[f"{metric}/{task}"] = _share(correct[k] for k in ks)
            metrics[f"{metric}_majority_baseline"] = _majority(items, by_task)
    return metrics, correct


def _rejection_breakdown(items: Sequence[Item], rejected: Sequence[bool | None]) -> dict[str, Any]:
    """`nonquery_rejection/<language or task>` and `nonquery_accepted` ({"phrase (voice)": clips}) of `<2>` items."""
    by_source: dict[str, list[bool | None]] = {}
    accepted: Counter[str] = Counter()
    for item, ok in zip(items, rejected, strict=True):
        info = item.info
        by_source.setdefault(info.get("language") or info["task"] or "all", []).append(ok)
        if not ok:
            heard, how = info.get("text") or info["task"] or item.id, info.get("voice") or info.get("noise")
            accepted[f"{heard} ({how})" if how else heard] += 1
    out: dict[str, Any] = {f"nonquery_rejection/{source}": _share(v) for source, v in sorted(by_source.items())}
    out["nonquery_accepted"] = dict(accepted.most_common())
    return out


def _share(values) -> float:
    values = list(values)
    return sum(bool(v) for v in values) / len(values) if values else 0.0


def _majority(items: Sequence[Item], by_task: dict[str, list[int]]) -> float:
    hits = total = 0
    for ks in by_task.values():
        counts = Counter(normalize(items[k].reference) for k in ks)
        hits += counts.most_common(1)[0][1]
        total += len(ks)
    return hits / total if total else 0.0


BENCHMARK = Benchmark("curriculum", load, score,
                      "a curriculum directory (with curriculum.json) or a JSONL manifest")
