"""The training forward: a batch of packed rows -> summed next-token cross-entropy, with gradients into the towers.

`VitaForCausalLM.embed_multimodal` serves inference (no gradients, one prompt); here every slot of every row is
filled in one pass per modality, and the towers stay in the graph so the stage can train them. A frozen tower's
parameters do not require gradients, so autograd keeps none of its activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vita.errors import InvalidInputError
from vita.model.inputs import SlotIds
from vita.model.vita import VitaForCausalLM
from vita.processing.audio import fbank
from vita.training.examples import IGNORE
from vita.training.packing import Batch


class TrainingModel(nn.Module):
    """Wraps the model so that DDP/FSDP see one forward: `loss_sum(batch)` = sum of the targets' cross-entropy."""

    def __init__(self, model: VitaForCausalLM, slots: SlotIds) -> None:
        super().__init__()
        self.vita = model
        self.slots = slots

    def forward(self, input_ids: Tensor, targets: Tensor, positions: Tensor, segment_ids: Tensor,
                image_pixels: Tensor | None = None, video_pixels: Tensor | None = None,
                audio: list[Tensor] | None = None) -> Tensor:
        embeds = self.embed(input_ids, image_pixels, video_pixels, audio or [])
        hidden = self.vita.hidden_states(inputs_embeds=embeds, positions=positions, segment_ids=segment_ids)
        # The LM head and the softmax only where a position has a target: the same sum as over every position with
        # the rest ignored. Answers are a few tokens after a long context (3% of the tiny stage 3's positions); at
        # full size a 6,144-token row's fp32 logits over 51,747 pieces would be 1.27 GB, nearly all of it unused.
        scored = targets != IGNORE  # (B, T)
        logits = self.vita.lm_head(hidden[scored])  # (N, vocab)
        loss = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
        idle = []
        if (image_pixels is None or not image_pixels.numel()) and (video_pixels is None or not video_pixels.numel()):
            idle.append(self.vita.vision_tower)
        if not audio:
            idle.append(self.vita.audio_tower)
        return loss + _zero_touch(idle)

    def embed(self, input_ids: Tensor, image_pixels: Tensor | None, video_pixels: Tensor | None,
              audio: list[Tensor]) -> Tensor:
        """(B, T, hidden): token embeddings with every image/video/audio slot overwritten in row-major order."""
        model = self.vita
        B, T = input_ids.shape
        x = model.get_input_embeddings()(input_ids).flatten(0, 1)
        ids = input_ids.flatten()
        for name, slot, media in (("image", self.slots.image, self._pixels(image_pixels, name="image")),
                                  ("video", self.slots.video, self._pixels(video_pixels, name="video")),
                                  ("audio", self.slots.audio, self._audio(audio))):
            where = (ids == slot).nonzero().squeeze(-1)
            given = 0 if media is None else media.shape[0]
            if given != where.numel():
                raise InvalidInputError(f"the batch has {where.numel()} {name} slots but its {name} inputs give "
                                        f"{given} embeddings")
            if given:
                x = x.index_put((where,), media.to(x.dtype))
        return x.view(B, T, -1)

    def _pixels(self, pixels: Tensor | None, *, name: str) -> Tensor | None:
        if pixels is None or pixels.numel() == 0:
            return None
        tower = self.vita.vision_tower
        if tower is None:
            raise InvalidInputError(f"the model has no vision tower for the batch's {name}")
        return tower(pixels).flatten(0, 1)

    def _audio(self, waveforms: list[Tensor]) -> Tensor | None:
        if not waveforms:
            return None
        tower = self.vita.audio_tower
        if tower is None:
            raise InvalidInputError("the model has no audio tower for the batch's audio")
        param = next(tower.parameters())
        lengths = torch.tensor([len(w) for w in waveforms], device=param.device)
        padded = nn.utils.rnn.pad_sequence([w.to(param.device) for w in waveforms], batch_first=True)
        feats, frames = fbank(padded, lengths, tower.config)
        out, n_tokens = tower(feats.to(param.dtype), frames)
        return torch.cat([o[:n] for o, n in zip(out, n_tokens.tolist())])


def _zero_touch(modules: list[nn.Module | None]) -> Tensor | float:
    """0 x one element of every trainable parameter of towers this batch did not use: every trainable parameter
    then gets a gradient (zero) on every rank and every step, so DDP and FSDP reduce the same tensors everywhere
    and the optimizer treats a tower the same whether or not this micro-batch had its medium."""
    touched = [p.reshape(-1)[:1] for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    return torch.cat(touched).sum() * 0.0 if touched else 0.0


def batch_loss_sum(module: nn.Module, batch: Batch) -> Tensor:
    """Calls `module` (a TrainingModel, possibly wrapped by DDP/FSDP) on a batch."""
    return module(batch.input_ids, batch.targets, batch.positions, batch.segment_ids,
                  image_pixels=batch.image_pixels, video_pixels=batch.video_pixels, audio=batch.audio)
