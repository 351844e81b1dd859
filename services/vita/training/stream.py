"""The row stream: samples in a seeded order per epoch, encoded, packed, with a cursor a checkpoint can store.

Every rank runs the same stream (same seed, same order, same rows) and trains on its own share of each step's
rows, so the global batch, and the number of target tokens the loss is divided by, are known on every rank
without communication. The cursor `(epoch, index)` is where the next row starts in the epoch's order: a stream
rebuilt at that cursor yields exactly the rows the interrupted one would have, which is what exact resume needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vita.errors import InvalidInputError
from vita.training.data import DataError
from vita.training.examples import Example, TooLong
from vita.training.packing import Row, pack
from vita.training.sample import Sample

log = logging.getLogger("vita.training")

Encode = Callable[[Sample, int, int], Example]  # (sample, epoch, index in the epoch's order) -> Example


@dataclass
class Cursor:
    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The sample order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class RowStream:
    """Endless packed rows over `samples`; `take(n)` returns the next n, `cursor` says where the next one starts."""

    def __init__(self, samples: Sequence[Sample], encode: Encode, *, packing_length: int, pack_rows: bool = True,
                 share_prefix: bool = False, shuffle: bool = True, seed: int = 0, cursor: Cursor | None = None) -> None:
        if not samples:
            raise InvalidInputError("the training data is empty")
        self.samples = samples
        self.encode = encode
        self.packing_length = packing_length
        self.pack_rows = pack_rows
        self.share_prefix = share_prefix
        self.shuffle = shuffle
        self.seed = seed
        start = cursor or Cursor()
        self._too_long: set[int] = set()  # samples skipped as too long (a diagnostic; not part of the cursor)
        self._rows = self._generate(start.epoch, start.index)
        self._next: tuple[int, Row] = next(self._rows)

    @property
    def skipped(self) -> int:
        """Distinct samples this process skipped as too long (each is logged once, with where it came from)."""
        return len(self._too_long)

    @property
    def cursor(self) -> Cursor:
        epoch, row = self._next
        return Cursor(epoch, row.start)

    def take(self, n: int) -> list[Row]:
        rows = []
        for _ in range(n):
            rows.append(self._next[1])
            self._next = next(self._rows)
        return rows

    def _generate(self, epoch: int, start: int) -> Iterator[tuple[int, Row]]:
        while True:
            produced = False
            for row in pack(self._examples(epoch, start), self.packing_length, enabled=self.pack_rows,
                            share_prefix=self.share_prefix):
                produced = True
                yield epoch, row
            if not produced and start == 0:
                raise InvalidInputError(f"every one of the {len(self.samples)} samples is too long for the stage's "
                                        "max_length: nothing to train on")
            epoch, start = epoch + 1, 0

    def _examples(self, epoch: int, start: int) -> Iterator[Example]:
        order = epoch_order(len(self.samples), self.seed, epoch, self.shuffle)
        for index in range(start, len(order)):
            k = int(order[index])
            try:
                example = self.encode(self.samples[k], epoch, index)
            except TooLong as e:
                if k not in self._too_long:
                    self._too_long.add(k)
                    log.warning("sample skipped: too long", extra={"sample": self._where(k), "reason": str(e)})
                continue
            except (InvalidInputError, DataError) as e:  # media found bad only when read: name the sample
                raise type(e)(f"{self._where(k)}: {e}") from None
            yield example

    def _where(self, k: int) -> str:
        """Where sample k came from: its manifest's `file:line`, else its place in the list."""
        return self.samples[k].origin or f"training sample {k + 1} of {len(self.samples)} (in manifest order)"
