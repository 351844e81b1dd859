"""Training metrics: one JSON object per optimizer step in `<output_dir>/metrics.jsonl`, TensorBoard by a flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vita.training.config import ConfigError


class MetricsLog:
    """Appends step records (rank 0 only); numbers are also sent to TensorBoard when it is on."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = False) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard: true needs the tensorboard package (pip install tensorboard); "
                                  "the JSONL log (metrics.jsonl) needs nothing") from None
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
