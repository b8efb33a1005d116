"""torch.distributed glue: env:// initialisation, ranks, and SparK's seeded batch sampling."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "epoch_batches", "under_torchrun"]


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")   # NCCL needs CUDA tensors

    def all_mean(self, value: float) -> float:
        if not self.initialized:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def any_rank(self, *flags: bool) -> list[bool]:
        """Each flag, true if any process raised it.

        Ranks must leave the loop together: one rank stopping alone (a non-finite loss, SIGTERM)
        would leave the others waiting forever in DDP's gradient all-reduce.
        """
        if not self.initialized:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]


def init_distributed(device: str) -> DistContext:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU).

    ``device`` is ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; under torchrun CUDA uses the
    local rank's GPU.
    """
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} asked for CUDA but torch sees no GPU")
    if not under_torchrun():
        dev = torch.device(device if device.startswith("cuda") else ("cuda" if want_cuda else "cpu"))
        return DistContext(device=dev)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", init_method="env://")
    return DistContext(rank, world, local, dev)


def epoch_batches(num_samples: int, global_batch: int, epoch: int, seed: int, rank: int, world: int
                  ) -> list[list[tuple[int, int]]]:
    """This rank's batches for ``epoch``: lists of ``(dataset index, per-sample seed)``.

    An epoch is ``ceil(N / global_batch)`` iterations over one seeded permutation, wrapped around
    to fill the last batch (SparK's ``filling``). Each sample carries its own augmentation seed, so
    the batches of an epoch depend only on (seed, epoch): resuming mid-run reproduces them exactly.
    """
    iters = math.ceil(num_samples / global_batch)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=gen)
    order = order.repeat(math.ceil(iters * global_batch / num_samples))[: iters * global_batch]
    sample_seeds = torch.randint(0, 2**31 - 1, (iters * global_batch,), generator=gen)
    local = global_batch // world
    batches = []
    for it in range(iters):
        start = it * global_batch + rank * local
        batches.append(list(zip(order[start:start + local].tolist(), sample_seeds[start:start + local].tolist())))
    return batches
