"""Several processes (torchrun): where this process stands, the process group, and the
collectives the trainer needs (broadcast from rank 0, all-reduce, replica digests).

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_distributed` starts the process
group (NCCL on GPUs, gloo on CPUs); every helper here is a no-op for a single process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..utils import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """This process's place: from the process group when one is running, else from
    torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        return DistInfo()


def init_distributed(device_name: str = "auto") -> bool:
    """Start the default process group when launched by torchrun (``WORLD_SIZE`` > 1).

    NCCL when the run uses CUDA (each process on GPU ``LOCAL_RANK``), gloo on CPU;
    rendezvous from torchrun's environment (``env://``). Returns True when this
    call started it (the caller then destroys it). A script that trains several
    times in one torchrun launch calls this once first: ``fit`` then uses that
    group and leaves it running (a process group started again after being
    destroyed can meet the old one's keys in torchrun's store and hang).
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    device = resolve_device(device_name, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def destroy_distributed() -> None:
    """Destroy the default process group if one is running."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def rank_device(device: torch.device, dist: DistInfo) -> torch.device:
    """The device of this rank: GPU ``LOCAL_RANK`` for a multi-process CUDA run (made current)."""
    if dist.world_size > 1 and device.type == "cuda":
        return resolve_device(device, local_rank=dist.local_rank)
    return device


def broadcast_from_main(fn: Callable[[], object], dist: DistInfo):
    """Run ``fn`` on rank 0 and hand its result (or its exception) to every rank."""
    if dist.world_size <= 1:
        return fn()
    import torch.distributed as tdist

    box: list = [None]
    if dist.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # every rank raises the same error
            box[0] = ("error", exc)
    tdist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def all_reduce(t: torch.Tensor, dist: DistInfo, op: str = "sum") -> torch.Tensor:
    """In-place sum (or max) of ``t`` over the ranks; ``t`` unchanged for one process."""
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
    return t


def weights_digest(state_dict: dict) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a state dict's tensors
    (exact: equal only for bitwise-identical weights)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k]
        if not isinstance(v, torch.Tensor):
            continue
        t = v.detach().cpu().contiguous().reshape(-1)  # logical (C) order, whatever the memory format
        h.update(f"{k}:{tuple(v.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def replica_digests(model, dist: DistInfo) -> list[str]:
    """Every rank's :func:`weights_digest` of the model, gathered on all ranks."""
    if dist.world_size <= 1:
        return [weights_digest(model.state_dict())]
    import torch.distributed as tdist

    digests: list = [None] * dist.world_size
    tdist.all_gather_object(digests, weights_digest(model.state_dict()))
    return digests


__all__ = ["DistInfo", "all_reduce", "broadcast_from_main", "destroy_distributed", "dist_info", "init_distributed",
           "rank_device", "replica_digests", "weights_digest"]
