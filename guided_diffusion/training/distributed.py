"""This process's place in a DDP job started by torchrun (or a single process without one)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as torch_dist

from pipeline.common.errors import UserError

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in a (possibly single-process) DDP job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-sized tensors of every rank along dim 0 (x itself when alone)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def max_int(self, value: int, device: torch.device) -> int:
        """The largest of every rank's `value`: an all-reduce of one integer on `device` (the
        process group's device); `value` itself when alone."""
        if self.world_size == 1:
            return value
        x = torch.tensor([value], dtype=torch.int64, device=device)
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.MAX)
        return int(x.item())

    def from_main(self, decide: Callable[[], T]) -> T:
        """Rank 0's `decide()` on every rank (the others wait for it rather than deciding themselves):
        for choices that must agree, such as speed verdicts timed on each machine. What rank 0's
        `decide()` raises (a UserError for a bad setting) is raised on every rank, none left waiting."""
        if self.world_size == 1:
            return decide()
        box: list = [None]
        if self.main:
            try:
                box[0] = (True, decide())
            except Exception as exc:  # handed to every rank below, raised there and here
                box[0] = (False, exc)
        torch_dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Leave the process group (nothing to do when alone or never joined)."""
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun job when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "mps":
        raise UserError("DDP is not supported on MPS; run one process or use --device cpu")
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return Dist(rank, world_size, local_rank), device
