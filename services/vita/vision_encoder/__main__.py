"""`vita serve vision-encoder`: one worker of the vision-encoder pool."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from vita.encoder_service import run_service
from vita.vision_encoder.encoder import VisionTowerEncoder


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(
        VisionTowerEncoder,
        "A vision-encoder worker: takes image and video jobs from its pool's Redis stream, encodes every job read "
        "together in one InternViT forward and writes each job's embeddings back to Redis.",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
