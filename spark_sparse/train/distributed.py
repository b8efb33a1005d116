"""torch.distributed glue: env:// initialisation, ranks, and SparK's seeded batch sampling."""
from __future__ import annotations

import datetime
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["DistContext", "init_distributed", "local_gpu", "epoch_batches", "EpochBatchSampler", "split_global_batch",
           "stop_when_launcher_dies", "under_torchrun", "in_process_group", "leave_process_group"]


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def stop_when_launcher_dies(poll_s: float = 2.0) -> None:
    """SIGTERM this process once its parent (torchrun's agent) is gone, as if the agent had passed a SIGTERM on.

    torchrun starts each rank in a session of its own: an agent killed outright (``kill -9``, a container
    stop, ``timeout -s KILL``) leaves its ranks training, orphaned, and a restarted job then found them
    writing the folder it resumes. SIGTERM saves a checkpoint at the next step, as a scheduler's would.
    """
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="spark-sparse: launcher watch", daemon=True).start()


def in_process_group() -> bool:
    """Whether this process holds torch.distributed's default process group (its own or a caller's)."""
    return dist.is_available() and dist.is_initialized()


def leave_process_group(failed: bool = False) -> None:
    """Leave the default process group before the process exits: gloo aborts, now and then, a process that
    exits holding one ("terminate called without an active exception", SIGABRT).

    ``failed``: leaving on the way out of an error. Then only a gloo group is left, and an error in leaving
    is dropped (the first error is the one to report): NCCL's shutdown waits for the collectives this rank
    queued, which peers that never reached them would leave it waiting on until the collective timeout,
    where exiting at once lets torchrun stop the others.
    """
    if not in_process_group():
        return
    if not failed:
        dist.destroy_process_group()
        return
    if dist.get_backend() == "gloo":
        try:
            dist.destroy_process_group()
        except Exception:          # noqa: BLE001 -- the error being raised is what the user must see
            pass


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    #: training processes on this node (torchrun's LOCAL_WORLD_SIZE): they share its CPUs
    local_world_size: int = 1

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

    def all_union(self, values: set) -> set:
        """The union of every process's ``values`` (small sets of picklable items, e.g. image indices)."""
        if not self.initialized:
            return set(values)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, sorted(values))
        return set().union(*gathered)

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


def _check_cuda(device: str) -> None:
    """A clear :class:`ConfigError` when ``--device`` asks for a GPU that torch cannot use."""
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build; use --device cpu (or auto), or install a CUDA build of torch"
               if torch.version.cuda is None else
               f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: check the driver "
               f"(nvidia-smi) and CUDA_VISIBLE_DEVICES, or use --device cpu (or auto)")
        raise ConfigError(f"--device {device} asks for CUDA, but {why}")
    index = device.split(":", 1)[1] if ":" in device else None
    if index is not None and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: no such GPU; this machine has {torch.cuda.device_count()} "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def local_gpu(local_rank: int, visible: int) -> int:
    """The GPU index of the process of ``local_rank`` on its node, among the ``visible`` GPUs.

    torchrun's processes each see the node's GPUs and take the one of their local rank; launchers that
    give each process its own GPU (SLURM's ``--gpus-per-task``) show it one GPU, index 0, whatever its
    local rank. More processes than GPUs on a node is refused (two would share a GPU)."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise ConfigError(f"process of local rank {local_rank} finds {visible} GPUs on its node: launch at most {visible} "
                      f"processes per node (--nproc_per_node / --ngpu_per_node {visible}), one per GPU")


def init_distributed(device: str, tuning_s: float = 0.0) -> DistContext:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU).

    ``device`` is ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; under torchrun CUDA uses the
    local rank's GPU. ``tuning_s``: the kernel tuning's budget, during which the other ranks wait
    in a collective for rank 0's plan; NCCL's 10-minute default timeout is lengthened to cover it
    (three times the budget: the guard and memory checks come on top of it).
    """
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ConfigError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N")
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda:
        _check_cuda(device)
    if not under_torchrun():
        dev = torch.device(device if device.startswith("cuda") else ("cuda" if want_cuda else "cpu"))
        return DistContext(device=dev)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if want_cuda:
        index = local_gpu(local, torch.cuda.device_count())
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=10) + datetime.timedelta(seconds=3 * tuning_s)   # gloo's: 30 min
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", init_method="env://",
                                timeout=timeout if want_cuda else max(timeout, datetime.timedelta(minutes=30)))
    return DistContext(rank, world, local, dev, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def split_global_batch(global_batch: int, world: int, num_images: int) -> tuple[int, int, list[str]]:
    """``--bs`` (global) -> ``(per process, global actually used, warnings)``; impossible requests raise.

    SparK's rule: each process takes ``global // world`` images, so a global batch that is not a
    multiple of the process count shrinks; that is worth a warning, since the learning rate is
    scaled for the batch actually used. A global batch larger than the dataset would fill each
    step with copies of the same images at a learning rate scaled for the larger batch: an error.
    """
    if global_batch < world:
        raise ConfigError(f"--bs {global_batch} is the global batch over all processes and is smaller than the "
                          f"{world} processes: use --bs {world} or more (a multiple of {world})")
    if global_batch > num_images:
        raise ConfigError(f"--bs {global_batch} is larger than the dataset ({num_images} images): every step would "
                          f"repeat images {global_batch / num_images:.1f} times at a learning rate scaled for "
                          f"{global_batch}; use --bs {num_images} or less, or more images")
    local = global_batch // world
    warnings = []
    if local * world != global_batch:
        warnings.append(f"--bs {global_batch} is not divisible by the {world} processes: the global batch is "
                        f"{local * world} ({local} per process) and the learning rate is scaled for {local * world}; "
                        f"use --bs {local * world} or {(local + 1) * world} to silence this")
    return local, local * world, warnings


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


class EpochBatchSampler:
    """A DataLoader ``batch_sampler`` that yields :func:`epoch_batches` of the epoch set last.

    One DataLoader with persistent workers serves the whole run: before each epoch the engine calls
    :meth:`set_epoch` (with the iterations to skip when resuming mid-epoch); the DataLoader asks for
    a fresh iterator at every ``iter(loader)``, and its workers only ever receive
    ``(index, seed)`` pairs, so the batches stay a pure function of (seed, epoch).
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int, rank: int, world: int):
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        batches = epoch_batches(self.num_samples, self.global_batch, self.epoch, self.seed, self.rank, self.world)
        return iter(batches[self.skip:])

    def __len__(self) -> int:
        return max(0, math.ceil(self.num_samples / self.global_batch) - self.skip)
