"""Audio front end: decode and validate user audio, resample to 16 kHz, and compute Kaldi-style filterbanks.

Everything is plain torch (no torchaudio), so the same code runs in the audio service, the trainer and the tests.
"""

from __future__ import annotations

import functools
import io
import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.audio.stream import AudioStream
from av.container import InputContainer

from vita.errors import InvalidInputError, ffmpeg_reason, naming_file
from vita.model.config import AudioConfig
from vita.v1.media_pb2 import Audio

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
MIN_SECONDS = 0.01  # one 10 ms frame shift: anything shorter gives no filterbank frame
MAX_CHANNELS = 32
_RESAMPLE_CHUNK = 1 << 16  # output samples gathered at once, so long clips do not need (n_out, taps) memory

AudioSource = bytes | bytearray | memoryview | str | Path | np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def load_audio(
    source: AudioSource,
    sample_rate: int | None = None,
    *,
    target_rate: int = 16000,
    max_seconds: float = 600.0,
) -> torch.Tensor:
    """The 1-D float32 mono waveform in [-1, 1] at `target_rate` that the filterbank expects.

    `source` is encoded audio (bytes or a file path: WAV natively, other containers through PyAV) or raw samples
    (`sample_rate` required; int16 is scaled by 1/32768, floats are taken as is; 2-D means (channels, samples)).
    """
    if isinstance(source, str | Path):
        with naming_file(source):
            return load_audio(_read_file(Path(source)), sample_rate, target_rate=target_rate,
                              max_seconds=max_seconds)
    if isinstance(source, bytes | bytearray | memoryview):
        samples, rate = decode_audio_bytes(bytes(source))
        if sample_rate is not None and sample_rate != rate:
            raise InvalidInputError(f"sample_rate={sample_rate} disagrees with the {rate} Hz in the audio header")
    elif isinstance(source, np.ndarray | torch.Tensor):
        if sample_rate is None:
            raise InvalidInputError("raw audio samples need a sample_rate")
        samples, rate = _samples_to_float(source), sample_rate
    else:
        raise InvalidInputError(f"unsupported audio source of type {type(source).__name__}")

    rate = _check_sample_rate(rate)
    seconds = samples.shape[-1] / rate
    if samples.numel() == 0:
        raise InvalidInputError("audio is empty")
    if seconds < MIN_SECONDS:
        raise InvalidInputError(f"audio is {seconds * 1000:.1f} ms long; at least {MIN_SECONDS * 1000:g} ms needed")
    if seconds > max_seconds:
        raise InvalidInputError(f"audio is {seconds:.1f} s long; the limit is {max_seconds:g} s")
    if not torch.isfinite(samples).all():
        raise InvalidInputError("audio contains NaN or Inf samples")
    wave = resample(samples.mean(dim=0), rate, target_rate)
    return wave.clamp_(-1.0, 1.0)  # resampling can overshoot full scale slightly; the encoder assumes int16 range


def write_wav(path: str | Path, samples: np.ndarray | torch.Tensor, rate: int = 16000) -> Path:
    """Mono PCM16 WAV from float samples in [-1, 1] (clipped): what tests and the demo hand to the services."""
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(float_to_pcm16(samples))
    return Path(path)


def float_to_pcm16(samples: np.ndarray | torch.Tensor) -> bytes:
    """Float samples in [-1, 1] (clipped) as raw little-endian 16-bit PCM: what clients stream, what WAV holds.

    The inverse of `pcm16_to_float` up to rounding; full scale is 32767 so +1.0 does not wrap around.
    """
    array = samples.numpy() if isinstance(samples, torch.Tensor) else samples
    return (np.clip(np.asarray(array, dtype=np.float32), -1.0, 1.0) * 32767).astype("<i2").tobytes()


def check_audio_encoding(audio: Audio, prefix: str = "") -> None:
    """InvalidInputError (`prefix` + "encoding N is not an Audio.Encoding ...") for an `Audio.encoding` the proto
    does not define: proto3 enums are open, any number parses, and one must not be read as a WAV file."""
    if audio.encoding not in Audio.Encoding.values():
        raise InvalidInputError(f"{prefix}encoding {audio.encoding} is not an Audio.Encoding (0 or WAV = 1: a WAV "
                                f"file, PCM16 = 2: raw samples)")


def pcm16_to_float(data: bytes) -> torch.Tensor:
    """Raw little-endian 16-bit PCM (what streaming clients send) as float32 in [-1, 1)."""
    if len(data) % 2:
        raise InvalidInputError(f"PCM16 audio must have an even number of bytes; got {len(data)}")
    return torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0)


