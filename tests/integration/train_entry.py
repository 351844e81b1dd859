"""One training stage of a micro model on `training_helpers.mixed_samples`, under torchrun or plain python.

    python tests/integration/train_entry.py WORKDIR '{"max_steps": 6, ...}' [--resume]

The JSON holds StageConfig fields; WORKDIR must already hold `init/` (a model) and `media/` (`prepare`), so that
several ranks never write the same files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import training_helpers as th
from vita.training.config import StageConfig, _build
from vita.training.trainer import run_stage


def prepare(work: Path) -> None:
    th.write_model(work / "init")
    th.mixed_samples(work / "media")


def main() -> None:
    work, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    fields = {"stage": 2, "init": {"model": str(work / "init")}, "output_dir": str(work / "run"),
              "progress": False, "threads": 1, **overrides}
    config = _build(StageConfig, fields, "", "train_entry")
    summary = run_stage(config, th.mixed_samples(work / "media"), resume="--resume" in sys.argv[3:])
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, default=str), flush=True)


if __name__ == "__main__":
    main()
