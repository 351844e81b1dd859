"""Audio front end: decoding and validation, resampling, and Kaldi filterbank parity."""

from __future__ import annotations

import io
import math
import struct
import wave

import av
import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vita.errors import InvalidInputError
from vita.model.config import AudioConfig
from vita.processing.audio import (
    fbank,
    float_to_pcm16,
    load_audio,
    num_audio_frames,
    num_audio_tokens,
    pcm16_to_float,
    resample,
    write_wav,
)

CONFIG = AudioConfig()


def _sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(seconds * rate), dtype=torch.float64) / rate
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def _wav(samples: np.ndarray, rate: int, dtype: str = "<i2", tag: int | None = None) -> bytes:
    """A RIFF/WAVE file of (samples,) or (samples, channels) stored as `dtype` (PCM for ints, IEEE for floats)."""
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    data = samples.astype(dtype).tobytes()
    width = np.dtype(dtype).itemsize
    tag = tag or (3 if np.dtype(dtype).kind == "f" else 1)
    block = channels * width
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, 8 * width)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


# ---------------------------------------------------------------------------------------------------------------
# Filterbank


def _kaldi_fbank(wave_: torch.Tensor) -> torch.Tensor:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = False
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.mel_opts.num_bins = 80
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0  # Nyquist
    online = knf.OnlineFbank(opts)
    online.accept_waveform(16000, (wave_ * 32768).tolist())
    online.input_finished()
    return torch.tensor(np.array([online.get_frame(i) for i in range(online.num_frames_ready)]))


def _test_waveforms() -> dict[str, torch.Tensor]:
    # Every signal carries a little broadband noise: with a bare tone, the low mel bins of a loud frame fall
    # ~90 dB below its peak, where Kaldi's float32 FFT itself is only good to ~1e-2 in the log.
    g = torch.Generator().manual_seed(0)
    t = torch.arange(24037, dtype=torch.float64) / 16000
    chirp = (0.1 * torch.sin(2 * math.pi * (100 * t + 1900 * t**2))).float()
    return {
        "noise": 0.1 * torch.randn(16001, generator=g),
        "sine_440": _sine(440, 1.25, 16000)[:19999] + 0.01 * torch.randn(19999, generator=g),
        "chirp": chirp + 0.03 * torch.randn(24037, generator=g),
        "one_frame": 0.1 * torch.randn(161, generator=g),
    }


@pytest.mark.parametrize("name", list(_test_waveforms()))
def test_fbank_matches_kaldi_native_fbank(name: str) -> None:
    wave_ = _test_waveforms()[name]
    expected = _kaldi_fbank(wave_)
    feats, num_frames = fbank(wave_, config=CONFIG)
    assert feats.shape == (1, expected.shape[0], 80)
    assert num_frames.tolist() == [expected.shape[0]] == [num_audio_frames(len(wave_), CONFIG)]
    assert (feats[0] - expected).abs().max() < 1e-3


def test_fbank_batch_rows_equal_each_row_alone() -> None:
    waves = list(_test_waveforms().values())
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    batch[0, lengths[0] :] = 0.7  # padding content must not leak into a row (Kaldi reflects at the row's end)
    feats, num_frames = fbank(batch, lengths, CONFIG)
    for row, w in enumerate(waves):
        alone, n = fbank(w, config=CONFIG)
        assert num_frames[row] == n[0]
        torch.testing.assert_close(feats[row, : n[0]], alone[0], atol=1e-5, rtol=0)
        assert (feats[row, n[0] :] == 0).all()