def decode_audio_bytes(data: bytes) -> tuple[torch.Tensor, int]:
    """(channels, samples) float32 and the sample rate of an encoded file: WAV here, anything else via PyAV."""
    if len(data) == 0:
        raise InvalidInputError("audio is empty")
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return _decode_wav(data)
    return _decode_with_av(data)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidInputError(f"cannot read audio file {path}: {e.strerror}") from None


def _check_sample_rate(rate: int) -> int:
    if not isinstance(rate, int | np.integer) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidInputError(
            f"sample rate {rate!r} is not supported; use an integer in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz"
        )
    return int(rate)


def _samples_to_float(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(samples)) if isinstance(samples, np.ndarray) else samples.detach()
    x = x.cpu()
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[0] > MAX_CHANNELS:
        raise InvalidInputError(
            f"audio samples must be 1-D or (channels, samples) with at most {MAX_CHANNELS} channels; "
            f"got shape {tuple(x.shape)}"
        )
    if x.dtype == torch.int16:
        return x.float() / 32768.0
    if x.dtype == torch.int32:
        return (x.double() / 2**31).float()
    if x.is_floating_point():
        return x.float()
    raise InvalidInputError(f"unsupported sample type {x.dtype}; use int16, int32 or floating point")


def _decode_wav(data: bytes) -> tuple[torch.Tensor, int]:
    """RIFF/WAVE with PCM 8/16/24/32-bit or IEEE float 32/64-bit samples, including WAVE_FORMAT_EXTENSIBLE."""
    fmt = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, pos)
        body = data[pos + 8 : pos + 8 + size]  # a streamed file's size may overrun the end: take what is there
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise InvalidInputError("WAV 'fmt ' chunk is truncated")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the sub-format GUID
                (tag,) = struct.unpack_from("<H", body, 24)
            fmt = tag, channels, rate, bits
        elif chunk_id == b"data":
            if fmt is None:
                raise InvalidInputError("WAV 'data' chunk comes before its 'fmt ' chunk")
            tag, channels, rate, bits = fmt
            return _wav_samples(body, tag, channels, bits), rate
        pos += 8 + size + (size & 1)
    raise InvalidInputError("WAV file has no 'data' chunk")


