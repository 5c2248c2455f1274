"""One process or several under ``torchrun``: rank, world size, device, and the few collectives
the trainer needs (NCCL on GPUs, gloo on the CPU)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from trainer.errors import TrainerError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes of this node (torchrun's LOCAL_WORLD_SIZE)
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all ranks (float64 so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_distributed(device_name: str | None = None) -> Dist:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device_name is None else device_name.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise TrainerError(f"--device {device_name}: CUDA is not available")
    if use_cuda:
        device = torch.device("cuda", local_rank if world > 1 or device_name in (None, "cuda") else torch.device(device_name).index or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            **({"device_id": device} if use_cuda else {}),
        )
    return Dist(rank=rank, world=world, local_rank=local_rank, local_world=local_world, device=device)
