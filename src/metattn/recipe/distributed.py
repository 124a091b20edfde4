"""Processes and devices: the torchrun process group, the rank's device, and the few
collectives the recipe needs (rank 0 decides; one all-reduce per step)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from metattn.errors import ConfigError


def setup_distributed(device: str = "auto") -> tuple[int, int, int]:
    """Join the torchrun process group if there is one: (rank, world_size, local_rank).

    The backend is NCCL when the run's ``device`` is a GPU (``auto`` with CUDA available, or
    ``cuda``), else gloo; ``METATTN_DIST_BACKEND`` overrides it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
        backend = os.environ.get("METATTN_DIST_BACKEND") or ("nccl" if on_gpu else "gloo")
        if backend == "nccl" and torch.cuda.is_available():
            # bind this process to its GPU before NCCL creates its communicators
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


@contextmanager
def process_group(device: str) -> Iterator[tuple[int, int, int]]:
    """(rank, world, local_rank) inside; under torchrun the group is joined here and left at
    the end, all ranks together (rank 0 may still be writing files after the last
    collective while the others would already tear their group down)."""
    created = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    rank, world, local_rank = setup_distributed(device)
    try:
        yield rank, world, local_rank
        if created and world > 1:
            dist.barrier()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def agree(error: Exception | None, world: int) -> None:
    """Raise ``error`` on every rank if rank 0 found one (so no rank waits forever in a
    collective that another rank never reaches)."""
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


def share(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (checkpoints need not be on a shared filesystem)."""
    if world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_step(metrics: dict[str, torch.Tensor], loss: torch.Tensor, stop: bool, world: int
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """Average the step's metrics and loss over ranks (equal slices: the whole-batch mean) and
    OR the stop flags, in one all-reduce."""
    keys = sorted(metrics)
    vals = torch.stack([metrics[k].detach().double().reshape(()) for k in keys]
                       + [loss.detach().double().reshape(()),
                          torch.tensor(float(stop), dtype=torch.float64, device=loss.device)])
    dist.all_reduce(vals)
    stop_any = bool(vals[-1].item() > 0)
    vals = vals / world
    return {k: vals[i] for i, k in enumerate(keys)}, vals[len(keys)], stop_any


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use auto or cpu")
    if dev.type == "cuda" and dev.index is None:  # plain "cuda": this process's local GPU
        dev = torch.device("cuda", local_rank)
    return dev


def setup_device(name: str, local_rank: int, tf32: bool) -> torch.device:
    """The rank's device, made current, with TF32 matmuls as the config says (CUDA)."""
    device = pick_device(name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return device
