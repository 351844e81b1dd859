"""Packing: consecutive text and image samples share one row of up to `packing_length` tokens; video never packs.

Unlike the reference implementation, packed samples do not see each other: every sample keeps its own positions
(restarting at 0) and a segment id, and the LLM's attention only connects tokens of the same segment
(`MoECausalLM.forward(segment_ids=...)`, a block-diagonal causal mask). A packed row therefore gives every sample
the same logits as training it alone, and the loss (summed over targets, divided by the batch's target count) is
the same as one sample at a time: `tests/unit/test_packing.py` checks both loss and gradients.

Packing is greedy and sequential (a row takes samples in order until the next one does not fit), so a row is
determined by where it starts in the epoch's order: that is the data cursor a checkpoint stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vita.training.examples import IGNORE, Example

PAD_SEGMENT = -1  # padding is a segment of its own, so no real token attends to it


@dataclass
class Row:
    """The samples of one packed row, in order."""

    examples: list[Example]

    def __len__(self) -> int:
        return sum(len(e) for e in self.examples)

    @property
    def start(self) -> int:
        return self.examples[0].index


def pack(examples: Iterable[Example], packing_length: int, *, enabled: bool = True) -> Iterator[Row]:
    """Rows of consecutive examples up to `packing_length` tokens; a video example (or any, when packing is off)
    is a row of its own. Examples longer than `packing_length` also train alone (they were checked against the
    stage's max length when encoded)."""
    row: list[Example] = []
    size = 0
    for example in examples:
        if not enabled or not example.packable:
            if row:
                yield Row(row)
                row, size = [], 0
            yield Row([example])
            continue
        if row and size + len(example) > packing_length:
            yield Row(row)
            row, size = [], 0
        row.append(example)
        size += len(example)
    if row:
        yield Row(row)


@dataclass
class Batch:
    """Rows padded to a common length; media of all rows concatenated in row-major order of their slots."""

    input_ids: Tensor  # (B, T) long
    targets: Tensor  # (B, T) long, IGNORE where nothing is predicted
    positions: Tensor  # (B, T) long, restarting at 0 for every sample
    segment_ids: Tensor  # (B, T) long, one id per sample in a row, PAD_SEGMENT on padding
    image_pixels: Tensor | None = None
    video_pixels: Tensor | None = None
    audio: list[Tensor] = field(default_factory=list)
    num_samples: int = 0

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        def move(x):
            return None if x is None else x.to(device, non_blocking=True)

        return Batch(move(self.input_ids), move(self.targets), move(self.positions), move(self.segment_ids),
                     move(self.image_pixels), move(self.video_pixels), [a.to(device) for a in self.audio],
                     self.num_samples)


def collate(rows: Sequence[Row], pad_id: int, *, multiple_of: int = 8) -> Batch:
    """Pads rows to the longest one (rounded up to `multiple_of`); padding predicts nothing and sees nothing."""
    width = max(len(r) for r in rows)
    width = -(-width // multiple_of) * multiple_of
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), PAD_SEGMENT, dtype=torch.long)
    images: list[Tensor] = []
    videos: list[Tensor] = []
    audio: list[Tensor] = []
    for b, row in enumerate(rows):
        at = 0
        for s, example in enumerate(row.examples):
            n = len(example)
            ids[b, at : at + n] = torch.tensor(example.input_ids)
            targets[b, at : at + n] = torch.tensor(example.targets)
            positions[b, at : at + n] = torch.arange(n)
            segments[b, at : at + n] = s
            at += n
            if example.image_pixels is not None:
                images.append(example.image_pixels)
            if example.video_pixels is not None:
                videos.append(example.video_pixels)
            audio.extend(example.audio)
        positions[b, at:] = torch.arange(width - at)
    return Batch(ids, targets, positions, segments, torch.cat(images) if images else None,
                 torch.cat(videos) if videos else None, audio, sum(len(r.examples) for r in rows))
