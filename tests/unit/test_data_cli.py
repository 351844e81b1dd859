"""`vita data convert` / `vita data check`: public layouts to manifests, and bad data found before a run.

An ML engineer's try (2026-12-04): turning a LLaVA JSON into a manifest needed a Python script around
`load_llava` and `write_manifest`; a stage config lists manifests only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from media_files import ramp_tone, write_audio, write_image

from vita import cli
from vita.training.data import read_manifest


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        status = cli.main(list(argv))
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status or 0, out, err


def _llava(tmp_path: Path, image: str = "000.png") -> Path:
    write_image(tmp_path / "coco" / "000.png")
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([
        {"id": "0", "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                      {"from": "gpt", "value": "Red."}]},
        {"id": "1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]}]))
    return path


def test_convert_llava_writes_a_manifest_a_stage_reads(tmp_path, capsys, monkeypatch):
    _llava(tmp_path)
    monkeypatch.chdir(tmp_path)
    status, out, _ = run(capsys, "data", "convert", "llava", "llava.json", "--media-dir", "coco",
                         "--output", "data/llava.jsonl")
    assert status == 0 and out.strip() == "data/llava.jsonl: 2 samples (1 image, 1 text)"
    line = json.loads((tmp_path / "data" / "llava.jsonl").read_text().splitlines()[0])
    assert line["images"] == ["../coco/000.png"]  # relative to the manifest: the two move together
    samples = read_manifest(tmp_path / "data" / "llava.jsonl")
    assert samples[0].images == [str(tmp_path / "coco" / "000.png")] and samples[0].answer == "Red."
    status, out, _ = run(capsys, "data", "check", "data/llava.jsonl")
    assert status == 0 and out.strip() == "data/llava.jsonl: 2 samples (1 image, 1 text), media decoded"


def test_convert_wenetspeech_keeps_the_asked_subsets(tmp_path, capsys):
    write_audio(tmp_path / "audio" / "a.wav", ramp_tone(3.0))
    source = tmp_path / "WenetSpeech.json"
    source.write_text(json.dumps({"audios": [{"aid": "A", "path": "audio/a.wav", "duration": 3.0, "segments": [
        {"sid": "A_1", "begin_time": 0.0, "end_time": 1.0, "text": "你好", "confidence": 1.0, "subsets": ["L"]},
        {"sid": "A_2", "begin_time": 1.0, "end_time": 2.5, "text": "再见", "confidence": 1.0,
         "subsets": ["TEST_NET"]}]}]}, ensure_ascii=False))
    out_path = tmp_path / "asr.jsonl"
    status, out, _ = run(capsys, "data", "convert", "wenetspeech", str(source), "--subsets", "L",
                         "--output", str(out_path))
    assert status == 0 and out.strip() == f"{out_path}: 1 samples (1 asr)"
    sample, = read_manifest(out_path)
    assert sample.audio == [f"{tmp_path / 'audio' / 'a.wav'}#t=0,1"] and sample.answer == "你好"
    status, _, err = run(capsys, "data", "convert", "wenetspeech", str(source), "--subsets", "XL",
                         "--output", str(out_path))
    assert status == 2 and err.strip() == f"vita data convert: error: {source}: no samples in subsets XL"


@pytest.mark.parametrize(("bad", "message"), [
    (b"junk", "image data is not in a supported image format"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, ""),  # a truncated PNG: its header passes, its pixels do not
])
def test_check_decodes_every_medium_and_names_the_line(tmp_path, capsys, bad, message):
    _llava(tmp_path)
    (tmp_path / "coco" / "bad.png").write_bytes(bad)
    manifest = tmp_path / "m.jsonl"
    assert run(capsys, "data", "convert", "llava", str(tmp_path / "llava.json"), "--media-dir",
               str(tmp_path / "coco"), "--output", str(manifest))[0] == 0
    record = json.loads(manifest.read_text().splitlines()[0])
    manifest.write_text(manifest.read_text() + json.dumps({**record, "images": ["coco/bad.png"]}) + "\n")
    status, _, err = run(capsys, "data", "check", str(manifest))
    assert status == 2
    assert err.startswith(f"vita data check: error: {manifest}:3: {tmp_path / 'coco' / 'bad.png'}: ")
    assert message in err and len(err.strip().splitlines()) == 1


def test_convert_errors_are_one_line(tmp_path, capsys):
    status, _, err = run(capsys, "data", "convert", "llava", str(tmp_path / "nope.json"), "--output",
                         str(tmp_path / "m.jsonl"))
    assert status == 2 and err.strip().startswith("vita data convert: error: ") and "nope.json" in err
    _llava(tmp_path, image="missing.png")
    status, _, err = run(capsys, "data", "convert", "llava", str(tmp_path / "llava.json"), "--output",
                         str(tmp_path / "m.jsonl"))
    assert status == 2 and "llava.json:" in err and "image file not found" in err
    assert not (tmp_path / "m.jsonl").exists()


def test_a_stage_whose_manifests_are_empty_names_them(tmp_path):
    from vita.training.config import ConfigError, DataConfig, InitConfig, StageConfig
    from vita.training.train import load_samples

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    config = StageConfig(stage=3, init=InitConfig(preset="tiny"), data=DataConfig(manifests=[str(empty)]))
    with pytest.raises(ConfigError, match=rf"the stage's manifests hold no samples \({empty};"):
        load_samples(config)
