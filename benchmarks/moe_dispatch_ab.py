"""Side by side: stage-3 training steps (forward + backward) with the MoE layer's grouped and sorted dispatch.

The same packed rows of the tiny curriculum's stage-3 stream go through both paths, alternating grouped/sorted
`--repeats` times, for each model given: a stage-3 output (routing as it is late in stage 3) and a stage-2 one
(routing as stage 3 starts). `grouped` pads every expert's batch to the busiest expert's; `sorted` multiplies
each expert's tokens only (`MoEFeedForward.sorted`, which training takes). Prints seconds per path and the ratio.

    VITA_CURRICULUM=.artifacts/train-tiny/curriculum python benchmarks/moe_dispatch_ab.py \\
        .artifacts/train-tiny/stage3/final .artifacts/train-tiny/stage2_audio/final
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from vita.model import llm
from vita.model.inputs import SlotIds
from vita.model.vita import VitaForCausalLM
from vita.processing.tokenizer import VitaTokenizer
from vita.training.config import PARAMETER_GROUPS, load_stage_config
from vita.training.forward import TrainingModel, batch_loss_sum
from vita.training.packing import collate
from vita.training.stream import RowStream
from vita.training.train import load_samples
from vita.training.trainer import Trainer


def compare(model_dir: str, config_path: str, rows: int, repeats: int) -> dict:
    config = load_stage_config(config_path)
    config.data.media_cache = tempfile.mkdtemp()  # stage 3's speech, made once here
    samples = load_samples(config)
    model = VitaForCausalLM.from_pretrained(model_dir)
    tok = VitaTokenizer.from_file(model_dir)
    trained = tuple(p for group in config.trainable for p in PARAMETER_GROUPS[group])
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trained))
    encode = Trainer(config, samples)._encode_fn(tok, model)
    stream = RowStream(samples, encode, packing_length=config.data.packing_length, share_prefix=True, seed=7)
    batches = [collate([row], tok.eos_id) for row in stream.take(rows)]
    module = TrainingModel(model, SlotIds(tok.image_id, tok.video_id, tok.audio_id))
    sorted_path = llm.MoEFeedForward.sorted
    seconds = {"grouped": 0.0, "sorted": 0.0}
    try:
        for _ in range(repeats):
            for path in seconds:
                llm.MoEFeedForward.sorted = sorted_path if path == "sorted" else llm.MoEFeedForward.grouped
                start = time.perf_counter()
                for batch in batches:
                    module.zero_grad(set_to_none=True)
                    batch_loss_sum(module, batch).backward()
                seconds[path] += time.perf_counter() - start
    finally:
        llm.MoEFeedForward.sorted = sorted_path
    return {"model": model_dir, "rows": rows, "repeats": repeats,
            "tokens": sum(b.input_ids.numel() for b in batches) * repeats,
            **{f"{k}_s": round(v, 1) for k, v in seconds.items()},
            "sorted_speedup": round(seconds["grouped"] / seconds["sorted"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model directories (a stage's final/)")
    parser.add_argument("--config", default="training/configs/stage3_multimodal_tiny.yaml",
                        help="the stage config whose data and trainable groups are used (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=60, help="packed rows per pass (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating passes per path (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        for model_dir in args.models:
            print(json.dumps(compare(model_dir, args.config, args.rows, args.repeats)), flush=True)
    except Exception as e:  # a one-line error for a wrong path or a broken checkpoint
        print(f"moe_dispatch_ab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
