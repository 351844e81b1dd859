"""What a training checkpoint has learnt, fast: teacher-forced answers on the curriculum's held-out split
(or, `--split train`, on what it was fitted on: learnt at all, or learnt but not generalised).

For each held-out question the model reads the whole reference conversation at once (one forward, no generation)
and a question counts as right when every answer token after the state token is the argmax given the reference's
previous tokens: greedy exact match for answers that end with `</s>`, in seconds instead of minutes. Reported per
category and task, with the state token's accuracy and the mean norm of the image/video/audio embeddings the
connectors produce next to the token embeddings' (a connector whose outputs grew far past the text's is one the
LLM stopped reading: docs/training.md, "Why the model ignored its inputs"). `vita eval curriculum` stays the
learning proof's measure; this is the probe used while tuning a recipe.

    python benchmarks/learning_probe.py --model RUN/checkpoints/step-000100/model \
        --data .artifacts/train-tiny/curriculum --categories image,video --limit 120
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

from vita.model.inputs import SlotIds
from vita.model.vita import VitaForCausalLM
from vita.processing.tokenizer import VitaTokenizer
from vita.training.data import read_manifest
from vita.training.examples import IGNORE, ExampleEncoder
from vita.training.forward import TrainingModel
from vita.training.packing import Row, collate


@torch.no_grad()
def probe(model_dir: str | Path, data: str | Path, categories: list[str], limit: int, split: str = "heldout"
          ) -> dict:
    model = VitaForCausalLM.from_pretrained(model_dir).eval()
    tok = VitaTokenizer.from_file(model_dir)
    encoder = ExampleEncoder(tok, model.vita_config, state_tokens=True)
    wrapped = TrainingModel(model, SlotIds(tok.image_id, tok.video_id, tok.audio_id))
    media_ids = torch.tensor([tok.image_id, tok.video_id, tok.audio_id])
    report: dict = {"token_embedding_norm": round(float(model.get_input_embeddings().weight.norm(dim=-1).mean()), 2)}
    for category in categories:
        samples = read_manifest(Path(data) / split / f"{category}.jsonl")[:limit]
        right, state_right, by_task, norms = 0, 0, collections.defaultdict(lambda: [0, 0]), []
        for sample in samples:
            batch = collate([Row([encoder(sample)])], tok.eos_id)
            embeds = wrapped.embed(batch.input_ids, batch.image_pixels, batch.video_pixels, batch.audio)
            logits = model(inputs_embeds=embeds, positions=batch.positions, segment_ids=batch.segment_ids).logits[0]
            media = torch.isin(batch.input_ids[0], media_ids)
            if media.any():
                norms.append(float(embeds[0][media].norm(dim=-1).mean()))
            at = (batch.targets[0] != IGNORE).nonzero().squeeze(-1)
            hit = logits[at].argmax(-1) == batch.targets[0][at]
            answer = hit[1:] if sample.state is not None else hit
            ok = bool(answer.all())
            right += ok
            state_right += bool(hit[0]) if sample.state is not None else 0
            task = by_task[sample.meta.get("task", "?")]
            task[0] += ok
            task[1] += 1
        n = max(1, len(samples))
        report[category] = {"n": len(samples), "exact": round(right / n, 3), "state": round(state_right / n, 3),
                            "media_embedding_norm": round(sum(norms) / len(norms), 2) if norms else None,
                            "tasks": {t: f"{r}/{k}" for t, (r, k) in sorted(by_task.items())}}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory (a stage's final/ or a checkpoint's model/)")
    parser.add_argument("--data", required=True, help="a curriculum directory (with heldout/*.jsonl)")
    parser.add_argument("--categories", default="image,video,spoken,chatter,text",
                        help="held-out manifests to probe, comma-separated (default: %(default)s)")
    parser.add_argument("--split", default="heldout", choices=("heldout", "train"),
                        help="which split's manifests (train: what the model was fitted on; default: %(default)s)")
    parser.add_argument("--limit", type=int, default=60, help="first N questions of each manifest (default: 60)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        report = probe(args.model, args.data, args.categories.split(","), args.limit, args.split)
    except Exception as e:  # a one-line error for a wrong path or a broken checkpoint
        print(f"learning_probe: error: {e}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
