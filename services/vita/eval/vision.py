"""Multimodal benchmarks: MME, OCRBench, HallusionBench (images) and Video-MME (video), read as published."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vita.eval.answer import Answer, Query
from vita.eval.core import Benchmark, Item, find_file, grouped_accuracy, json_origin, take
from vita.eval.metrics import accuracy, extract_choice, extract_yes_no
from vita.training.data import DataError, JsonItems, read_text

IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")

# ----------------------------------------------------------------------------------------------------------------
# MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_QA_DIR = "questions_answers_YN"  # the question files of artwork, celebrity, landmark, posters and scene


def load_mme(path: Path, limit: int | None) -> list[Item]:
    """`MME_Benchmark_release_version/<category>/` (or one category directory): either `images/` +
    `questions_answers_YN/` (artwork, celebrity, landmark, posters, scene) or images and `.txt` files side by side;
    each `.txt` holds lines `QUESTION<TAB>Yes|No` about the image with the same stem. A category without
    questions is an error, not skipped."""
    items: list[Item] = []
    for category in _mme_categories(path):
        found = len(items)
        qa_dir = category / MME_QA_DIR
        image_dir = category / "images" if qa_dir.is_dir() else category
        text_dir = qa_dir if qa_dir.is_dir() else category
        for txt in sorted(text_dir.glob("*.txt")):
            image = _first_file([image_dir / f"{txt.stem}{ext}" for ext in IMAGE_EXTENSIONS])
            for number, line in enumerate(read_text(txt).splitlines(), 1):
                if not line.strip():
                    continue
                question, sep, answer = line.rpartition("\t")
                answer = answer.strip()
                if not sep or answer.lower() not in ("yes", "no"):
                    raise DataError(f"{txt}:{number}: expected 'QUESTION<TAB>Yes' or 'QUESTION<TAB>No'")
                if image is None:
                    raise DataError(f"{txt}:{number}: no image {txt.stem}.jpg/.png in {image_dir}")
                items.append(Item(f"{category.name}/{txt.stem}/{number}",
                                  Query(question.strip(), images=[str(image)], max_new_tokens=8),
                                  answer.lower(), {"category": category.name, "image": txt.stem},
                                  f"{txt}:{number}"))
        if len(items) == found:
            raise DataError(f"{category}: no MME questions (expected {MME_QA_DIR}/*.txt beside images/, or .txt "
                            "files beside the images, with lines QUESTION<TAB>Yes|No)")
    return take(items, limit)


def _mme_categories(path: Path) -> list[Path]:
    """`path` itself when it is one category (it holds `questions_answers_YN/` or no subdirectory), else every
    subdirectory but `eval_tool/`, hidden ones and `__MACOSX/` (left by macOS archives)."""
    if path.is_file() or path.name in (MME_QA_DIR, "images"):
        raise DataError(f"{path}: expected {MME.layout} or one category directory")
    subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))
    if (path / MME_QA_DIR).is_dir() or not subdirs:
        return [path]
    return [d for d in subdirs if d.name != "eval_tool"]


def score_mme(items: Sequence[Item], answers: Sequence[Answer]) -> tuple[dict[str, Any], list[bool | None]]:
    """Per category: acc (questions) and acc+ (images with both questions right), score = 100 (acc + acc+);
    perception and cognition totals sum their categories' scores (MME's calculation.py)."""
    correct = [extract_yes_no(a.text) == item.reference for item, a in zip(items, answers, strict=True)]
    by_category: dict[str, dict[str, list[bool]]] = {}
    for item, ok in zip(items, correct, strict=True):
        by_category.setdefault(item.info["category"], {}).setdefault(item.info["image"], []).append(ok)
    metrics: dict[str, Any] = {"accuracy": accuracy(correct)}
    totals = {"perception": 0.0, "cognition": 0.0, "other": 0.0}
    for category, images in by_category.items():
        flat = [ok for oks in images.values() for ok in oks]
        acc = accuracy(flat)
        acc_plus = accuracy([all(oks) for oks in images.values()])
        metrics[f"{category}/acc"] = acc
        metrics[f"{category}/acc_plus"] = acc_plus
        metrics[f"{category}/score"] = 100 * (acc + acc_plus)
        group = ("perception" if category in MME_PERCEPTION else
                 "cognition" if category in MME_COGNITION else "other")
        totals[group] += 100 * (acc + acc_plus)
    metrics.update({f"{group}_score": total for group, total in totals.items()
                    if total or group != "other"})
    return metrics, correct


# ----------------------------------------------------------------------------------------------------------------
# OCRBench

OCRBENCH_GROUPS = {
    "Text Recognition": ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                         "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition"),
    "Scene Text-centric VQA": ("Scene Text-centric VQA",),
    "Doc-oriented VQA": ("Doc-oriented VQA",),
    "Key Information Extraction": ("Key Information Extraction",),
    "Handwritten Mathematical Expression Recognition": ("Handwritten Mathematical Expression Recognition",),
}


def load_ocrbench(path: Path, limit: int | None) -> list[Item]:
    """`OCRBench.json`: `[{"dataset_name", "id", "image_path", "question", "answers", "type"}]`, images under
    `OCRBench_Images/` (or directly) beside the JSON or in the `--data` folder (the repository's layout:
    `OCRBench/OCRBench.json` and `OCRBench_Images/` side by side)."""
    json_path = find_file(path, ["OCRBench.json"], "OCRBench.json and OCRBench_Images/")
    bases = list(dict.fromkeys([json_path.parent, *([path] if path.is_dir() else [])]))
    doc = JsonItems(json_path)
    items = []
    for keys, entry in doc.items():
        image_path = doc.field(entry, keys, "image_path")
        question = doc.field(entry, keys, "question")
        answers = doc.field(entry, keys, "answers", (str, list))
        kind = doc.field(entry, keys, "type")
        dataset = doc.field(entry, keys, "dataset_name")
        image = _first_file([p for base in bases for p in (base / "OCRBench_Images" / image_path, base / image_path)])
        if image is None:
            raise doc.error(keys, f"image not found: {image_path} (looked in OCRBench_Images/ and directly in "
                            f"{' and '.join(str(b) for b in bases)})")
        references = [answers] if isinstance(answers, str) else [str(a) for a in answers]
        items.append(Item(str(entry.get("id", keys[-1])), Query(question, images=[str(image)], max_new_tokens=64),
                          references, {"type": kind, "dataset": dataset}, json_origin(doc, keys)))
        if limit is not None and len(items) >= limit:
            break
    return items


def ocrbench_correct(prediction: str, references: Sequence[str], dataset: str) -> bool:
    """OCRBench's rule: a reference contained in the prediction; HME100k compares without any spaces,
    everything else lower-cased with newlines as spaces."""
    for reference in references:
        if dataset == "HME100k":
            if reference.strip().replace("\n", " ").replace(" ", "") in prediction.strip().replace("\n", " ") \
                    .replace(" ", ""):
                return True
        elif reference.lower().strip().replace("\n", " ") in prediction.lower().strip().replace("\n", " "):
            return True
    return False


def score_ocrbench(items: Sequence[Item], answers: Sequence[Answer]) -> tuple[dict[str, Any], list[bool | None]]:
    correct = [ocrbench_correct(a.text, item.reference, item.info["dataset"])
               for item, a in zip(items, answers, strict=True)]
    metrics: dict[str, Any] = {"score": sum(correct), "total": len(items), "accuracy": accuracy(correct)}
    for group, kinds in OCRBENCH_GROUPS.items():
        hits = [ok for item, ok in zip(items, correct, strict=True) if item.info["type"] in kinds]
        if hits:
            metrics[f"{group}/score"] = sum(hits)
            metrics[f"{group}/total"] = len(hits)
    return metrics, correct


# ----------------------------------------------------------------------------------------------------------------
# HallusionBench

HALLUSION_SUFFIX = " Please answer yes or no."


def load_hallusionbench(path: Path, limit: int | None) -> list[Item]:
    """`HallusionBench.json`: `[{"category", "subcategory", "visual_input", "set_id", "figure_id", "question_id",
    "question", "gt_answer" ("1" yes / "0" no), "filename"}]`, `filename` (`./hallusion_bench/VD/...png`, null
    for questions without a figure) relative to the JSON file."""
    json_path = find_file(path, ["HallusionBench.json"], "HallusionBench.json and the hallusion_bench/ images")
    doc = JsonItems(json_path)
    items = []
    for keys, entry in doc.items():
        fields = {name: str(doc.field(entry, keys, name, (str, int)))
                  for name in ("category", "subcategory", "visual_input", "set_id", "figure_id", "question_id")}
        question = doc.field(entry, keys, "question")
        truth = str(doc.field(entry, keys, "gt_answer", (str, int)))
        if truth not in ("0", "1"):
            raise doc.error(keys, f"gt_answer must be '0' or '1', not {truth!r}")
        filename = entry.get("filename")
        images: list[str] = []
        if fields["visual_input"] != "0":
            if not isinstance(filename, str):
                raise doc.error(keys, "a question with visual input needs a 'filename'")
            image = json_path.parent / filename
            if not image.is_file():
                raise doc.error(keys, f"image not found: {image}")
            images = [str(image)]
        item_id = "_".join(fields[k] for k in ("category", "subcategory", "set_id", "figure_id", "question_id"))
        items.append(Item(item_id, Query(question + HALLUSION_SUFFIX, images=images, max_new_tokens=8),
                          "yes" if truth == "1" else "no", fields, json_origin(doc, keys)))
        if limit is not None and len(items) >= limit:
            break
    return items


def score_hallusionbench(items: Sequence[Item], answers: Sequence[Answer]
                         ) -> tuple[dict[str, Any], list[bool | None]]:
    """aAcc per question; fAcc per figure (all its questions right; VS questions without a figure excluded);
    qAcc per question across its figures (all right), grouped as HallusionBench's utils.py does."""
    correct = [extract_yes_no(a.text) == item.reference for item, a in zip(items, answers, strict=True)]
    figures: dict[str, list[bool]] = {}
    questions: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct, strict=True):
        f = item.info
        if not (f["category"] == "VS" and f["figure_id"] == "0"):
            figures.setdefault("_".join((f["category"], f["subcategory"], f["set_id"], f["figure_id"])),
                               []).append(ok)
        questions.setdefault("_".join((f["category"], f["subcategory"], f["set_id"], f["question_id"])),
                             []).append(ok)
    return {"aAcc": accuracy(correct), "fAcc": accuracy([all(v) for v in figures.values()]),
            "qAcc": accuracy([all(v) for v in questions.values()]), "figures": len(figures),
            "question_pairs": len(questions)}, correct


