"""`vita eval` end to end through the real tiny model: the curriculum's held-out split (images, clips, speech, noise)
and a benchmark, answered by `VitaPipeline`; the harness's figures recomputed from the answers it records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vita.eval.answer import PipelineAnswerer, Query
from vita.eval.metrics import exact_match, word_error_rate
from vita.inference import GenerationRequest, VitaPipeline
from vita.model.generation import SamplingParams
from vita.processing.prompt import Message
from vita.training.curriculum import CurriculumSizes, build_curriculum

pytestmark = pytest.mark.slow


def vita(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vita.cli", *args], capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def curriculum_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("curriculum") / "c"
    build_curriculum(root, seed=3, sizes=CurriculumSizes.test())
    return root


def test_curriculum_eval_through_the_tiny_model(tiny_model_dir: Path, curriculum_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    r = vita("eval", "curriculum", "--model", str(tiny_model_dir), "--data", str(curriculum_dir), "--limit", "1",
             "--max-tokens", "4", "--threads", "2", "--output", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    items, metrics = result["items"], result["metrics"]
    assert len(items) == 7  # one of each held-out manifest
    assert {i["metric"] for i in items} == {"image_qa", "video_qa", "spoken_qa", "nonquery_rejection", "asr_wer",
                                            "text_qa", "caption"}
    for name in ("image_qa", "video_qa", "spoken_qa", "query_acceptance", "nonquery_rejection", "asr_wer"):
        assert name in metrics and f"  {name} " in r.stdout
    # The figures are what the recorded answers give.
    by_metric = {i["metric"]: i for i in items}
    for name in ("image_qa", "video_qa", "spoken_qa", "text_qa", "caption"):
        item = by_metric[name]
        assert item["correct"] == exact_match(item["prediction"], item["reference"])
        assert metrics[name] == float(item["correct"])
    assert metrics["nonquery_rejection"] == float(by_metric["nonquery_rejection"]["state"] == "<2>")
    assert metrics["query_acceptance"] == float(by_metric["spoken_qa"]["state"] == "<1>")
    asr = by_metric["asr_wer"]
    assert metrics["asr_wer"] == pytest.approx(word_error_rate([asr["reference"]], [asr["prediction"]])["wer"])


def test_pipeline_answerer_is_the_pipelines_greedy_answer(tiny_model_dir: Path, curriculum_dir: Path) -> None:
    pipeline = VitaPipeline.load(tiny_model_dir, threads=2)
    answerer = PipelineAnswerer(pipeline)
    image = next((curriculum_dir / "heldout" / "images").glob("*.png"))
    query = Query("<image>\nWhat colour is the shape?", images=[str(image)], max_new_tokens=6)
    answer = answerer(query)
    text = Message.from_markup("user", query.text).content  # the markup's <image> is the image sent
    assert text == "What colour is the shape?"
    ids = [t for e in pipeline.stream(GenerationRequest(text=text, images=[str(image)],
                                                        sampling=SamplingParams(max_new_tokens=6)))
           for t in e.token_ids]
    states = {i: piece for piece, i in pipeline.tokenizer.state_ids.items()}
    lead = states.get(ids[0]) if ids else None
    assert answer.state == lead
    assert answer.text == pipeline.tokenizer.decode(ids[1:] if lead else ids).strip()


def test_bad_benchmark_data_is_one_line_before_the_model_loads(tmp_path: Path) -> None:
    bad = tmp_path / "test" / "anatomy_test.csv"
    bad.parent.mkdir()
    bad.write_text("q,a,b,c,d,A\nq,a,b\n")
    r = vita("eval", "mmlu", "--model", str(tmp_path / "no-model-here"), "--data", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"vita eval mmlu: error: {bad}:2: 3 columns; MMLU rows have 6 (question, A, B, C, D, answer)"
