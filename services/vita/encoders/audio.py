"""The audio tower behind the audio-encoder pool: WAV or PCM16 speech -> 16 kHz -> filterbanks -> embeddings.

Filterbanks are computed per job in `prepare` (what `vita.processing.audio.audio_features` does for a whole
batch), so preprocessed `features` items batch with raw audio, and a clip too long for the tower is refused alone
instead of failing everyone's forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from vita.bus.streams import Pool
from vita.encoders.base import Encoder, blob_input, checked_input, kind_name, prepare_all, v2_bytes, v2_floats
from vita.errors import InvalidInputError
from vita.model.audio import AudioTower
from vita.model.config import AudioConfig
from vita.processing.audio import check_audio_encoding, fbank, load_audio, pcm16_to_float
from vita.v1.bus_pb2 import EncodeJob, MediaItem
from vita.v1.media_pb2 import Audio


class AudioTowerEncoder(Encoder):
    pool = Pool.AUDIO_ENCODER
    modality = "audio"
    kinds = frozenset({EncodeJob.AUDIO})
    # audio, BYTES: encoded files (WAV or anything FFmpeg reads), or UINT8 [bytes]: one file. audio, FP32: samples,
    # [samples] or [clips, samples], with the request parameter `sample_rate` (Hz). features: one clip's
    # filterbanks. Triton's Python-backend model (model_repository_cpu/audio-encoder) takes audio as UINT8 and
    # features.
    v2_inputs = ({"name": "audio", "datatype": "BYTES", "shape": [-1]},
                 {"name": "features", "datatype": "FP32", "shape": [-1, -1]})

    tower: AudioTower
    config: AudioConfig

    def prepare(self, kind: int, item: MediaItem) -> torch.Tensor:
        """(frames, mel bins) filterbank features of one clip."""
        source = item.WhichOneof("source")
        if source == "audio":
            return self.filterbank(_waveform(item.audio))
        if source == "features":
            return self._fits(blob_input(item.features, "filterbank features", (None, self.config.num_mel_bins)))
        raise InvalidInputError(f"{kind_name(kind)} jobs cannot carry {source or 'empty'} items")

    def filterbank(self, waveform: torch.Tensor) -> torch.Tensor:
        feats, _ = fbank(waveform, config=self.config)
        return self._fits(feats[0])

    def _fits(self, feats: torch.Tensor) -> torch.Tensor:
        """The tower's relative positions bound the clip length; checked here so only this job fails."""
        if self.config.encoder_length(feats.shape[0]) > self.config.max_relative_positions:  # more than config.max_frames frames
            raise InvalidInputError(f"audio is too long: {feats.shape[0]} filterbank frames; this encoder takes "
                                    f"at most {self.config.max_frames} ({self.config.max_seconds:g} s)")
        return feats

    def from_v2(self, name: str, array: np.ndarray, parameters: Mapping[str, object]) -> list[torch.Tensor]:
        if name == "features":
            return [self._fits(checked_input(v2_floats(name, array), "filterbank features",
                                             (None, self.config.num_mel_bins)))]
        if name != "audio":
            raise InvalidInputError(f"unknown input {name!r}: this model takes 'audio' (BYTES, UINT8 or FP32) "
                                    f"or 'features' (FP32)")
        if array.dtype == np.float32:
            if "sample_rate" not in parameters:
                raise InvalidInputError("FP32 audio needs the sample rate in Hz as parameter 'sample_rate'")
            if array.ndim not in (1, 2) or not array.size:
                raise InvalidInputError(f"FP32 audio must be [samples] or [clips, samples], not empty; got "
                                        f"{list(array.shape)}")
            rate = parameters["sample_rate"]
            clips = array.reshape(-1, array.shape[-1])
            return prepare_all(name, clips, lambda samples: self.filterbank(load_audio(samples.copy(), rate)))
        return prepare_all(name, v2_bytes(name, array), lambda data: self.filterbank(load_audio(data)))

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        device, dtype = self.placement
        frames = torch.tensor([x.shape[0] for x in inputs], device=device)
        feats = pad_sequence(list(inputs), batch_first=True).to(device=device, dtype=dtype)
        with torch.inference_mode():
            embeds, tokens = self.tower(feats, frames)
        return [e[:n] for e, n in zip(embeds, tokens.tolist())]


def _waveform(audio: Audio) -> torch.Tensor:
    """PCM16 takes its rate from the message; WAV (or unspecified) is a file whose header gives it. An encoding the
    proto does not define is refused, not read as a file (proto3 enums are open: any number parses)."""
    check_audio_encoding(audio, "audio ")
    if audio.encoding == Audio.PCM16:
        return load_audio(pcm16_to_float(audio.data), audio.sample_rate_hz)
    return load_audio(audio.data)
