"""The learning proof's arms: stages 2 and 3 from a finished `make train-tiny` on several data seeds, then the eval.

One arm is what `make train-tiny` runs after its stand-ins and stage 1 (stage 2 vision, stage 2 audio, stage 3,
export, `vita eval curriculum`), on data seed S (`--set data.seed=S`: the order the stages draw their samples in),
with a vision stand-in of your choice and any stage-3 overrides. Each arm's results depend on the stand-in's and
the stages' thread counts and on the machine kind, not on what runs beside it (deterministic), so arms compare
side by side in one table: BENCHMARKS.md's learning-proof tables are made this way. Every change to the recipe has
been judged on three data seeds at least, and a change to a stand-in on a second stand-in too (another `--seed` or
thread count of `vita pretrain-vision`): one stand-in's luck moved image by 0.04 and video by 0.11 on average
(docs/training.md, "The lead on a second stand-in").

    make train-tiny    # the stand-ins, stage 1, the curriculum and stage 3's spoken media, reused by every arm
    python benchmarks/learning_arms.py --output /tmp/arms --vision-encoder DIR --data-seeds 0 1 2 \\
        --stage3 max_steps=2400

An arm whose `eval.json` exists is not run again (an interrupted run resumes). Prints one row per data seed and
the mean (image, video and spoken accuracy, query acceptance, non-query rejection; `vita eval`'s names) and writes
them to OUTPUT/summary.json. Exit status: 0 done, 1 a stage failed (its log named), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vita.usage import int_in

COLUMNS = ("image_qa", "video_qa", "spoken_qa", "query_acceptance", "nonquery_rejection")
CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"


class ArmFailed(Exception):
    """A stage's process exited non-zero; the message names its log."""


def arm_commands(train_dir: Path, out: Path, seed: int, vision_encoder: Path, audio_encoder: Path, threads: int,
                 stage3: list[str]) -> list[tuple[str, list[str]]]:
    """The (name, vita CLI arguments) of one arm, in order: what `make train-tiny` runs after stage 1."""
    common = ["--set", f"data.seed={seed}", "--set", "progress=false", "--set", f"threads={threads}"]
    return [
        ("stage 2 vision", ["train", "--stage", "2", "--config", str(CONFIGS / "stage2_vision_tiny.yaml"), *common,
                            "--set", f"init.model={train_dir / 'stage1' / 'final'}",
                            "--set", f"init.vision_encoder={vision_encoder}", "--set", f"output_dir={out / 's2v'}"]),
        ("stage 2 audio", ["train", "--stage", "2", "--config", str(CONFIGS / "stage2_audio_tiny.yaml"), *common,
                           "--set", f"init.model={out / 's2v' / 'final'}",
                           "--set", f"init.audio_encoder={audio_encoder}", "--set", f"output_dir={out / 's2a'}"]),
        ("stage 3", ["train", "--stage", "3", "--config", str(CONFIGS / "stage3_multimodal_tiny.yaml"), *common,
                     "--set", f"init.model={out / 's2a' / 'final'}", "--set", f"output_dir={out / 's3'}",
                     "--set", f"data.media_cache={train_dir / 'stage3' / 'media'}",
                     *(a for kv in stage3 for a in ("--set", kv))]),
        ("export", ["export", "--checkpoint", str(out / "s3"), "--output", str(out / "model"), "--overwrite"]),
        ("eval", ["eval", "curriculum", "--model", str(out / "model"), "--data", str(train_dir / "curriculum"),
                  "--threads", str(threads), "--output", str(out / "eval.json")]),
    ]


def run_arm(commands: list[tuple[str, list[str]]], out: Path, env: dict[str, str]) -> None:
    """Runs the commands one after another, their output to `out/log`.
    Raises `ArmFailed` naming the log when one exits non-zero."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log"
    with log.open("a") as f:
        for name, args in commands:
            start = time.perf_counter()
            f.write(f"== {name}: vita {' '.join(args)}\n")
            f.flush()
            if subprocess.run([sys.executable, "-m", "vita.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env).returncode:
                raise ArmFailed(f"{out.name}: {name} failed, see {log}")
            print(f"  {out.name}: {name} {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def table(rows: dict[int, dict[str, float]]) -> str:
    """A Markdown table: one row per data seed and their mean."""
    lines = ["| data seed | " + " | ".join(COLUMNS) + " |", "|---:|" + "---:|" * len(COLUMNS)]
    lines += [f"| {seed} | " + " | ".join(f"{m[c]:.3f}" for c in COLUMNS) + " |" for seed, m in rows.items()]
    mean = {c: sum(m[c] for m in rows.values()) / len(rows) for c in COLUMNS}
    return "\n".join([*lines, "| mean | " + " | ".join(f"{mean[c]:.3f}" for c in COLUMNS) + " |"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="directory for the arms (OUTPUT/seed-S/...)")
    parser.add_argument("--train-dir", type=Path, default=Path(".artifacts/train-tiny"),
                        help="a finished `make train-tiny` (default: %(default)s)")
    parser.add_argument("--vision-encoder", type=Path, default=None,
                        help="the vision stand-in stage 2 loads (default: TRAIN_DIR/vision-encoder)")
    parser.add_argument("--audio-encoder", type=Path, default=None,
                        help="the audio stand-in stage 2 loads (default: TRAIN_DIR/audio-encoder)")
    parser.add_argument("--data-seeds", type=int_in(0, 2**31 - 1), nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    parser.add_argument("--threads", type=int_in(1, 1024), default=2, help="torch CPU threads of every stage and the eval "
                        "(default: %(default)s, `make train-tiny`'s)")
    parser.add_argument("--stage3", nargs="+", default=[], metavar="KEY=VALUE",
                        help="stage 3 config overrides, as `vita train --set` takes them (e.g. max_steps=2400)")
    args = parser.parse_args(argv)
    train = args.train_dir.resolve()
    vision = (args.vision_encoder or train / "vision-encoder").resolve()
    audio = (args.audio_encoder or train / "audio-encoder").resolve()
    needed = [train / "stage1" / "final", train / "curriculum", train / "stage3" / "media", vision, audio]
    if missing := [str(p) for p in needed if not p.exists()]:
        print(f"learning_arms: error: {', '.join(missing)} not found: run `make train-tiny` first "
              "(or name the stand-ins)", file=sys.stderr)
        return 2
    if bad := [kv for kv in args.stage3 if "=" not in kv]:
        print(f"learning_arms: error: --stage3 takes KEY=VALUE, got {bad[0]!r}", file=sys.stderr)
        return 2
    env = {**os.environ, "VITA_TRAIN_DIR": str(train), "VITA_CURRICULUM": str(train / "curriculum")}
    rows: dict[int, dict[str, float]] = {}
    try:
        for seed in args.data_seeds:
            out = args.output.resolve() / f"seed-{seed}"
            if not (out / "eval.json").exists():  # a finished arm is read back, not run again
                run_arm(arm_commands(train, out, seed, vision, audio, args.threads, args.stage3), out, env)
            rows[seed] = json.loads((out / "eval.json").read_text())["metrics"]
    except ArmFailed as e:
        print(f"learning_arms: error: {e}", file=sys.stderr)
        return 1
    summary = {"vision_encoder": str(vision), "audio_encoder": str(audio), "threads": args.threads,
               "stage3": args.stage3, "metrics": {str(s): {c: m[c] for c in COLUMNS} for s, m in rows.items()}}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
