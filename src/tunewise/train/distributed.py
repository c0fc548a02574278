"""Data-parallel training under `torchrun` / `accelerate launch`: the same loop, N processes.

Each optimizer step's micro-batches are split row-wise across the processes; every process
scales its loss by the *global* count of supervised units (tokens for SFT, pairs for
preference methods) in the step, so after the gradients are summed across processes they are
exactly those of one process running the whole global batch. Gradients are summed with one
flat all-reduce per step (gloo on CPU, NCCL on GPU). Only the main process writes files.

Single process (no WORLD_SIZE in the environment): every call here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, rows: list[int]) -> list[int]:
        """This process's share of a micro-batch: every world-th row."""
        return rows[self.rank :: self.world]

    def sum_int(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def sum_grads(self, params: list[torch.nn.Parameter], extra: list[float] = ()) -> list[float]:
        """Sum every process's gradients into each process, and the `extra` numbers with them
        (one flat all-reduce); returns the summed extras."""
        if not self.active:
            return list(extra)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [torch.tensor(list(extra), dtype=torch.float32, device=self.device)])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n
        return flat[offset:].tolist()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, value):
        """The main process's `value` (any picklable object) on every process."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed() -> Dist:
    """Join the process group that torchrun / accelerate launch describe in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local_rank)
