"""Several processes on one compression run, through torch.distributed (`torchrun --nproc-per-node N -m slim compress`).

The work splits the way the math allows: calibration batches are dealt out to the ranks (each runs every block
over its own batches only), the input statistics of a block's linears are summed across ranks (all-reduce), the
linears of a block are then solved on different ranks (largest first, to the least-loaded rank) and each result is
broadcast from the rank that solved it, so every rank holds the whole compressed block before running its batches
through it. Rank 0 writes the checkpoint. Per batch and per linear the arithmetic is the one-process arithmetic; the
only difference is the order in which the per-batch statistics are added (float64 sums of float32 batch sums: in
practice equal bits, in principle the last bit of a Gram entry), which the tests check against one process.

Backends: gloo on CPU, nccl on CUDA (each rank on cuda:LOCAL_RANK).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, world size (1 = no torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def batches(self, n: int) -> list[int]:
        """The calibration batches (of n) this rank runs: every world-th one, starting at its rank."""
        if n < self.world:
            raise ValueError(f"{self.world} processes but only {n} calibration batches: use fewer processes, more "
                             "calibration samples or a smaller calib.batch_size")
        return list(range(self.rank, n, self.world))

    def owners(self, costs: Sequence[float]) -> list[int]:
        """A rank for each item: largest first, each to the rank with the least work so far (ties: lowest rank).
        Deterministic in the costs alone, so every rank computes the same assignment."""
        load = [0.0] * self.world
        own = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            own[i] = r
            load[r] += costs[i]
        return own

    def all_reduce(self, tensors: Sequence[torch.Tensor], op: str = "sum") -> None:
        """Sum (or, with op "max", take the largest of) each tensor over the ranks, in place."""
        if not self.active:
            return
        import torch.distributed as dist

        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        for t in tensors:
            dist.all_reduce(t, op=red)

    def broadcast(self, obj: Any, src: int) -> Any:
        """`obj` from rank `src` on every rank (pickled: tensors arrive bit for bit)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def from_env(device: str = "cpu") -> tuple[Ranks, str]:
    """The ranks torchrun started (WORLD_SIZE, RANK, LOCAL_RANK in the environment), with the process group
    initialized, and this rank's device; a plain process gets Ranks() and `device` unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    log.info("rank %d of %d on %s", rank, world, device)
    return Ranks(rank, world), device


def close() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