# ----------------------------------------------------------------------------------------------------------------
# Video-MME

VIDEOMME_PROMPT = "Answer with the option's letter from the given choices directly."
VIDEO_DIRS = ("data", "video", "videos")


def load_videomme(path: Path, limit: int | None) -> list[Item]:
    """`videomme/test-00000-of-00001.parquet` (or a JSON list with the same fields: `videoID`, `question_id`,
    `duration`, `domain`, `task_type`, `question`, `options` ["A. ...", ...], `answer`), videos as
    `data/<videoID>.mp4` (or `video/`, `videos/`) under the dataset root."""
    table = find_file(path, ["test-00000-of-00001.parquet", "*.parquet", "videomme.json", "*.json"],
                      "the Video-MME parquet (videomme/test-00000-of-00001.parquet) and its videos")
    root = path if path.is_dir() else table.parent
    if root.name == "videomme" and not any((root / d).is_dir() for d in VIDEO_DIRS):
        root = root.parent
    rows = _videomme_rows(table)
    items = []
    for locate, row in rows:
        missing = [c for c in ("videoID", "question", "options", "answer") if c not in row or row[c] is None]
        if missing:
            raise DataError(f"{locate()}: missing field(s) {', '.join(missing)}")
        options = [str(o) for o in row["options"]]
        answer = str(row["answer"]).strip().upper()
        if answer not in "ABCD" or len(answer) != 1:
            raise DataError(f"{locate()}: answer must be one of A, B, C, D, not {row['answer']!r}")
        video = _first_file([root / d / f"{row['videoID']}{ext}" for d in VIDEO_DIRS for ext in (".mp4", ".mkv")])
        if video is None:
            raise DataError(f"{locate()}: video {row['videoID']}.mp4 not found under {root}/(data|video|videos)")
        text = f"<video>\n{row['question']}\n" + "\n".join(options) + "\n" + VIDEOMME_PROMPT
        info = {"duration": str(row.get("duration", "")), "task_type": str(row.get("task_type", ""))}
        items.append(Item(str(row.get("question_id", row["videoID"])),
                          Query(text, video=str(video), max_new_tokens=8), answer, info, locate))
        if limit is not None and len(items) >= limit:
            break
    return items


