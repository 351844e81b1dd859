"""ASR benchmarks: LibriSpeech (WER) and WenetSpeech test_net / test_meeting (CER), read as published."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vita.eval.answer import Answer, Query
from vita.eval.core import Benchmark, Item, find_file, take
from vita.eval.metrics import char_error_rate, word_error_rate
from vita.training import data

ASR_TOKENS = 192  # LibriSpeech utterances run to ~35 s, ~90 words
LIBRISPEECH_EVAL_SPLITS = ("dev-clean", "dev-other", "test-clean", "test-other")  # read from a root; never train-*


def load_librispeech(path: Path, limit: int | None) -> list[Item]:
    """`LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` lines `ID TRANSCRIPT`, with
    `ID.flac` beside them. `path` is one split directory (read whatever its name), or the `LibriSpeech` root, of
    which only the dev and test splits are read (never the training ones)."""
    transcripts = sorted(path.rglob("*.trans.txt")) if path.is_dir() else [path]
    if not transcripts:
        raise data.DataError(f"{path}: no *.trans.txt files (expected a LibriSpeech split directory)")
    transcripts = [t for t in transcripts
                   if not _under_root(path, t) or _split_name(path, t) in LIBRISPEECH_EVAL_SPLITS]
    if not transcripts:
        raise data.DataError(f"{path}: no {', '.join(LIBRISPEECH_EVAL_SPLITS)} split here (a training split is "
                             "read only when its directory is given)")
    items: list[Item] = []
    for trans in transcripts:
        split = _split_name(path, trans)
        for number, line in enumerate(data.read_text(trans).splitlines(), 1):
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            if not text:
                raise data.DataError(f"{trans}:{number}: expected 'UTTERANCE-ID TRANSCRIPT'")
            audio = trans.parent / f"{utterance}.flac"
            if not audio.is_file():
                raise data.DataError(f"{trans}:{number}: audio file not found: {audio}")
            query = Query(data.AUDIO + data.ASR_INSTRUCTION["en"], audio=[str(audio)], max_new_tokens=ASR_TOKENS)
            items.append(Item(utterance, query, text, {"split": split}, f"{trans}:{number}"))
            if limit is not None and len(items) >= limit:
                return items
    return items


def _under_root(path: Path, trans: Path) -> bool:
    """Whether `path` lies above the transcript's split directory (a root holding several splits)."""
    return path in trans.parents[3:]


def _split_name(root: Path, trans: Path) -> str:
    """`test-clean` for `.../test-clean/1089/134686/1089-134686.trans.txt` (three levels up)."""
    parents = trans.parents
    return parents[2].name if len(parents) > 2 else root.name


def score_wer(items: Sequence[Item], answers: Sequence[Answer]) -> tuple[dict[str, Any], list[bool | None]]:
    return _score(items, answers, "split", word_error_rate, "wer")


def load_wenetspeech(path: Path, limit: int | None) -> list[Item]:
    """The TEST_NET and TEST_MEETING segments of `WenetSpeech.json` (`path` is the file or its directory)."""
    json_path = find_file(path, ["WenetSpeech.json"], "WenetSpeech.json")
    samples = data.load_wenetspeech(json_path, ("TEST_NET", "TEST_MEETING"))
    if not samples:
        raise data.DataError(f"{json_path}: no segment is in the TEST_NET or TEST_MEETING subset")
    items = []
    for sample in samples:
        subset = next(s for s in sample.meta["subsets"].split() if s in ("TEST_NET", "TEST_MEETING")).lower()
        query = Query(sample.conversation[0]["content"], audio=sample.audio, max_new_tokens=ASR_TOKENS)
        items.append(Item(sample.meta["id"], query, sample.answer, {"subset": subset},
                          sample.origin or f"{json_path}: segment {sample.meta['id']}"))
    return take(items, limit)


def score_cer(items: Sequence[Item], answers: Sequence[Answer]) -> tuple[dict[str, Any], list[bool | None]]:
    return _score(items, answers, "subset", char_error_rate, "cer")


def _score(items, answers, key, rate, name) -> tuple[dict[str, Any], list[bool | None]]:
    refs = [item.reference for item in items]
    hyps = [answer.text for answer in answers]
    metrics: dict[str, Any] = {name: rate(refs, hyps)[name]}
    groups: dict[str, list[int]] = {}
    for k, item in enumerate(items):
        groups.setdefault(item.info[key], []).append(k)
    for group, ks in groups.items():
        detail = rate([refs[k] for k in ks], [hyps[k] for k in ks])
        metrics[f"{group}/{name}"] = detail[name]
        metrics[f"{group}/detail"] = detail
    return metrics, [None] * len(items)


LIBRISPEECH = Benchmark("librispeech", load_librispeech, score_wer,
                        "a LibriSpeech split directory (e.g. LibriSpeech/test-clean) or the LibriSpeech root "
                        "(its dev and test splits)")
WENETSPEECH = Benchmark("wenetspeech", load_wenetspeech, score_cer,
                        "WenetSpeech.json (with its audio/ tree) or the directory holding it")
