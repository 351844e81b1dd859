"""The shape every benchmark shares: load `Item`s from the published layout, ask, score, write the results."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vita.eval.answer import Answer, Answerer, Query, as_answer
from vita.training.data import DataError, JsonItems
from vita.training.data import check_media as check_media_refs


@dataclass
class Item:
    """One question of a benchmark: the query, its reference (a string, a letter, a list of accepted strings),
    and what the breakdowns group by (`info`: category, subject, split, ...)."""

    id: str
    query: Query
    reference: Any
    info: dict[str, Any] = field(default_factory=dict)
    # Where it was read ("file:line", "file: row 3"), or a function that says so (computed on error only).
    origin: str | Callable[[], str] = ""

    def where(self) -> str:
        origin = self.origin() if callable(self.origin) else self.origin
        return origin or f"question {self.id}"


def json_origin(doc: JsonItems, keys: Sequence[str | int]) -> Callable[[], str]:
    """The origin of an item of a JSON file: `file:line: [3]`, the line found only when asked."""
    return lambda: str(doc.error(keys, "")).removesuffix(": ")


# load(path, limit) -> items; score(items, answers) -> (metrics, per-item correctness or None)
Loader = Callable[[Path, int | None], list[Item]]
Scorer = Callable[[Sequence[Item], Sequence[Answer]], tuple[dict[str, Any], list[bool | None]]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    load: Loader
    score: Scorer
    layout: str  # the published layout `--data` points at, for `--help` and errors


@dataclass
class EvalResult:
    benchmark: str
    data: str
    metrics: dict[str, Any]
    items: list[dict[str, Any]]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "data": self.data, "n": len(self.items), "seconds": self.seconds,
                "metrics": self.metrics, "items": self.items}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path


def run(benchmark: Benchmark, data: str | Path, answerer: Answerer, *, limit: int | None = None,
        progress: bool = False) -> EvalResult:
    """Loads the benchmark from `data`, asks `answerer` every question in order, and scores the answers."""
    items = load_items(benchmark, data, limit, progress=progress)
    return ask(benchmark, items, str(data), answerer, progress=progress)


def load_items(benchmark: Benchmark, data: str | Path, limit: int | None = None, *,
               progress: bool = False) -> list[Item]:
    """The benchmark's questions (the first `limit`), their media decoded once to check them; `DataError` for a
    missing path, a bad file or undecodable media."""
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (expected {benchmark.layout})")
    items = benchmark.load(path, limit)
    if not items:
        raise DataError(f"{path}: no {benchmark.name} questions found (expected {benchmark.layout})")
    check_media(items, benchmark.name, progress=progress)
    return items


def check_media(items: Sequence[Item], name: str = "", *, progress: bool = False) -> None:
    """Checks every medium the items refer to, each once (`vita.training.data.check_media`): an image or audio file
    (or `#t=` range of one) is decoded as the model reads it, a video opened and its first frame decoded. A bad one
    is a `DataError` naming the item's origin and the file. A progress bar shows when `progress` and the check
    takes more than a second."""
    media = ((kind, str(ref), item.where) for item in items
             for kind, ref in [*(("image", p) for p in item.query.images),
                               *([("video", item.query.video)] if item.query.video else []),
                               *(("audio", a) for a in item.query.audio if isinstance(a, str))])
    check_media_refs(media, progress=f"{name} media".strip() if progress else "")


def ask(benchmark: Benchmark, items: list[Item], data: str, answerer: Answerer, *,
        progress: bool = False) -> EvalResult:
    start = time.perf_counter()
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc=benchmark.name, unit="q", leave=False)
    answers = [as_answer(answerer(item.query)) for item in iterator]
    metrics, correct = benchmark.score(items, answers)
    records = [{"id": item.id, **item.info, "prediction": answer.text, "state": answer.state,
                "reference": item.reference, "correct": ok}
               for item, answer, ok in zip(items, answers, correct, strict=True)]
    return EvalResult(benchmark.name, data, metrics, records, time.perf_counter() - start)


def take(items: list[Item], limit: int | None) -> list[Item]:
    return items if limit is None else items[:limit]


def grouped_accuracy(items: Sequence[Item], correct: Sequence[bool], key: str) -> dict[str, float]:
    """Accuracy per value of `item.info[key]`, in first-seen order."""
    groups: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct, strict=True):
        groups.setdefault(str(item.info.get(key, "")), []).append(bool(ok))
    return {name: sum(v) / len(v) for name, v in groups.items()}


def find_file(path: Path, names: Sequence[str], what: str) -> Path:
    """`path` itself if it is a file, else the first of `names` under it (searched recursively)."""
    if path.is_file():
        return path
    for name in names:
        direct = path / name
        if direct.is_file():
            return direct
    for name in names:
        found = sorted(path.rglob(name))
        if found:
            return found[0]
    raise DataError(f"{path}: no {' or '.join(names)} found (expected {what})")
