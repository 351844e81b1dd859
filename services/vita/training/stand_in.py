"""What the tiny runs' stand-in encoder pretrainings share (`vision_pretrain`, `audio_pretrain`): reuse of an output
directory that holds the same settings, and the training loop (AdamW, one-cycle schedule, clipping, metrics log)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vita.training.metrics import MetricsLog

log = logging.getLogger("vita.training")


def reused_summary(out: Path, key: dict[str, Any], what: str) -> dict[str, Any] | None:
    """The summary saved in `out/config.json` when its settings key is `key` (the encoder is reused), else None."""
    info_path = out / "config.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    if info.get("pretraining", {}).get("key") != key:
        return None
    log.info("%s in %s is this config's: reused", what, out)
    return info["pretraining"]


def one_cycle_lr(step: int, peak: float, steps: int) -> float:
    """Linear warmup over the first 10% of `steps` to `peak`, then cosine down to 0; `step` counts from 1."""
    warmup = max(1, steps // 10)
    if step <= warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_loop(params: Sequence[nn.Parameter], batch_loss: Callable[[int], Tensor], *, steps: int, lr: float,
               weight_decay: float, out: Path, log_every: int, desc: str, progress: bool, start: float,
               decay_overrides: Sequence[tuple[Sequence[nn.Parameter], float]] = ()) -> None:
    """`steps` AdamW steps on `batch_loss(step)` (which draws its own batch), gradients clipped to norm 1; the mean
    loss every `log_every` steps goes to `out/metrics.jsonl` (replaced) with the seconds since `start`.
    `decay_overrides` gives some of `params` a weight decay of their own: (parameters, decay) pairs."""
    special = {id(p) for group, _ in decay_overrides for p in group}
    groups = [{"params": [p for p in params if id(p) not in special], "weight_decay": weight_decay},
              *({"params": list(group), "weight_decay": decay} for group, decay in decay_overrides)]
    opt = torch.optim.AdamW(groups, lr=lr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    metrics = MetricsLog(out)
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, dynamic_ncols=True)
    running = 0.0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = one_cycle_lr(step, lr, steps)
        loss = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running += loss.item()
        if step % log_every == 0 or step == steps:
            mean = running / (log_every if step % log_every == 0 else step % log_every)
            metrics.write({"step": step, "loss": round(mean, 4), "lr": one_cycle_lr(step, lr, steps),
                           "elapsed_s": round(time.perf_counter() - start, 1)})
            bar.set_postfix(loss=f"{mean:.3f}")
            running = 0.0
    metrics.close()
