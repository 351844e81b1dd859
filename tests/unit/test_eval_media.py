"""`vita eval` checks every image, audio file (or range of one) and video while loading, before the model: a bad
one is one line naming the benchmark's file and line (or row, JSON item, segment) and the medium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from media_files import ramp_tone, write_audio, write_image, write_video
from test_eval_benchmarks import (
    VIDEOMME_ROWS,
    _librispeech,
    _mme,
    _ocrbench,
    _videomme,
    answer_by,
    one_line_error,
)

from vita import cli
from vita.eval.core import run
from vita.eval.registry import get
from vita.training import data as training_data


def _bad_position_image(release: Path) -> tuple[Path, Path]:
    """MME's `position` category with one question about an image that is not one."""
    txt = release / "position" / "bad.txt"
    txt.parent.mkdir(parents=True)
    txt.write_text("Is the cat on the left? Please answer yes or no.\tYes\n")
    jpg = release / "position" / "bad.jpg"
    jpg.write_bytes(b"<html>this is an error page, not a JPEG</html>")
    return txt, jpg


def test_a_bad_image_names_the_question_file_and_line(tmp_path: Path) -> None:
    release = _mme(tmp_path)
    txt, jpg = _bad_position_image(release)
    assert one_line_error("mme", release) == f"{txt}:1: {jpg}: image data is not in a supported image format"
    # --limit keeps the first questions only, and only their media are checked
    assert len(run(get("mme"), release, answer_by({}), limit=2).items) == 2
    png = release / "code_reasoning" / "0001.png"
    png.write_bytes(png.read_bytes()[:60])  # truncated
    shutil.rmtree(txt.parent)
    assert one_line_error("mme", release) == f"{release / 'code_reasoning' / '0001.txt'}:1: {png}: image data is " \
                                             "corrupt: image file is truncated"


def test_the_cli_fails_before_loading_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    release = _mme(tmp_path)
    txt, jpg = _bad_position_image(release)
    output = tmp_path / "results.json"
    status = cli.main(["eval", "mme", "--model", str(tmp_path / "no-model-here"), "--data", str(release),
                       "--output", str(output)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err  # the missing model would be another error
    assert err.strip() == f"vita eval mme: error: {txt}:1: {jpg}: image data is not in a supported image format"


def test_json_benchmarks_name_the_item(tmp_path: Path) -> None:
    root = _ocrbench(tmp_path)
    png = root / "OCRBench_Images" / "docVQA" / "doc.png"
    png.write_bytes(b"GIF89a but nothing after it")
    line = next(k for k, t in enumerate((root / "OCRBench.json").read_text().splitlines(), 1) if '"docVQA"' in t)
    assert one_line_error("ocrbench", root).startswith(f"{root / 'OCRBench.json'}:{line - 1}: [2]: {png}: image ")


def test_a_bad_audio_file_or_range(tmp_path: Path) -> None:
    root = _librispeech(tmp_path)
    trans = root / "test-clean" / "1089" / "134686" / "1089-134686.trans.txt"
    flac = trans.parent / "1089-134686-0001.flac"
    flac.write_bytes(flac.read_bytes()[:200])  # cut off mid-stream
    assert one_line_error("librispeech", root).startswith(f"{trans}:2: {flac}: not a decodable audio file")

    write_audio(tmp_path / "audio" / "N0001.opus", ramp_tone(3.0))
    doc = {"audios": [{"aid": "N0001", "path": "audio/N0001.opus", "duration": 3.0, "segments": [
        {"sid": "N0001_S0", "begin_time": 0.0, "end_time": 1.0, "text": "今天", "subsets": ["TEST_NET"]},
        {"sid": "N0001_S1", "begin_time": 5.0, "end_time": 6.0, "text": "天气", "subsets": ["TEST_NET"]}]}]}
    (tmp_path / "WenetSpeech.json").write_text(json.dumps(doc, ensure_ascii=False))
    opus = tmp_path / "audio" / "N0001.opus"
    assert one_line_error("wenetspeech", tmp_path) == (  # a range past the end of the recording
        f"{tmp_path / 'WenetSpeech.json'}: segment N0001_S1: {opus}#t=5,6: the range 5.0-6.0 s holds no audio")


def test_a_bad_video(tmp_path: Path) -> None:
    root = _videomme(tmp_path, VIDEOMME_ROWS)
    parquet = root / "videomme" / "test-00000-of-00001.parquet"
    mp4 = root / "data" / "abcdefghijk.mp4"
    mp4.write_bytes(mp4.read_bytes()[:300])
    assert one_line_error("videomme", root) == f"{parquet}: row 2: {mp4}: video could not be decoded: Invalid data " \
                                               "found when processing input"
    write_image(mp4.with_suffix(".png")).rename(mp4)
    assert one_line_error("videomme", root).startswith(f"{parquet}: row 2: {mp4}: the video file is a PNG image")
    pd.DataFrame(VIDEOMME_ROWS).to_json(root / "videomme.json", orient="records")
    write_video(mp4)
    assert len(run(get("videomme"), root / "videomme.json", answer_by({})).items) == 3


def test_a_curriculum_manifest_names_its_line(tmp_path: Path) -> None:
    write_image(tmp_path / "red.png")
    (tmp_path / "blue.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    sample = {"kind": "image", "conversation": [{"role": "user", "content": "<image>\nWhat colour is it?"},
                                                {"role": "bot", "content": "red"}], "images": ["red.png"]}
    manifest = tmp_path / "heldout.jsonl"
    manifest.write_text(json.dumps(sample) + "\n\n" + json.dumps({**sample, "images": ["blue.png"]}) + "\n")
    assert one_line_error("curriculum", manifest).startswith(f"{manifest}:3: {tmp_path / 'blue.png'}: image data")


def test_each_file_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = _mme(tmp_path)  # 8 questions about 4 images
    decoded: list[str] = []
    monkeypatch.setattr(training_data, "check_medium", lambda kind, ref: decoded.append(ref))
    run(get("mme"), release, answer_by({}))
    assert len(decoded) == len(set(decoded)) == 4