def _videomme_rows(table: Path) -> list[tuple[Callable[[], str], dict]]:
    """(where, row) pairs; `where()` names the row for an error (computed only then: it may re-read the file)."""
    if table.suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(table)
        except Exception as e:  # pyarrow raises several types for a broken file
            raise DataError(f"{table}: cannot read the parquet file: {e}") from None
        # Parquet has rows, not lines: name the row (0-based, as pandas shows it).
        return [(lambda k=k: f"{table}: row {k}",
                 {key: (v.tolist() if hasattr(v, "tolist") else v) for key, v in row.items()})
                for k, row in enumerate(frame.to_dict("records"))]
    doc = JsonItems(table)
    out: list[tuple[Callable[[], str], dict]] = []
    for keys, row in doc.items():
        if not isinstance(row, dict):
            raise doc.error(keys, "must be an object")
        out.append((json_origin(doc, keys), row))
    return out


def score_videomme(items: Sequence[Item], answers: Sequence[Answer]) -> tuple[dict[str, Any], list[bool | None]]:
    correct = [extract_choice(a.text) == item.reference for item, a in zip(items, answers, strict=True)]
    metrics: dict[str, Any] = {"accuracy": accuracy(correct)}
    metrics.update({f"duration/{k}": v for k, v in grouped_accuracy(items, correct, "duration").items() if k})
    metrics.update({f"task_type/{k}": v for k, v in grouped_accuracy(items, correct, "task_type").items() if k})
    return metrics, correct


def _first_file(candidates: Sequence[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


MME = Benchmark("mme", load_mme, score_mme, "MME_Benchmark_release_version/ (one directory per category)")
OCRBENCH = Benchmark("ocrbench", load_ocrbench, score_ocrbench, "OCRBench.json with OCRBench_Images/")
HALLUSIONBENCH = Benchmark("hallusionbench", load_hallusionbench, score_hallusionbench,
                           "HallusionBench.json with the hallusion_bench/ image tree")
VIDEOMME = Benchmark("videomme", load_videomme, score_videomme,
                     "the Video-MME root: videomme/test-00000-of-00001.parquet and data/<videoID>.mp4")
