"""Process launch for the entry points: torchrun detection, process group, device. (CLI side: reads the env.)

`python train.py` is the single-process path; under torchrun the `RANK`, `LOCAL_RANK` and `WORLD_SIZE` variables
select the process group (`env://`): NCCL with one GPU per local rank, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mixmask.errors import UserError


@dataclass
class Launch:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    """`auto` → cuda:LOCAL_RANK when CUDA is available, else cpu; explicit `cuda` without CUDA is an error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"run.device={requested!r} but CUDA is not available here; use run.device=cpu or auto")
        if requested == "cuda":
            return torch.device("cuda", local_rank)
        return torch.device(requested)
    if requested != "cpu":
        raise UserError(f"run.device={requested!r} is not valid; valid: auto, cpu, cuda, cuda:N")
    return torch.device("cpu")


def init(requested_device: str) -> Launch:
    """Join the torchrun process group if launched by torchrun; pin the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return Launch(rank=rank, local_rank=local_rank, world_size=world, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