def _wav_samples(body: bytes, tag: int, channels: int, bits: int) -> torch.Tensor:
    width = bits // 8
    if channels < 1 or channels > MAX_CHANNELS:
        raise InvalidInputError(f"WAV file has {channels} channels; 1 to {MAX_CHANNELS} are supported")
    frame_bytes = width * channels
    body = body[: len(body) // frame_bytes * frame_bytes] if frame_bytes else b""  # drop a truncated last frame
    if tag == 1 and bits == 8:
        x = (np.frombuffer(body, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == 1 and bits in (16, 24, 32):
        # Left-align every sample in an int32 so one scale serves all widths (24-bit has no numpy dtype).
        raw = np.frombuffer(body, np.uint8).reshape(-1, width)
        aligned = np.zeros((len(raw), 4), np.uint8)
        aligned[:, 4 - width :] = raw
        x = (aligned.view("<i4")[:, 0] / 2.0**31).astype(np.float32)
    elif tag == 3 and bits in (32, 64):
        x = np.frombuffer(body, f"<f{width}").astype(np.float32)
    else:
        raise InvalidInputError(f"unsupported WAV encoding: format tag {tag} with {bits}-bit samples")
    return torch.from_numpy(x.reshape(-1, channels).T.copy())


def _decode_with_av(data: bytes) -> tuple[torch.Tensor, int]:
    """Compressed containers (mp3, aac, ogg, flac, ...): the first audio stream as (channels, samples), one rate.

    Streams may change channel layout, sample format or rate mid-file (files joined as bytes, radio streams):
    as the `ffmpeg` tool does, every frame is converted by libswresample to float at one rate (the first
    frame's), and a new converter is set up whenever the input changes, since one only takes the input it was
    built for. Where the layout changes, the channels are averaged (the downmix `load_audio` applies anyway),
    so the result is one channel. Packets the decoder rejects (a tag or junk between joined files) are
    skipped, as the `ffmpeg` tool skips them; a file in which none decodes is an error.
    """
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise InvalidInputError("the file holds no audio stream")
            stream = container.streams.audio[0]
            chunks, rate = _float_chunks(_decoded_frames(container, stream))
    except av.FFmpegError as e:  # FFmpeg's reason, without its errno and '<none>' file name
        reason = ffmpeg_reason(e)
        raise InvalidInputError(f"not a decodable audio file (WAV, FLAC, MP3, Ogg, AAC/M4A, ...); FFmpeg: "
                                f"{reason[:1].lower()}{reason[1:]}") from None
    if not chunks:
        raise InvalidInputError("audio is empty")
    if len({c.shape[0] for c in chunks}) > 1:
        chunks = [c.mean(axis=0, keepdims=True) for c in chunks]
    return torch.from_numpy(np.concatenate(chunks, axis=1)), rate


def _decoded_frames(container: InputContainer, stream: AudioStream) -> Iterator[av.AudioFrame]:
    """The stream's frames; a packet the decoder rejects is skipped unless no packet decodes at all."""
    error: av.FFmpegError | None = None
    decoded = False
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.InvalidDataError as e:
            error = error or e
            continue
        decoded = decoded or bool(frames)
        yield from frames
    if error is not None and not decoded:
        raise error


def _float_chunks(frames: Iterable[av.AudioFrame]) -> tuple[list[np.ndarray], int]:
    """(channels, n) float32 arrays at the first frame's rate, and that rate (0 when there are no frames)."""
    chunks: list[np.ndarray] = []
    rate = 0
    converter, source = None, None
    for frame in frames:
        setup = (frame.format.name, frame.layout.name, frame.sample_rate)
        if setup != source:
            if converter is not None:
                chunks += [f.to_ndarray() for f in converter.resample(None)]
            rate = rate or frame.sample_rate
            converter = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=rate)
            source = setup
        chunks += [f.to_ndarray() for f in converter.resample(frame)]
    if converter is not None:
        chunks += [f.to_ndarray() for f in converter.resample(None)]
    return [c for c in chunks if c.size], rate


# ----------------------------------------------------------------------------------------------------------------
# Resampling


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int, *, lowpass_width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling along the last axis with torchaudio's `sinc_interp_hann` kernel.

    Polyphase: after dividing both rates by their gcd, output sample k*new + p is a fixed filter (phase p) applied
    to the inputs around k*orig, so only `new` filters of a few taps each are built, whatever the rates.
    The output has round(n * new_rate / orig_rate) samples.
    """
    if orig_rate == new_rate:
        return wave
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    kernel, first_tap, reach = _sinc_kernel(orig, new, lowpass_width, rolloff)
    kernel = kernel.to(wave.dtype)
    taps = kernel.shape[1]

    n = wave.shape[-1]
    n_out = round(n * new_rate / orig_rate)
    if n_out == 0:
        return wave.new_zeros(*wave.shape[:-1], 0)
    index = torch.arange(n_out)
    phase = index % new
    start = (index // new) * orig + first_tap[phase] + reach  # + reach: positions in the left-padded input
    pad_right = max(0, int(start[-1]) + taps - (n + reach))
    x = F.pad(wave.reshape(-1, n), (reach, pad_right))
    windows = x.unfold(-1, taps, 1)  # a view: (rows, positions, taps)

    out = wave.new_empty(x.shape[0], n_out)
    for s in range(0, n_out, _RESAMPLE_CHUNK):
        ph, st = phase[s : s + _RESAMPLE_CHUNK], start[s : s + _RESAMPLE_CHUNK]
        out[:, s : s + _RESAMPLE_CHUNK] = (windows[:, st] * kernel[ph]).sum(-1)
    return out.reshape(*wave.shape[:-1], n_out)


@functools.lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int, lowpass_width: int, rolloff: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per phase p: Hann-windowed sinc taps (new, taps) around input position p*orig/new, and each phase's first tap."""
    base = min(orig, new) * rolloff  # cutoff below both Nyquist rates, in units of the gcd rate
    reach = math.ceil(lowpass_width * orig / base)  # input samples on each side that the window covers
    centre = torch.arange(new, dtype=torch.float64) * orig / new
    first_tap = torch.floor(centre).long() - reach
    offsets = first_tap[:, None] + torch.arange(2 * reach + 2)
    t = ((offsets - centre[:, None]) * base / orig).clamp(-lowpass_width, lowpass_width)
    window = torch.cos(t * math.pi / lowpass_width / 2) ** 2
    kernel = torch.special.sinc(t) * window * (base / orig)
    return kernel.float(), first_tap, reach


# ----------------------------------------------------------------------------------------------------------------
# Filterbank


def num_audio_frames(num_samples: int, config: AudioConfig) -> int:
    """Filterbank frames with Kaldi's snip_edges=False: one frame per shift, centred, rounded to nearest."""
    shift = config.frame_shift_samples
    return (num_samples + shift // 2) // shift


def num_audio_tokens(num_samples: int, config: AudioConfig) -> int:
    """LLM tokens the audio tower gives for `num_samples` samples at 16 kHz.

    frames = floor((samples + 80) / 160); each stride-2 stage (two convolutions, then the connector pairing frames)
    keeps ceil(L / 2), so with the default 2x connector tokens = ceil(frames / 8): 2.00 s -> 200 frames -> 25.
    """
    length = config.encoder_length(num_audio_frames(num_samples, config))
    return -(-length // config.connector_downsample)


def fbank(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None = None,
    config: AudioConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaldi `compute-fbank-feats` (no dither, snip_edges=False) for a padded batch: (feats (B, T, bins), frames (B,)).

    Waveforms are floats in [-1, 1] and are scaled to int16 range first, as WeNet does, so the log energies match
    Kaldi's. Each row uses only its first `lengths[b]` samples (Kaldi reflects at both edges), so a row gives the
    same frames in any batch; frames past a row's count are zero.
    """
    config = config or AudioConfig()
    if waveforms.dim() == 1:
        waveforms = waveforms[None]
    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be (N,) or (B, N); got shape {tuple(waveforms.shape)}")
    batch, width = waveforms.shape
    device = waveforms.device
    if lengths is None:
        lengths = torch.full((batch,), width, dtype=torch.long, device=device)
    lengths = lengths.to(device=device, dtype=torch.long)
    if lengths.shape != (batch,) or bool((lengths < 0).any()) or bool((lengths > width).any()):
        raise ValueError(f"lengths must be ({batch},) with values in [0, {width}]")

    frame_length = int(config.sample_rate * config.frame_length_ms / 1000)
    shift = config.frame_shift_samples
    num_frames = (lengths + shift // 2) // shift
    frames_max = int(num_frames.max()) if batch else 0

    # Sample indices of every frame; Kaldi reflects out-of-range ones (-1 -> 0, n -> n - 1), which is folding
    # the index into one period of the mirrored signal of length 2n.
    start = torch.arange(frames_max, device=device) * shift + shift // 2 - frame_length // 2
    index = start[:, None] + torch.arange(frame_length, device=device)
    n = lengths.clamp(min=1)[:, None, None]
    index = index[None] % (2 * n)
    index = torch.where(index < n, index, 2 * n - 1 - index)
    # float64 up to the power spectrum: the low mel bins of a loud frame sit ~90 dB below its peak, which is
    # under float32 rounding of the FFT (Kaldi's own float32 output wobbles there by ~1e-3).
    frames = waveforms.double().gather(1, index.reshape(batch, -1)).reshape(batch, frames_max, frame_length)
    frames = frames * 32768.0

    frames = frames - frames.mean(dim=-1, keepdim=True)
    frames = torch.cat([frames[..., :1] * (1 - config.preemphasis),
                        frames[..., 1:] - config.preemphasis * frames[..., :-1]], dim=-1)
    window, mel_banks, fft_size = _fbank_constants(config.sample_rate, frame_length, config.num_mel_bins)
    frames = frames * window.to(device)
    power = torch.fft.rfft(frames, n=fft_size).abs().square().float()
    energies = power[..., : fft_size // 2] @ mel_banks.to(device)  # Kaldi's bins skip the Nyquist one
    feats = energies.clamp(min=torch.finfo(torch.float32).eps).log()

    valid = torch.arange(frames_max, device=device)[None] < num_frames[:, None]
    return feats.masked_fill(~valid[..., None], 0.0), num_frames


def audio_features(waveforms: Sequence[torch.Tensor], config: AudioConfig | None = None) -> list[torch.Tensor]:
    """One (frames_i, num_mel_bins) filterbank per 1-D 16 kHz waveform, computed as one padded `fbank` batch.

    This is what the audio tower reads (`MultimodalInputs.audio_features`, `AudioTower.encode_features`); a clip
    under 10 ms gives 0 frames, which the tower refuses.
    """
    if not waveforms:
        return []
    lengths = torch.tensor([w.shape[-1] for w in waveforms])
    feats, num_frames = fbank(torch.nn.utils.rnn.pad_sequence(list(waveforms), batch_first=True), lengths, config)
    return [f[:n] for f, n in zip(feats, num_frames.tolist())]


@functools.lru_cache(maxsize=8)
def _fbank_constants(sample_rate: int, frame_length: int, num_bins: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Povey window (frame_length,) in float64, Kaldi mel banks (fft_size // 2, num_bins) and the power-of-two FFT size."""
    fft_size = 1 << (frame_length - 1).bit_length()
    i = torch.arange(frame_length, dtype=torch.float64)
    window = (0.5 - 0.5 * torch.cos(2 * math.pi * i / (frame_length - 1))) ** 0.85

    def mel(hz: torch.Tensor) -> torch.Tensor:
        return 1127.0 * torch.log1p(hz / 700.0)

    low, high = mel(torch.tensor(20.0, dtype=torch.float64)), mel(torch.tensor(sample_rate / 2, dtype=torch.float64))
    edges = low + (high - low) / (num_bins + 1) * torch.arange(num_bins + 2, dtype=torch.float64)
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    bin_mel = mel(torch.arange(fft_size // 2, dtype=torch.float64) * sample_rate / fft_size)[:, None]
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    banks = torch.minimum(rising, falling).clamp(min=0.0)  # triangles, zero outside (left, right)
    return window, banks.float(), fft_size
