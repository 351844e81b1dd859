"""Process groups and model wrapping: one process, DDP over gloo (CPU) or NCCL (GPU), or FSDP by a flag.

`torchrun` sets RANK/WORLD_SIZE/LOCAL_RANK; without them training runs in one process with no process group.
State dicts are full (unsharded, CPU) and keyed by parameter name whatever the wrapper
(`model_state`, `optimizer_state`), so a checkpoint written under FSDP on 8 GPUs
resumes under DDP on 2 CPUs and the other way round.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vita.errors import CheckpointError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Joins the torchrun process group (NCCL with GPUs, else gloo); a no-op in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, info: DistInfo, *, fsdp: bool, layer_types: tuple[type, ...] = ()) -> nn.Module:
    """DDP, or FSDP (FSDP2 `fully_shard`) sharding each of `layer_types` (the decoder layers) and the root.

    `find_unused_parameters`: a micro-batch without images leaves the vision connector out of the graph, and
    DDP must not wait for its gradient. FSDP2 shards per parameter (DTensor), so frozen and trained parameters
    can share a unit, and it runs on CPU over gloo as well as on GPUs over NCCL.
    """
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise RuntimeError("FSDP needs a process group: launch with torchrun")
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for param in module.parameters():  # FSDP2 shards contiguous storage; the MoE keeps experts input-major
            if not param.is_contiguous():
                param.data = param.data.contiguous()
        for sub in module.modules():
            if isinstance(sub, layer_types):
                fully_shard(sub, mesh=mesh)
        return fully_shard(module, mesh=mesh)
    if not info.distributed:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool):
    """Accumulation without communication: DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`."""
    if sync:
        yield
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full model state on CPU, keys without wrapper prefixes (gathered on every rank under FSDP)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    if not any(hasattr(p, "device_mesh") for p in module.parameters()):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter]) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, unsharded, on CPU; only parameters that have state.

    Written by hand rather than with `get_optimizer_state_dict`, which first gives every parameter a state (a
    zero-gradient step): a resumed run would then differ from an uninterrupted one for parameters that had
    no gradient yet (a tower that has seen no audio so far).
    """
    state = {}
    for name, param in named.items():
        if param in optimizer.state:
            state[name] = {k: _full(v).cpu().clone() if torch.is_tensor(v) else v
                           for k, v in optimizer.state[param].items()}
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter], saved: dict) -> None:
    """Restores `optimizer_state`'s output into an optimizer over the same named parameters (any wrapper)."""
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this "
                              f"stage's {len(optimizer.param_groups)}: was the trainable set changed?")
    for group, hyper in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(hyper)
    unknown = sorted(saved["state"].keys() - named.keys())
    if unknown:
        raise CheckpointError(f"the checkpoint has optimizer state for {unknown[:3]}, which this stage does not train")
    for name, values in saved["state"].items():
        param = named[name]
        optimizer.state[param] = {k: _like(v, param) if torch.is_tensor(v) and v.ndim else v
                                  for k, v in values.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(value: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """A full state tensor placed like `param`: sharded the same way when it is a DTensor (FSDP2)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value.to(device=param.device, dtype=value.dtype)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sums floats across ranks (float64 on the wire, so loss sums add exactly as in one process)."""
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
