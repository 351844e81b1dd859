"""Packing: consecutive text and image samples share one row of up to `packing_length` tokens; video never packs.

Unlike the reference implementation, packed samples do not see each other: every sample keeps its own positions
(restarting at 0) and a segment id, and the LLM's attention only connects tokens of the same segment
(`MoECausalLM.forward(segment_ids=...)`, a block-diagonal causal mask). A packed row therefore gives every sample
the same logits as training it alone, and the loss (summed over targets, divided by the batch's target count) is
the same as one sample at a time: `tests/unit/test_packing.py` checks both loss and gradients.

With `share_prefix`, the samples of a row that start with the same context (every stage-3 sample starts with
the ~70 tokens of VITA's system prompt that all data types share) hold it once: the row starts with that prefix
(segment `SHARED_SEGMENT`, positions 0..P-1, seen by every sample of the row) and each sample continues at
position P with its own tokens. Every sample still sees exactly its own tokens at its own positions, so the loss
and gradients stay those of one sample at a time (the same test), while a row holds more samples.

Packing is greedy and sequential (a row takes samples in order until the next one does not fit), so a row is
determined by where it starts in the epoch's order: that is the data cursor a checkpoint stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vita.model.llm import SHARED_SEGMENT
from vita.training.examples import IGNORE, Example

PAD_SEGMENT = -1  # padding is a segment of its own, so no real token attends to it


@dataclass
class Row:
    """The samples of one packed row, in order; the first `shared` tokens of each are the same ids, held once."""

    examples: list[Example]
    shared: int = 0

    def __len__(self) -> int:
        return self.shared + sum(len(e) - self.shared for e in self.examples)

    @property
    def start(self) -> int:
        return self.examples[0].index


def pack(examples: Iterable[Example], packing_length: int, *, enabled: bool = True,
         share_prefix: bool = False) -> Iterator[Row]:
    """Rows of consecutive examples up to `packing_length` tokens; a video example (or any, when packing is off)
    is a row of its own. Examples longer than `packing_length` also train alone (they were checked against the
    stage's max length when encoded). With `share_prefix`, a row holds the longest context prefix (`shareable`
    ids) its samples have in common once (the module docstring)."""
    row = Row([])
    for example in examples:
        if not enabled or not example.packable:
            if row.examples:
                yield row
                row = Row([])
            yield Row([example])
            continue
        grown = _grown(row, example, share_prefix)
        if row.examples and len(grown) > packing_length:
            yield row
            grown = _grown(Row([]), example, share_prefix)
        row = grown
    if row.examples:
        yield row


def _grown(row: Row, example: Example, share_prefix: bool) -> Row:
    """`row` with `example` appended, its shared prefix cut to what the example has in common with it."""
    if not row.examples:
        return Row([example], example.shareable if share_prefix else 0)
    shared = 0
    if share_prefix:
        first = row.examples[0].input_ids
        limit = min(row.shared, example.shareable)
        while shared < limit and first[shared] == example.input_ids[shared]:
            shared += 1
    return Row([*row.examples, example], shared)


@dataclass
class Batch:
    """Rows padded to a common length; media of all rows concatenated in row-major order of their slots."""

    input_ids: Tensor  # (B, T) long
    targets: Tensor  # (B, T) long, IGNORE where nothing is predicted
    positions: Tensor  # (B, T) long, restarting at 0 for every sample (at P after a shared prefix of P tokens)
    segment_ids: Tensor  # (B, T) long, one id per sample in a row, SHARED_SEGMENT on a shared prefix,
    #                      PAD_SEGMENT on padding
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
        at = p = row.shared
        if p:  # the prefix is context in every sample (`Example.shareable`): its targets are IGNORE
            ids[b, :p] = torch.tensor(row.examples[0].input_ids[:p])
            positions[b, :p] = torch.arange(p)
            segments[b, :p] = SHARED_SEGMENT
        for s, example in enumerate(row.examples):
            n = len(example) - p
            ids[b, at : at + n] = torch.tensor(example.input_ids[p:])
            targets[b, at : at + n] = torch.tensor(example.targets[p:])
            positions[b, at : at + n] = torch.arange(p, p + n)
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
