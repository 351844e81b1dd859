"""`vita serve audio-encoder`: one worker of the audio-encoder pool."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from vita.audio_encoder.encoder import AudioTowerEncoder
from vita.encoder_service import run_service


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(
        AudioTowerEncoder,
        "An audio-encoder worker: takes audio jobs from its pool's Redis stream, encodes every job read together "
        "in one audio-tower forward and writes each job's embeddings back to Redis.",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
