"""`vita generate` from the shell, as a user runs it: a real subprocess on the tiny model."""

import os
import subprocess
import sys

import pytest


def vita(*args: str, model_dir=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vita.cli", *args]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_generate_with_every_modality(tiny_model_dir, wide_png, speech_wav, short_mp4):
    r = vita("generate", "--image", str(wide_png), "--audio", str(speech_wav), "--video", str(short_mp4),
             "--text", "What is in the picture?", "--max-tokens", "8", model_dir=tiny_model_dir)
    assert r.returncode == 0, r.stderr
    summary = r.stderr.strip().splitlines()[-1]
    assert "768 image in 3 tiles" in summary and "1536 video in 6 frames" in summary
    assert "audio in 1 clip" in summary and "generated" in summary


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", "hi", "--image", "/nonexistent.png"], "image 0"),
        (["--text", "hi", "--audio", "__BAD_WAV__"], "audio 0"),
        (["--text", "hi", "--video", "__BAD_VIDEO__"], "video"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tiny_model_dir, tmp_path, args, message):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"RIFF\x00\x00garbage")
    args = [str(bad) if a in ("__BAD_WAV__", "__BAD_VIDEO__") else a for a in args]
    r = vita("generate", *args, model_dir=tiny_model_dir)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert message in r.stderr and r.stderr.startswith("vita generate: error:")


def test_missing_model_dir_is_a_clear_error(tmp_path):
    r = vita("generate", "--text", "hi", model_dir=tmp_path / "nowhere")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == f"vita generate: error: {tmp_path / 'nowhere'}: no such directory\n"