def test_two_seconds_give_200_frames_and_25_tokens() -> None:
    assert num_audio_frames(32000, CONFIG) == 200
    assert num_audio_tokens(32000, CONFIG) == 25
    assert num_audio_tokens(16000, CONFIG) == 13  # 100 frames -> 50 -> 25 -> ceil(12.5)
    for n in range(0, 50000, 97):
        assert num_audio_tokens(n, CONFIG) == math.ceil(((n + 80) // 160) / 8)


# ---------------------------------------------------------------------------------------------------------------
# Resampling


def _torchaudio_sinc_interp_hann(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """torchaudio.functional.resample's dense polyphase conv1d, transcribed (torchaudio is not installed)."""
    gcd = math.gcd(orig, new)
    orig, new = orig // gcd, new // gcd
    base = min(orig, new) * 0.99
    width = math.ceil(6 * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx) * base
    t = t.clamp(-6, 6)
    kernel = torch.special.sinc(t) * torch.cos(t * math.pi / 12) ** 2 * base / orig
    padded = F.pad(x.double()[None, None], (width, width + orig))
    return F.conv1d(padded, kernel, stride=orig).transpose(1, 2).reshape(-1)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 8001])
def test_resample_keeps_a_sine_in_place(rate: int) -> None:
    x = _sine(440, 0.8, rate)[:-3]  # odd lengths too
    y = resample(x, rate, 16000)
    assert y.shape == (round(len(x) * 16000 / rate),)
    spectrum = torch.fft.rfft(y.double() * torch.hann_window(len(y), dtype=torch.float64)).abs()
    assert abs(spectrum.argmax().item() * 16000 / len(y) - 440) <= 16000 / len(y)
    t = torch.arange(len(y), dtype=torch.float64) / 16000
    interior = slice(100, len(y) - 100)  # the edges see zero padding
    assert (y.double() - 0.5 * torch.sin(2 * math.pi * 440 * t))[interior].abs().max() < 2e-3


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_equals_torchaudio_kernel(rate: int) -> None:
    x = torch.randn(4001, generator=torch.Generator().manual_seed(rate))
    y = resample(x, rate, 16000)
    torch.testing.assert_close(y.double(), _torchaudio_sinc_interp_hann(x, rate, 16000)[: len(y)], atol=1e-5, rtol=0)


def test_resample_identity_and_batched_rows() -> None:
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    assert resample(x, 16000, 16000) is x
    y = resample(x, 44100, 16000)
    assert y.shape == (3, round(1000 * 16000 / 44100))
    torch.testing.assert_close(y[1], resample(x[1], 44100, 16000))


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def test_wav_pcm16_mono_matches_stdlib_writer() -> None:
    samples = (np.arange(-8000, 8000, 3) * 2).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples.tobytes())
    out = load_audio(buffer.getvalue())
    assert out.dtype == torch.float32 and out.dim() == 1
    torch.testing.assert_close(out, torch.from_numpy(samples / 32768.0).float(), atol=0, rtol=0)


def test_wav_pcm32_float32_and_stereo_downmix() -> None:
    x = _sine(440, 0.5, 16000).numpy()
    torch.testing.assert_close(load_audio(_wav(x, 16000, "<f4")), torch.from_numpy(x))
    torch.testing.assert_close(load_audio(_wav(np.round(x * 2**31), 16000, "<i4")), torch.from_numpy(x))
    stereo = np.stack([x, 0.5 * x], axis=1)
    torch.testing.assert_close(load_audio(_wav(stereo, 16000, "<f4")), torch.from_numpy(0.75 * x))


def test_wav_at_another_rate_is_resampled(tmp_path) -> None:
    x = _sine(440, 0.5, 48000)
    path = tmp_path / "a.wav"
    path.write_bytes(_wav(np.round(x.numpy() * 32767), 48000))
    for source in (path, str(path)):
        out = load_audio(source)
        assert out.shape == (8000,) and out.abs().max() <= 1.0
    torch.testing.assert_close(out, resample(x, 48000, 16000), atol=1e-4, rtol=0)


def test_flac_is_decoded_through_pyav() -> None:
    x = _sine(440, 0.5, 22050)
    pcm = np.round(x.numpy() * 32767).astype(np.int16)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=22050, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = 22050
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    out = load_audio(buffer.getvalue())  # FLAC is lossless: same as the samples resampled here
    torch.testing.assert_close(out, resample(torch.from_numpy(pcm / 32768.0).float(), 22050, 16000))


