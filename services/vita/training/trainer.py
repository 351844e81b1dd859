"""The training loop of every stage: freeze, AdamW with warmup and cosine decay, clip, accumulate, checkpoint.

One optimizer step takes `micro_batch_size * grad_accum * world_size` packed rows from the row stream. Each rank
trains on its contiguous share; every rank knows the step's target count N, so each micro-batch's summed
cross-entropy is scaled by world_size / N and DDP's gradient average gives exactly the gradient of the global
mean loss: 1 process with grad_accum 2 and 2 processes with grad_accum 1 compute the same step.

Exact resume: a checkpoint stores the weights (fp32 safetensors), the optimizer and scheduler states, each rank's
RNG states and the stream cursor; the run continues with the same rows, learning rates and updates, so its loss
curve is the one an uninterrupted run draws (`tests/integration/test_trainer.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from vita.model.fingerprint import MANIFEST
from vita.model.inputs import SlotIds
from vita.model.llm import DecoderLayer
from vita.model.vita import VitaForCausalLM
from vita.processing.tokenizer import VitaTokenizer
from vita.training import distributed as D
from vita.training.checkpoints import Checkpoints, rng_state, save_model_dir, set_rng_state, truncate_metrics
from vita.training.config import PARAMETER_GROUPS, ConfigError, OptimConfig, StageConfig
from vita.training.examples import Example, ExampleEncoder
from vita.training.forward import TrainingModel, batch_loss_sum
from vita.training.inputs import ON_INPUT_CHANGE, changed_inputs, clear_run, record_inputs, stage_inputs
from vita.training.metrics import MetricsLog
from vita.training.model_init import describe, initial_model
from vita.training.packing import collate
from vita.training.sample import Sample
from vita.training.stream import Cursor, RowStream

if TYPE_CHECKING:
    from vita.training.tts import TTS

log = logging.getLogger("vita.training")


def freeze(model: nn.Module, groups: Sequence[str]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """requires_grad on exactly the parameters of `groups` (PARAMETER_GROUPS prefixes); returns them by group."""
    selected: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in groups}
    for name, p in model.named_parameters():
        group = next((g for g in groups if name.startswith(PARAMETER_GROUPS[g])), None)
        p.requires_grad_(group is not None)
        if group is not None:
            selected[group].append((name, p))
    empty = [g for g, params in selected.items() if not params]
    if empty:
        raise ConfigError(f"trainable group(s) {empty} have no parameters in this model (a text-only model has no "
                          "towers: give init.preset to add them)")
    return selected


def build_optimizer(groups: dict[str, list[tuple[str, nn.Parameter]]], optim: OptimConfig, *,
                    fused: bool = False) -> torch.optim.AdamW:
    """AdamW with one parameter group per (group, decay): matrices decay, biases and norms do not (nanoGPT).

    `fused`: torch's one-kernel-per-group AdamW (nanoGPT's choice where available): 5.3-6.6 ms instead of 13.5 ms
    per step for 8.6 M parameters on a 2-core CPU (BENCHMARKS.md, "the trainer's LM head and AdamW"). Not under
    FSDP, whose sharded resume it broke (BENCHMARKS.md, "MoE experts in CPU training")."""
    param_groups = []
    for group, named in groups.items():
        lr = optim.group_lr.get(group, optim.lr)
        decay = [p for n, p in named if p.ndim >= 2]
        no_decay = [p for n, p in named if p.ndim < 2]
        for params, wd, suffix in ((decay, optim.weight_decay, ""), (no_decay, 0.0, ".no_decay")):
            if params:
                param_groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": group + suffix})
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused or None)


def lr_factor(step: int, *, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `max_steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + 0.5 * (1 + math.cos(math.pi * progress)) * (1 - min_ratio)


class Trainer:
    """Runs one stage. `samples` come from the stage's manifests (`vita train`) or from the caller."""

    def __init__(self, config: StageConfig, samples: Sequence[Sample], *, resume: bool = False,
                 on_input_change: str = "error", tts: TTS | None = None, stop_after: int | None = None) -> None:
        if on_input_change not in ON_INPUT_CHANGE:
            raise ValueError(f"on_input_change must be one of {ON_INPUT_CHANGE}, got {on_input_change!r}")
        self.config = config
        self.samples = samples
        self.resume = resume
        self.on_input_change = on_input_change
        self.tts = tts
        self.stop_after = stop_after  # end the process's run after this step (tests; a resume continues)
        self.output_dir = Path(config.output_dir)

    # --- setup ---------------------------------------------------------------------------------------------

    def _load(self, info: D.DistInfo) -> tuple[VitaForCausalLM, VitaTokenizer, dict | None, Path | None, dict]:
        if (self.output_dir / MANIFEST).is_file():
            raise ConfigError(f"{self.output_dir} holds a model repository (`vita export` wrote its {MANIFEST}); a "
                              "run would write its checkpoints into it: choose another output_dir")
        checkpoints = Checkpoints(self.output_dir, self.config.keep_checkpoints)
        latest = checkpoints.latest()
        if latest is not None and not self.resume:
            raise ConfigError(f"{self.output_dir} already holds checkpoints ({latest.name}): pass --resume to "
                              "continue that run, or choose another output_dir")
        inputs = stage_inputs(self.config, self.samples)  # on every rank: each decides alike
        if latest is not None and (changed := changed_inputs(self.output_dir, inputs)):
            if self.on_input_change == "error":
                raise ConfigError(
                    f"{self.output_dir} holds a run of other inputs than this one's ({_names(changed)} changed), "
                    "which --resume would go on with: pass --on-input-change restart to train the stage again "
                    "from its init, or choose another output_dir")
            D.barrier(info)  # every rank has read the record before it goes
            if info.is_main:
                log.warning("the stage's inputs changed since its run started: training it again from its init",
                            extra={"output_dir": str(self.output_dir), "changed": changed})
                clear_run(self.output_dir)
            D.barrier(info)
            latest = None
        if latest is not None:
            model = VitaForCausalLM.from_pretrained(latest / "model")
            tokenizer = VitaTokenizer.from_file(latest / "model")
            return model, tokenizer, Checkpoints.load_trainer_state(latest), latest, {}
        if self.resume and info.is_main:
            log.info("no checkpoint to resume: starting the stage", extra={"output_dir": str(self.output_dir)})
        if info.is_main:
            record_inputs(self.output_dir, inputs)
        work = self.output_dir / f".init-rank{info.rank}"
        init = initial_model(self.config, self.samples, work)
        shutil.rmtree(work, ignore_errors=True)
        return init.model, init.tokenizer, None, None, init.notes

    def _encode_fn(self, tokenizer: VitaTokenizer, model: VitaForCausalLM):
        encoder = ExampleEncoder(tokenizer, model.vita_config, state_tokens=self.config.state_tokens,
                                 max_length=self.config.data.max_length)
        spoken = self.config.spoken
        if self.config.stage != 3 or not (spoken.p_spoken or spoken.p_negative):
            return lambda sample, epoch, index: encoder(sample, index)
        from vita.training.stage3 import SpokenTransform, default_tts

        cache = Path(self.config.data.media_cache or self.output_dir / "media")
        transform = SpokenTransform(spoken, self.tts or default_tts(), cache, seed=self.config.data.seed)

        def encode(sample: Sample, epoch: int, index: int) -> Example:
            return encoder(transform(sample, epoch, index), index)

        return encode

    # --- the loop ------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        config = self.config
        info = D.init_distributed()
        if config.threads:
            torch.set_num_threads(config.threads)
        model, tokenizer, state, checkpoint, notes = self._load(info)
        model.to(info.device)
        freeze(model, config.trainable)
        slots = SlotIds(tokenizer.image_id, tokenizer.video_id, tokenizer.audio_id)
        module = D.wrap(TrainingModel(model, slots), info, fsdp=config.fsdp, layer_types=(DecoderLayer,))
        groups = freeze(model, config.trainable)  # again: FSDP replaces the parameter objects it shards
        named = {name: p for params in groups.values() for name, p in params}
        optimizer = build_optimizer(groups, config.optim,
                                    fused=not config.fsdp and info.device.type in ("cpu", "cuda"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
            lr_factor, warmup=config.optim.warmup_steps, max_steps=config.max_steps,
            min_ratio=config.optim.min_lr_ratio))
        step, cursor = 0, Cursor()
        metrics_path = self.output_dir / "metrics.jsonl"
        if state is not None:
            configured = list(scheduler.base_lrs)  # this config's peak rates; loading brings back the stored ones
            D.load_optimizer_state(optimizer, named, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, cursor = state["step"], Cursor(**state["data"])
            _follow_schedule(optimizer, scheduler, configured, step)
            rng = Checkpoints.load_rng(checkpoint, info.rank)
            if rng is not None:
                set_rng_state(rng)
            if info.is_main:
                truncate_metrics(metrics_path, step)
                changed = sorted(k for k, v in config.to_dict().items() if state["config"].get(k) != v)
                log.info("resumed", extra={"checkpoint": str(checkpoint), "step": step, "changed_config": changed})
        else:
            torch.manual_seed(config.data.seed + info.rank)
            if info.is_main and metrics_path.exists():
                metrics_path.unlink()
        record = self.output_dir / "final" / "training.json"
        if state is not None and step > config.max_steps and not record.is_file():
            raise ConfigError(f"{checkpoint} is at step {step}, past this config's max_steps {config.max_steps}: "
                              f"resume with --set max_steps=N (N >= {step}), or use another output_dir")
        if state is not None and step >= config.max_steps and record.is_file():
            # Resumed after the stage finished (a job's retry, a second `--resume`): nothing to train, and the
            # record of the run that did the training stays as it is.
            if info.is_main:
                log.info("stage already finished", extra={"path": str(record.parent), "steps": step})
            D.barrier(info)
            return {k: v for k, v in json.loads(record.read_text()).items() if k != "config"}
        if config.precision == "bf16" and info.device.type == "cpu" and info.is_main:
            log.warning("bf16 autocast on CPU is slow; it is meant for GPUs")

        stream = RowStream(self.samples, self._encode_fn(tokenizer, model),
                           packing_length=config.data.packing_length, pack_rows=config.data.pack,
                           share_prefix=config.data.share_prefix, shuffle=config.data.shuffle,
                           seed=config.data.seed, cursor=cursor)
        metrics = MetricsLog(self.output_dir, tensorboard=config.tensorboard) if info.is_main else None
        trainable = list(named.values())
        per_rank = config.data.micro_batch_size * config.data.grad_accum
        autocast = (partial(torch.autocast, info.device.type, dtype=torch.bfloat16)
                    if config.precision == "bf16" else contextlib.nullcontext)
        bar = tqdm(total=config.max_steps, initial=step, desc=f"stage {config.stage} {config.name}".strip(),
                   disable=not (info.is_main and config.progress), dynamic_ncols=True)
        start = time.perf_counter()
        losses: list[float] = []
        module.train()
        try:
            while step < config.max_steps:
                t0 = time.perf_counter()
                rows = stream.take(per_rank * info.world_size)
                n_targets = max(1, sum(e.num_targets for r in rows for e in r.examples))
                mine = rows[info.rank * per_rank : (info.rank + 1) * per_rank]
                loss_sum = 0.0
                for k in range(config.data.grad_accum):
                    micro = mine[k * config.data.micro_batch_size : (k + 1) * config.data.micro_batch_size]
                    batch = collate(micro, tokenizer.eos_id).to(info.device)
                    last = k == config.data.grad_accum - 1
                    with D.gradient_sync(module, last):
                        with autocast():
                            summed = batch_loss_sum(module, batch)
                        (summed * (info.world_size / n_targets)).backward()
                    loss_sum += summed.item()
                grad_norm = self._clip(module, trainable)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                total, tokens = D.all_reduce_sum([loss_sum, float(sum(len(r) for r in mine))], info)
                loss = total / n_targets
                losses.append(loss)
                if metrics is not None and (step % config.log_every == 0 or step == config.max_steps):
                    elapsed = time.perf_counter() - t0
                    metrics.write({
                        "step": step, "loss": loss, "lr": lr,
                        "grad_norm": grad_norm, "targets": n_targets, "tokens": int(tokens), "rows": len(rows),
                        "samples": sum(len(r.examples) for r in rows), "epoch": stream.cursor.epoch,
                        "skipped": stream.skipped, "step_s": round(elapsed, 4),
                        "tokens_per_s": round(tokens / elapsed, 1),
                    })
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if step % config.save_every == 0 or step == config.max_steps:
                    self._save(step, module, optimizer, named, scheduler, stream.cursor, model, tokenizer, info)
                if self.stop_after is not None and step >= self.stop_after:
                    break
        except KeyboardInterrupt:
            if info.is_main:
                last = Checkpoints(self.output_dir, config.keep_checkpoints).latest()
                log.warning("interrupted at step %d: %s", step,
                            f"`--resume` goes on from {last}" if last else "no checkpoint yet, a rerun starts over",
                            extra={"step": step, "checkpoint": str(last) if last else None})
            raise
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        summary = {
            "stage": config.stage, "name": config.name, "steps": step, "max_steps": config.max_steps,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "wall_s": round(time.perf_counter() - start, 2), "world_size": info.world_size,
            "skipped_too_long": stream.skipped, **({"init": notes} if notes else {}), **describe(model),
        }
        if step >= config.max_steps:
            self._finish(module, model, tokenizer, summary, info)
        D.barrier(info)
        return summary

    def _clip(self, module: nn.Module, trainable: list[nn.Parameter]) -> float:
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)  # under FSDP2 a DTensor: the norm of all shards
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # --- checkpoints ---------------------------------------------------------------------------------------

    def _save(self, step: int, module: nn.Module, optimizer, named: dict[str, nn.Parameter], scheduler,
              cursor: Cursor, model: VitaForCausalLM, tokenizer: VitaTokenizer, info: D.DistInfo) -> None:
        checkpoints = Checkpoints(self.output_dir, self.config.keep_checkpoints)
        weights = D.model_state(module)  # collective under FSDP
        optim = D.optimizer_state(optimizer, named)  # collective under FSDP (full_tensor)
        staging = checkpoints.staging(step) if info.is_main else checkpoints.root / f".step-{step:06d}.tmp"
        D.barrier(info)
        if info.is_main:
            save_model_dir(staging / "model", _unprefixed(weights), model.vita_config, tokenizer)
            torch.save({"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(),
                        "data": cursor.to_dict(), "config": self.config.to_dict()}, staging / "trainer.pt")
        torch.save(rng_state(), staging / f"rng-rank{info.rank}.pt")
        D.barrier(info)
        if info.is_main:
            path = checkpoints.commit(staging, step)
            log.info("checkpoint saved", extra={"step": step, "path": str(path)})
        D.barrier(info)

    def _finish(self, module: nn.Module, model: VitaForCausalLM, tokenizer: VitaTokenizer, summary: dict,
                info: D.DistInfo) -> None:
        """`<output_dir>/final/`: the stage's model directory (the next stage's init.model, `vita export`'s input)."""
        weights = D.model_state(module)
        if not info.is_main:
            return
        final = self.output_dir / "final"
        staging = self.output_dir / ".final.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        save_model_dir(staging, _unprefixed(weights), model.vita_config, tokenizer)
        record = {**summary, "config": self.config.to_dict()}
        staging.joinpath("training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        log.info("stage finished", extra={"path": str(final), "final_loss": summary["final_loss"]})


def _follow_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                     peaks: list[float], step: int) -> None:
    """Each group's learning rate at `step` on this config's schedule (`peaks`: its groups' peak rates): a resume
    that changed `max_steps` or a rate (`--set max_steps=...`) goes on from where the new schedule is at that step,
    not from the rate the stored scheduler last set; unchanged settings give the stored rates exactly."""
    scheduler.base_lrs = list(peaks)
    for group, peak, fn in zip(optimizer.param_groups, peaks, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = peak
        group["lr"] = peak * fn(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TrainingModel's `vita.` prefix off: VitaForCausalLM names."""
    return {k.removeprefix("vita."): v for k, v in state.items()}


def run_stage(config: StageConfig, samples: Sequence[Sample], *, resume: bool = False,
              on_input_change: str = "error", tts: TTS | None = None, stop_after: int | None = None
              ) -> dict[str, Any]:
    """Trains one stage; returns its summary. `on_input_change`: what a resume does when the stage's inputs differ
    from those its run started with (`vita.training.inputs`): "error" (ConfigError) or "restart" (the stage's
    checkpoints go, it trains from its init). Errors a user can fix are VitaErrors (ConfigError, ...)."""
    return Trainer(config, samples, resume=resume, on_input_change=on_input_change, tts=tts,
                   stop_after=stop_after).run()


def _names(changed: list[str], most: int = 6) -> str:
    return ", ".join(changed[:most]) + (f" and {len(changed) - most} more" if len(changed) > most else "")
