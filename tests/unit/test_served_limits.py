"""The orchestrator's flags against the model it serves (found by a new user, a backend developer): the audio limit
checked on arrival is the one the audio encoder enforces (it was 600 s against the encoder's 200 s), a WAV is timed
by the data it holds, `--barge-in-max-ms -1` switches the rule off as serving.md says, and a session's bad VAD value
is named as the client set it (`SessionConfig.vad.start_threshold`, not the server's `VADConfig`)."""

from __future__ import annotations

import struct

import pytest
import torch

from vita.errors import InvalidInputError, VitaError
from vita.model.config import AudioConfig, VitaConfig
from vita.orchestrator.__main__ import input_limits, parse_args, vad_defaults
from vita.orchestrator.config import session_vad
from vita.orchestrator.limits import InputLimits, audio_seconds
from vita.processing.audio import fbank, num_audio_frames
from vita.processing.vad import VADConfig
from vita.v1.assistant_pb2 import SessionConfig, VadParams
from vita.v1.media_pb2 import Audio

TINY = VitaConfig.preset("tiny")


def test_the_encoders_limit_is_its_audio_configs_max_seconds():
    """20000 filterbank frames (5000 relative positions after 4x subsampling) = 200 s; a clip of exactly
    max_seconds fits, one frame shift more does not (a small config, so the real filterbank runs on it)."""
    audio = TINY.audio
    assert (audio.max_frames, audio.max_seconds) == (20_000, 200.0)
    assert num_audio_frames(round(audio.max_seconds * audio.sample_rate), audio) == audio.max_frames
    small = AudioConfig(**{**vars(audio), "max_relative_positions": 25})  # 100 frames, 1 s
    samples = round(small.max_seconds * small.sample_rate)
    frames = fbank(torch.zeros(samples), config=small)[0].shape[1]
    longer = fbank(torch.zeros(samples + small.frame_shift_samples), config=small)[0].shape[1]
    assert (frames, small.max_seconds) == (small.max_frames, 1.0) and longer == small.max_frames + 1
    positions = ((longer + 1) // 2 + 1) // 2  # what the encoder's check computes
    assert positions > small.max_relative_positions


def test_the_arrival_limit_defaults_to_what_the_served_models_encoder_takes():
    assert InputLimits().max_audio_s == TINY.audio.max_seconds == 200.0
    assert input_limits(parse_args([]), TINY).max_audio_s == 200.0
    half = VitaConfig.preset("tiny")
    half.audio.max_relative_positions = 2_500
    assert input_limits(parse_args([]), half).max_audio_s == 100.0  # the model's, not a constant
    assert input_limits(parse_args(["--max-audio-seconds", "30"]), TINY).max_audio_s == 30.0  # lowered
    with pytest.raises(VitaError, match=r"--max-audio-seconds 600 is above what the model's audio encoder takes "
                                        r"\(200 s, 20000 filterbank frames\)"):
        input_limits(parse_args(["--max-audio-seconds", "600"]), TINY)
    text_only = VitaConfig(audio=None, vision=None)
    assert input_limits(parse_args(["--max-audio-seconds", "900"]), text_only).max_audio_s == 900.0


def _wav(data_bytes: bytes, claimed: int, rate: int = 16_000) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + claimed) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", claimed) + data_bytes)


def test_a_wav_is_timed_by_the_data_it_holds_not_its_size_field():
    """What docs/serving.md says the arrival check reads: a header claiming 700 s over 1 s of data is 1 s."""
    one_second = b"\x00\x00" * 16_000
    assert audio_seconds(Audio(data=_wav(one_second, claimed=700 * 32_000))) == 1.0
    assert audio_seconds(Audio(data=_wav(one_second, claimed=len(one_second)))) == 1.0


def test_barge_in_max_ms_minus_one_switches_the_rule_off():
    """serving.md: -1 switches the rule off; the flag refused it at start-up (VADConfig: non-negative)."""
    assert vad_defaults(parse_args(["--barge-in-max-ms", "-1"])).barge_in_max_ms == 0
    assert vad_defaults(parse_args(["--barge-in-max-ms", "0"])).barge_in_max_ms == 0
    assert vad_defaults(parse_args([])).barge_in_max_ms == VADConfig().barge_in_max_ms


@pytest.mark.parametrize(("vad", "message"), [
    (VadParams(start_threshold=-0.5), "SessionConfig.vad.start_threshold must be a probability in (0, 1); got -0.5"),
    (VadParams(end_threshold=1.5), "SessionConfig.vad.end_threshold must be a probability in (0, 1); got 1.5"),
    (VadParams(min_speech_ms=-5), "SessionConfig.vad.min_speech_ms must be a non-negative integer; got -5"),
    (VadParams(start_threshold=0.25), "SessionConfig.vad.end_threshold (0.35) must not exceed start_threshold"),
    (VadParams(min_speech_ms=40_000), "SessionConfig.vad.min_speech_ms + speech_pad_ms (40000 + 100 ms) must be at "
                                      "most 29936 ms"),
])
def test_a_sessions_bad_vad_value_is_named_by_its_proto_field(vad, message):
    with pytest.raises(InvalidInputError) as err:
        session_vad(VADConfig(), SessionConfig(vad=vad))
    assert message in str(err.value) and "VADConfig" not in str(err.value)
