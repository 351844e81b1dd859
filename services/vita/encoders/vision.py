"""The vision tower behind the vision-encoder pool: images are tiled dynamically, video frames are one tile each.

Both kinds share the pool and a batch: every tile of every job goes through one `VisionTower` forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from vita.bus.streams import Pool
from vita.encoders.base import Encoder, blob_input, checked_input, kind_name, prepare_all, v2_bytes, v2_floats
from vita.errors import InvalidInputError
from vita.model.config import VisionConfig
from vita.model.vision import VisionTower
from vita.processing.image import preprocess_image
from vita.processing.video import decode_video, sample_frames, video_to_pixel_values
from vita.v1.bus_pb2 import EncodeJob, MediaItem
from vita.v1.media_pb2 import Video

_V2_KINDS = {"image": EncodeJob.IMAGE, "video": EncodeJob.VIDEO}


class VisionTowerEncoder(Encoder):
    pool = Pool.VISION_ENCODER
    modality = "vision"
    kinds = frozenset(_V2_KINDS.values())
    v2_inputs = (
        {"name": "image", "datatype": "BYTES", "shape": [-1]},  # encoded images, each tiled dynamically
        {"name": "video", "datatype": "BYTES", "shape": [-1]},  # video files, each sampled into frames
        {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, -1, -1]},  # one item's preprocessed tiles
    )  # image and video also take UINT8 [bytes], one file: what the Triton model (vision-encoder) takes

    tower: VisionTower
    config: VisionConfig

    def prepare(self, kind: int, item: MediaItem) -> torch.Tensor:
        """(tiles, 3, 448, 448) pixels, exactly as the in-process processor makes them."""
        source = item.WhichOneof("source")
        if source == "features":
            size = self.config.image_size
            return blob_input(item.features, "pixel tiles", (None, self.config.num_channels, size, size))
        if kind == EncodeJob.IMAGE and source == "image":
            return preprocess_image(item.image.data, self.config)
        if kind == EncodeJob.VIDEO and source == "video":
            return self._video(item.video)
        raise InvalidInputError(f"{kind_name(kind)} jobs cannot carry {source or 'empty'} items")

    def _video(self, video: Video) -> torch.Tensor:
        source = video.WhichOneof("source")
        if source == "file":
            clip = decode_video(video.file)
        elif source == "frames":
            # Only the sampled frames are ever decoded: `sample_frames` picks, then loads, from the raw bytes.
            clip = sample_frames([(f.timestamp_s, f.image.data) for f in video.frames.frames])
        else:
            raise InvalidInputError("the video has neither a file nor frames")
        return video_to_pixel_values(clip, self.config)

    def from_v2(self, name: str, array: np.ndarray, parameters: Mapping[str, object]) -> list[torch.Tensor]:
        if name == "pixel_values":
            size = self.config.image_size
            return [checked_input(v2_floats(name, array), "pixel tiles", (None, self.config.num_channels, size, size))]
        if name not in _V2_KINDS:
            raise InvalidInputError(f"unknown input {name!r}: this model takes {sorted(_V2_KINDS)} (BYTES or UINT8) "
                                    f"or 'pixel_values' (FP32)")
        files = v2_bytes(name, array)
        if name == "image":
            return prepare_all(name, files, lambda data: preprocess_image(data, self.config))
        return prepare_all(name, files, lambda data: self._video(Video(file=data)))

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        device, dtype = self.placement
        with torch.inference_mode():
            tokens = self.tower(torch.cat(list(inputs)).to(device=device, dtype=dtype))
        return [t.flatten(0, 1) for t in tokens.split([x.shape[0] for x in inputs])]
