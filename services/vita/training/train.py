"""`vita train --stage N --config FILE [--resume [--on-input-change restart]] [--set key=value ...]`: one stage, in one
process or under torchrun.

    vita train --stage 1 --config training/configs/stage1_llm_tiny.yaml
    torchrun --standalone --nproc-per-node 2 -m vita.cli train --stage 1 --config ... --resume

The samples come from the config's JSONL manifests (`vita.training.data.read_manifest`); rank 0 prints the
stage summary as one JSON line on stdout. Bad configs and bad data end with a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

from vita.training.config import ConfigError, StageConfig, load_stage_config
from vita.training.inputs import ON_INPUT_CHANGE
from vita.training.sample import Sample


def load_samples(config: StageConfig) -> list[Sample]:
    """Every sample of the stage's manifests, in manifest order, each manifest `data.repeat` times (default 1)."""
    from vita.training.data import read_manifest

    if not config.data.manifests:
        raise ConfigError("data.manifests is empty: the stage has nothing to train on")
    samples: list[Sample] = []
    for manifest in config.data.manifests:
        samples += read_manifest(Path(manifest)) * config.data.repeat.get(Path(manifest).name, 1)
    if not samples:
        raise ConfigError(f"the stage's manifests hold no samples ({', '.join(map(str, config.data.manifests))}; "
                          "data.repeat of 0 counts as none)")
    return samples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", type=int, required=True, choices=(1, 2, 3), help="which stage the config is for")
    parser.add_argument("--config", required=True, help="stage config, YAML or JSON (training/configs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the config's output_dir (start if none)")
    parser.add_argument("--on-input-change", choices=ON_INPUT_CHANGE, default="error",
                        help="what --resume does when the stage's inputs (init weights, encoders, tokenizer, samples, "
                             "what trains) differ from those its run started with: error (exit 2, the default) or "
                             "restart (remove the run's checkpoints and train the stage from its init)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set max_steps=10 --set data.grad_accum=4")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the run as Ctrl-C does: the trainer says which checkpoint a `--resume` continues from, and the
    command exits with the interrupted status (130)."""
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> None:
    from vita.telemetry.logging import configure_logging
    from vita.training.distributed import shutdown
    from vita.training.trainer import run_stage

    config = load_stage_config(args.config, args.set)
    if config.stage != args.stage:
        raise ConfigError(f"{args.config} is a stage {config.stage} config, not stage {args.stage}")
    configure_logging("training", level=os.environ.get("VITA_LOG_LEVEL", "info"))
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a pod's eviction or torchrun's stop: as Ctrl-C
    try:
        summary = run_stage(config, load_samples(config), resume=args.resume, on_input_change=args.on_input_change)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=str), flush=True)
