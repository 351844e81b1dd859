"""Language benchmarks: C-Eval, MMLU (CSV per subject), AGIEval (JSONL per task), GSM8K (JSONL), as published."""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vita.eval.answer import Answer, Query
from vita.eval.core import Benchmark, Item, find_file, grouped_accuracy
from vita.eval.metrics import CHOICE_LETTERS, accuracy, extract_choice, last_number, math_match
from vita.training.data import DataError, load_json, read_text

CHOICE_TOKENS = 8


def _csv_files(path: Path, split: str) -> list[Path]:
    """`path` itself (a CSV), else the `split/` directory's CSVs, else the CSVs directly in `path`."""
    if path.is_file():
        return [path]
    for folder in (path / split, path / "data" / split, path):
        files = sorted(folder.glob("*.csv"))
        if files:
            return files
    raise DataError(f"{path}: no CSV files (looked in {split}/, data/{split}/ and the directory itself)")


def _subject(file: Path) -> str:
    """`abstract_algebra` for `abstract_algebra_test.csv`, `_dev.csv` or `_val.csv`, whatever split was asked."""
    return re.sub(r"_(?:dev|val|test)$", "", file.stem)


def _choices_prompt(question: str, options: Sequence[str]) -> str:
    return question.strip() + "\n" + "\n".join(f"{CHOICE_LETTERS[k]}. {o}" for k, o in enumerate(options))


def _open_csv(file: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) pairs; the line is where the row starts (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(read_text(file), newline=""))
    start = 1
    try:
        for row in reader:
            yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{file}:{reader.line_num}: bad CSV: {e}") from None