def test_raw_arrays() -> None:
    pcm = np.array([0, 16384, -32768, 32767] * 100, dtype=np.int16)
    torch.testing.assert_close(load_audio(pcm, 16000), torch.from_numpy(pcm / 32768.0).float())
    floats = torch.linspace(-1, 1, 400)
    torch.testing.assert_close(load_audio(floats, 16000), floats)
    torch.testing.assert_close(load_audio(torch.stack([floats, -floats]), 16000), torch.zeros(400))
    assert load_audio(floats.numpy(), np.int64(8000)).shape == (800,)


def test_pcm16_to_float() -> None:
    data = np.array([0, 1, -32768, 32767, 16384], dtype="<i2").tobytes()
    assert pcm16_to_float(data).tolist() == [0.0, 1 / 32768, -1.0, 32767 / 32768, 0.5]
    with pytest.raises(InvalidInputError, match="even number of bytes"):
        pcm16_to_float(data[:-1])


def test_float_to_pcm16_clips_and_round_trips(tmp_path) -> None:
    samples = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.7, -3.0, 1 / 32767], dtype=np.float32)
    data = float_to_pcm16(samples)
    assert np.frombuffer(data, dtype="<i2").tolist() == [0, 16383, -16383, 32767, -32767, 32767, -32767, 1]
    assert float_to_pcm16(torch.from_numpy(samples)) == data == float_to_pcm16(samples.astype(np.float64).tolist())
    torch.testing.assert_close(pcm16_to_float(data)[:5], torch.from_numpy(samples[:5]), atol=1 / 16384, rtol=0)
    with wave.open(str(write_wav(tmp_path / "x.wav", samples, 8000))) as w:
        assert (w.getframerate(), w.readframes(w.getnframes())) == (8000, data)


def _no_data_chunk() -> bytes:
    return _wav(np.zeros(10, np.int16), 16000)[:36]


@pytest.mark.parametrize(
    ("source", "rate", "message"),
    [
        (b"", None, "empty"),
        (np.zeros(0, np.float32), 16000, "empty"),
        (_wav(np.zeros(0, np.int16), 16000), None, "empty"),
        (np.full(1600, np.nan, np.float32), 16000, "NaN or Inf"),
        (np.array([0.0, np.inf] * 800, np.float32), 16000, "NaN or Inf"),
        (bytes(range(256)) * 40, None, r"^not a decodable audio file \(WAV, FLAC, MP3, Ogg, AAC/M4A, ...\); FFmpeg: "
                                       r"invalid data found when processing input$"),  # no errno, no '<none>'
        (_wav(np.zeros(1600), 16000, "u1", tag=6), None, "unsupported WAV encoding"),
        (_no_data_chunk(), None, "no 'data' chunk"),
        (np.zeros(1600, np.float32), None, "need a sample_rate"),
        (np.zeros(1600, np.float32), 7999, "sample rate 7999"),
        (np.zeros(1600, np.float32), 192001, "sample rate 192001"),
        (np.zeros(1600, np.float32), 16000.5, "sample rate 16000.5"),
        (_wav(np.zeros(1600, np.int16), 4000), None, "sample rate 4000"),
        (_wav(np.zeros(1600, np.int16), 16000), 8000, "disagrees"),
        (np.zeros(100, np.float32), 16000, "at least 10 ms"),
        (np.zeros((16000, 2), np.float32), 16000, "channels, samples"),
        (np.zeros(1600, np.uint8), 16000, "unsupported sample type"),
        ("/nonexistent/clip.wav", None, "cannot read audio file"),
        ([0.0] * 1600, 16000, "unsupported audio source"),
    ],
)
def test_bad_input_is_rejected(source, rate, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        load_audio(source, rate)


def test_audio_longer_than_max_seconds_is_rejected() -> None:
    x = np.zeros(16000 * 3, np.float32)
    assert load_audio(x, 16000, max_seconds=3).shape == (48000,)
    with pytest.raises(InvalidInputError, match="limit is 2 s"):
        load_audio(x, 16000, max_seconds=2)