def _jsonl(file: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line; bad JSON names the line."""
    for number, line in enumerate(read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{number}: bad JSON: {e.msg} (column {e.colno})") from None


# ----------------------------------------------------------------------------------------------------------------
# C-Eval


CEVAL_COLUMNS = ("id", "question", "A", "B", "C", "D", "answer")


def load_ceval(path: Path, limit: int | None) -> list[Item]:
    """`ceval-exam/val/<subject>_val.csv` with the header `id,question,A,B,C,D,answer[,explanation]` (the test
    split has no `answer` column: it cannot be scored locally)."""
    items: list[Item] = []
    files = _csv_files(path, "val")
    names = _ceval_names(path, files[0])
    for file in files:
        subject = _subject(file)
        rows = _open_csv(file)
        header = next(rows, (1, []))[1]
        missing = [c for c in CEVAL_COLUMNS if c not in header]
        if missing:
            test = missing == ["answer"] and (file.stem.endswith("_test") or file.parent.name == "test")
            hint = " (the test split has no answers: use val/)" if test else ""
            raise DataError(f"{file}:1: missing column(s) {', '.join(missing)}{hint}")
        at = {name: header.index(name) for name in CEVAL_COLUMNS}
        for number, row in rows:
            if not any(row):
                continue
            if len(row) != len(header):
                raise DataError(f"{file}:{number}: {len(row)} columns where the header has {len(header)}")
            answer = row[at["answer"]].strip().upper()
            if answer not in ("A", "B", "C", "D"):
                raise DataError(f"{file}:{number}: answer must be A, B, C or D, not {row[at['answer']]!r}")
            text = (f"以下是中国关于{names.get(subject, subject)}考试的单项选择题，请选出其中的正确答案。\n\n"
                    + _choices_prompt(row[at["question"]], [row[at[c]] for c in "ABCD"]) + "\n答案：")
            items.append(Item(f"{subject}/{row[at['id']]}", Query(text, max_new_tokens=CHOICE_TOKENS), answer,
                              {"subject": subject}))
            if limit is not None and len(items) >= limit:
                return items
    return items


def _ceval_names(path: Path, csv_file: Path) -> dict[str, str]:
    """Subject -> its Chinese name, from the release's `subject_mapping.json` (`{"computer_network": ["Computer
    Network", "计算机网络", "STEM"], ...}`) in `path` or above the CSVs, which the official prompt names the
    subject by; {} without one."""
    folders = [*([path] if path.is_dir() else []), csv_file.parent, csv_file.parent.parent]
    mapping = next((f / "subject_mapping.json" for f in folders if (f / "subject_mapping.json").is_file()), None)
    if mapping is None:
        return {}
    doc = load_json(mapping)
    if not isinstance(doc, dict):
        raise DataError(f"{mapping}:1: expected an object: subject -> [English name, Chinese name, category]")
    names = {}
    for subject, entry in doc.items():
        if not (isinstance(entry, list) and len(entry) >= 2 and isinstance(entry[1], str)):
            raise DataError(f"{mapping}: {subject}: expected [English name, Chinese name, category], "
                            f"not {json.dumps(entry, ensure_ascii=False)}")
        names[subject] = entry[1]
    return names


# ----------------------------------------------------------------------------------------------------------------
# MMLU


def load_mmlu(path: Path, limit: int | None) -> list[Item]:
    """`data/test/<subject>_test.csv`, no header, six columns: question, A, B, C, D, answer."""
    items: list[Item] = []
    for file in _csv_files(path, "test"):
        subject = _subject(file)
        for number, row in _open_csv(file):
            if not any(row):
                continue
            if len(row) != 6:
                raise DataError(f"{file}:{number}: {len(row)} columns; MMLU rows have 6 "
                                "(question, A, B, C, D, answer)")
            answer = row[5].strip().upper()
            if answer not in ("A", "B", "C", "D"):
                raise DataError(f"{file}:{number}: answer must be A, B, C or D, not {row[5]!r}")
            text = (f"The following is a multiple choice question about {subject.replace('_', ' ')}.\n\n"
                    + _choices_prompt(row[0], row[1:5]) + "\nAnswer:")
            items.append(Item(f"{subject}/{number}", Query(text, max_new_tokens=CHOICE_TOKENS), answer,
                              {"subject": subject}))
            if limit is not None and len(items) >= limit:
                return items
    return items


def score_choice(items: Sequence[Item], answers: Sequence[Answer]) -> tuple[dict[str, Any], list[bool | None]]:
    """Accuracy over questions, and the mean of the per-subject accuracies (how C-Eval and MMLU average)."""
    correct = [extract_choice(a.text) == item.reference for item, a in zip(items, answers, strict=True)]
    subjects = grouped_accuracy(items, correct, "subject")
    metrics: dict[str, Any] = {"accuracy": accuracy(correct),
                               "subject_average": sum(subjects.values()) / len(subjects)}
    metrics.update({f"subject/{k}": v for k, v in subjects.items()})
    return metrics, correct


# ----------------------------------------------------------------------------------------------------------------
# AGIEval


def load_agieval(path: Path, limit: int | None) -> list[Item]:
    """`data/v1_1/<task>.jsonl` (or `data/v1/`), one object a line: `passage` (or null), `question`, `options`
    (["(A)...", ...], null for the cloze tasks), `label` (a letter, or a list of them) and `answer` (the cloze
    answer). The repository's `data/` holds both versions of the same questions: one must be chosen."""
    files = [path] if path.is_file() else sorted(path.glob("*.jsonl")) or sorted(path.rglob("*.jsonl"))
    if not files:
        raise DataError(f"{path}: no .jsonl files (expected AGIEval's data/v1_1 directory)")
    folders = sorted({file.parent for file in files})
    if len(folders) > 1:
        pick = next((f for f in folders if f.name == "v1_1"), folders[0])
        raise DataError(f"{path}: .jsonl files in {len(folders)} folders "
                        f"({', '.join(str(f.relative_to(path)) for f in folders)}), each a version of the "
                        f"questions: pass one, e.g. --data {pick}")
    items: list[Item] = []
    for file in files:
        task = file.stem
        for number, entry in _jsonl(file):
            items.append(_agieval_item(entry, f"{file}:{number}", task, number))
            if limit is not None and len(items) >= limit:
                return items
    return items


def _agieval_item(entry: Any, where: str, task: str, number: int) -> Item:
    if not isinstance(entry, dict) or not isinstance(entry.get("question"), str):
        raise DataError(f"{where}: expected an object with a 'question' string")
    passage = entry.get("passage") or ""
    options = entry.get("options")
    label = entry.get("label")
    head = (passage.strip() + "\n" if passage else "") + entry["question"].strip()
    if options:
        if not isinstance(options, list) or label in (None, "", []):
            raise DataError(f"{where}: a multiple-choice question needs an 'options' list and a 'label'")
        letters = sorted({str(x).strip().upper() for x in (label if isinstance(label, list) else list(label))})
        if not letters or any(x not in CHOICE_LETTERS[: len(options)] for x in letters):
            raise DataError(f"{where}: label {label!r} is not among the {len(options)} options")
        text = head + "\n" + "\n".join(str(o) for o in options) + "\nAnswer with the option's letter."
        return Item(f"{task}/{number}", Query(text, max_new_tokens=CHOICE_TOKENS), "".join(letters),
                    {"task": task, "type": "choice", "options": len(options)})
    answer = entry.get("answer")
    if answer in (None, ""):
        raise DataError(f"{where}: a cloze question needs an 'answer'")
    return Item(f"{task}/{number}", Query(head + "\nAnswer:", max_new_tokens=32), str(answer),
                {"task": task, "type": "cloze"})


def _letters(prediction: str, n_options: int) -> str:
    """Every option letter a multi-answer prediction's first line names, after an optional `Answer:`/`答案是`
    (`AC`, `A, C`, `(A)(C)`, `答案是AC`), else the single choice `extract_choice` reads (`b` and `(b)` too)."""
    allowed = CHOICE_LETTERS[:n_options]
    head = unicodedata.normalize("NFKC", prediction).strip().split("\n")[0]
    head = re.sub(r"^(?:the\s+)?(?:answers?|答案)\s*(?:is|are|是|为|:|：)?\s*", "", head, flags=re.IGNORECASE)
    if re.fullmatch(rf"[\s(]*[{allowed}](?:(?:[\s,、)(]|和|and)*[{allowed}])*[\s).。]*", head):
        return "".join(sorted(set(re.findall(rf"[{allowed}]", head))))
    return extract_choice(prediction, allowed) or ""


def score_agieval(items: Sequence[Item], answers: Sequence[Answer]) -> tuple[dict[str, Any], list[bool | None]]:
    correct = []
    for item, answer in zip(items, answers, strict=True):
        if item.info["type"] == "choice":
            correct.append(_letters(answer.text, item.info["options"]) == item.reference)
        else:
            correct.append(math_match(answer.text, item.reference))
    metrics: dict[str, Any] = {"accuracy": accuracy(correct)}
    metrics.update({f"task/{k}": v for k, v in grouped_accuracy(items, correct, "task").items()})
    return metrics, correct


# ----------------------------------------------------------------------------------------------------------------
# GSM8K

GSM8K_PROMPT = "\nSolve it step by step, then give the final answer on its own line as '#### <number>'."


def load_gsm8k(path: Path, limit: int | None) -> list[Item]:
    """`grade_school_math/data/test.jsonl`: `{"question", "answer"}`, the answer's worked solution ending
    `#### <number>`."""
    file = find_file(path, ["test.jsonl"], "GSM8K's test.jsonl")
    items: list[Item] = []
    for number, entry in _jsonl(file):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("question", "answer")):
            raise DataError(f"{file}:{number}: expected an object with 'question' and 'answer' strings")
        final = entry["answer"].rpartition("####")
        reference = last_number(final[2]) if final[1] else None
        if reference is None:
            raise DataError(f"{file}:{number}: the answer does not end with '#### <number>'")
        items.append(Item(str(number), Query(entry["question"].strip() + GSM8K_PROMPT, max_new_tokens=256),
                          reference))
        if limit is not None and len(items) >= limit:
            break
    return items


def gsm8k_prediction(text: str) -> str | None:
    """The first number after the last `####` (the strict format), else the last number in the text."""
    _, sep, tail = text.rpartition("####")
    found = re.match(r"\s*(-?\d[\d,]*(?:\.\d+)?)", tail) if sep else None
    return last_number(found.group(1)) if found else last_number(text)


def score_gsm8k(items: Sequence[Item], answers: Sequence[Answer]) -> tuple[dict[str, Any], list[bool | None]]:
    correct = [gsm8k_prediction(a.text) == item.reference for item, a in zip(items, answers, strict=True)]
    return {"accuracy": accuracy(correct)}, correct


CEVAL = Benchmark("ceval", load_ceval, score_choice, "ceval-exam/ (val/<subject>_val.csv) or one such CSV")
MMLU = Benchmark("mmlu", load_mmlu, score_choice, "MMLU data/ (test/<subject>_test.csv) or one such CSV")
AGIEVAL = Benchmark("agieval", load_agieval, score_agieval,
                    "AGIEval data/v1_1/ or data/v1/ (<task>.jsonl), or one such file")
GSM8K = Benchmark("gsm8k", load_gsm8k, score_gsm8k, "GSM8K test.jsonl or the directory holding it")
