"""The pre-training loop: build everything, resume, train, save, stop cleanly.

Every iteration re-seeds its randomness from (seed, global iteration, rank): masks, drop-path and
data augmentation are then functions of the run's seed and position, so a resumed run continues
exactly as if it had never stopped. A checkpoint taken mid-epoch also keeps that epoch's loss sum,
so the resumed epoch's logged loss covers the whole epoch, as in an uninterrupted run.

Settings that cannot work (a global batch larger than the dataset, fewer images than processes, a
folder holding another run) fail with :class:`~spark_sparse.errors.ConfigError` before anything is
written; settings that work but differ from what was asked (a batch rounded down to a multiple of
the process count, a batch above the memory estimate, fp16 autocast on a CPU) are printed as
warnings before the first step and recorded in the log header.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import io
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import __version__
from ..autotune import AutotuneOptions, AutotuneResult, autotune
from ..autotune.guard import left_as_it_was
from ..errors import ConfigError, SparkSparseError
from ..checkpoint import (CheckpointError, atomic_save, load_pretrained, load_spark_state, read_checkpoint,
                          saved_decoder_width)
from ..models import model_default_drop_path, resolve_model_name
from ..models.model_kwargs import format_model_kwargs
from ..user_modules import import_user_module
from ..spark import SparK, create_spark
from ..speed import apply_speed_plan, estimate_max_batch, plan_speed
from .config import PretrainConfig
from .data import DemoPhotosDataset, ImageFolderDataset, ImageNormalizer, pretrain_augmentation
from .distributed import (DistContext, EpochBatchSampler, in_process_group, init_distributed, leave_process_group,
                          split_global_batch)
from .optim import apply_lr_wd, build_optimizer, default_beta2, lr_wd_at, param_groups
from .outputs import PRETRAINED, RunOutputs, Tee, epochs_text, git_state, resume_command
from .visualize import save_reconstruction_grid

__all__ = ["pretrain", "Trainer", "TrainingError", "StopRequested", "NothingToTrain", "RESUME_AUTO"]

CHECKPOINT_FORMAT = "spark-sparse/1"
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``--resume_from=auto``: this run's folder's ``<model>_still_pretraining.pth`` if there is one, else a new run
RESUME_AUTO = "auto"
#: unreadable files named on the console per epoch at most (the rest are counted, and named in later epochs)
UNREADABLE_NAMED = 20
#: settings a resumed run should share with its checkpoint's (the maths of the run; --ep may grow)
RESUME_KEEPS = ("input_size", "mask", "bs", "wp_ep", "base_lr", "wd", "wde", "clip", "opt", "ada", "dp", "seed", "amp")


class TrainingError(SparkSparseError, RuntimeError):
    """Training cannot go on (a non-finite loss): the message says what was saved and what to try."""


class NothingToTrain(Exception):
    """The checkpoint to resume has already done the epochs asked for: nothing is built or written. The
    main process has printed the message; :func:`pretrain` returns ``state`` (the finished run's)."""

    def __init__(self, message: str, state: "RunState"):
        super().__init__(message)
        self.state = state


class StopRequested(Exception):
    """Raised after a resumable checkpoint was written because SIGTERM / Ctrl-C arrived (``signum``: which)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


@dataclass
class RunState:
    epoch: int = 0          # epoch being run
    iteration: int = 0      # next iteration within it
    min_loss: float = math.inf
    loss_sum: float = 0.0   # this rank's losses of the epoch's iterations so far (mean over ranks once saved)
    unreadable: set = field(default_factory=set)   # dataset indices found unreadable this epoch

    def progress(self) -> dict:
        """The partial epoch, as a checkpoint keeps it."""
        return {"loss_sum": self.loss_sum, "unreadable": sorted(self.unreadable)}


@contextmanager
def _console_recorded(enabled: bool) -> Iterator[dict[str, str]]:
    """Record what is printed within (while the output folder is not open yet): the dict gets each stream's text."""
    printed: dict[str, str] = {}
    if not enabled:
        yield printed
        return
    tees = {name: Tee(getattr(sys, name), io.StringIO()) for name in ("stdout", "stderr")}
    for name, tee in tees.items():
        setattr(sys, name, tee)
    try:
        yield printed
    finally:
        for name, tee in tees.items():
            setattr(sys, name, tee.stream)
            printed[name] = tee.file.getvalue()


class _StopFlag:
    """SIGTERM and the first Ctrl-C ask the loop to stop after the current step; a second Ctrl-C aborts.

    Every rank receives the signal (torchrun passes it on): only the one that ``announces`` says so.
    """

    def __init__(self, announces: bool = True):
        self.announces = announces
        self.requested = False
        self.signum = signal.SIGINT
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        if not self.announces:
            return
        again = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
        print(f"\n[spark-pretrain] {signal.Signals(signum).name} received: saving a resumable checkpoint after "
              f"the step that is running{again}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _loader_worker_init(worker_id: int, folder_lock: Optional[tuple[int, int, int]] = None) -> None:
    """Let a loader worker outlive the first SIGTERM, ignore Ctrl-C, and not hold the output folder's lock.

    ``kill -TERM -<pgid>``, ``timeout`` and SLURM signal the whole process group. A worker killed by
    it makes the DataLoader raise in the main process from its SIGCHLD handler, wherever the main
    process is: mid-step, or mid-way through writing the checkpoint it saves on SIGTERM. The main
    process stops its workers when it exits; a second SIGTERM (the loader's own ``terminate``) still
    ends a worker at once. Ctrl-C reaches the workers too: forked inside the training loop, they would
    run its handler and announce a checkpoint they do not save. A forked worker shares the main process's open
    lock file (``folder_lock``: descriptor, device, inode), and a flock lasts while any copy is open: a worker
    outliving its run (the loader is shut down lazily) kept the folder locked against the run's own resume.
    """
    signal.signal(signal.SIGTERM, _default_on_next_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if folder_lock is not None:
        fd, device, inode = folder_lock
        try:
            held = os.fstat(fd)
        except OSError:                   # a spawned worker has no copy of it
            return
        if (held.st_dev, held.st_ino) == (device, inode):      # not another file that got the same number
            os.close(fd)


def _default_on_next_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: taskset, cgroups, SLURM), as torch's DataLoader counts."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def too_many_loader_workers(workers: int, processes_on_node: int, cpus: int) -> Optional[str]:
    """Why ``workers`` loader processes per training process overload ``cpus`` CPUs, or ``None``.

    SparK's default of 8 workers is sized for a GPU server; on a laptop or a small cloud machine the
    workers and the training processes fight for the same cores. Said once, with the number to use,
    in place of torch's own warning (printed at the loader's creation and again at its first
    iteration, without the node's other training processes in its count).
    """
    if workers <= 0 or processes_on_node * workers <= cpus:
        return None
    spread = f"{processes_on_node} training processes x {workers}" if processes_on_node > 1 else f"{workers}"
    return (f"--dataloader_workers {workers}: {spread} loader processes on the {cpus} CPU{'s' * (cpus != 1)} "
            f"this process can use; they compete with training for the cores and can slow it down: use "
            f"--dataloader_workers {cpus // processes_on_node} or fewer")


#: torch's own warning for the case above, replaced by ours (see :func:`too_many_loader_workers`)
_TORCH_WORKER_WARNING = r"This DataLoader will create \d+ worker processes"


def _batches(batches):
    """The loader's batches (``batches``: an iterator of the loader). An error of ours raised in a loader
    worker comes back as the same type with torch's worker traceback in its message: it is re-raised with
    our message alone (the CLI's one line)."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except SparkSparseError as err:
            text = str(err)
            if "Original Traceback" not in text:
                raise
            last = text.rstrip().splitlines()[-1]
            raise type(err)(last.split(f"{type(err).__name__}: ", 1)[-1]) from None
        yield batch


#: DDP without its per-forward buffer broadcast (BatchNorm statistics stay per process, as SparK's), under the
#: keyword this torch has (``broadcast_buffers`` is deprecated where ``forward_sync_buffers`` exists)
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


def _seed_for(seed: int, global_it: int, rank: int) -> int:
    return (seed * 1_000_003 + global_it * 1_009 + rank) % (2**63 - 1)


def _build_dataset(cfg: PretrainConfig):
    transform = pretrain_augmentation(cfg.input_size)
    if cfg.data_path is None:
        return DemoPhotosDataset(transform)
    dataset = ImageFolderDataset(cfg.data_path, transform)
    dataset.check_readable()
    return dataset


def _resumable_checkpoint(path: str, model_name: str, model_kwargs: dict, decoder_width: int,
                          own: bool) -> dict:
    """Checkpoint ``path``, checked to be a run of ``model_name`` built with ``model_kwargs`` and a decoder
    of ``decoder_width`` that can be resumed (before any tuning); ``own``: the output folder's own checkpoint
    (``--resume_from=auto``), whose refusal says how to get past it."""
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as err:
        if not own:
            raise
        raise CheckpointError(f"{err}. It is this run's own checkpoint, so it was cut short or damaged after it was "
                              f"written (it is saved atomically): restore it from a copy, or start the run over "
                              f"without --resume_from and with --overwrite (which deletes it)") from err.__cause__
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a spark-pretrain checkpoint (expected '{CHECKPOINT_FORMAT}' "
                              f"with model/optimizer/epoch keys; found keys {', '.join(list(ckpt)[:6])}); "
                              f"use --init_weight to start from a pre-trained file instead")
    if ckpt.get("model_name") != model_name:
        raise CheckpointError(f"{path} was pre-training {ckpt.get('model_name')!r}, this run is {model_name!r}: to "
                              f"continue that run add --model={ckpt.get('model_name')} (the model is part of the "
                              f"run, as in the command logged in its pretrain_log.txt)")
    saved_kwargs = ckpt.get("args", {}).get("model_kwargs") or {}       # older checkpoints: built without any
    if saved_kwargs != model_kwargs:
        raise CheckpointError(f"{path} was pre-training {model_name} built with "
                              f"{format_model_kwargs(saved_kwargs) or 'its defaults'}, this run builds it with "
                              f"{format_model_kwargs(model_kwargs) or 'its defaults'}: to continue that run, give "
                              f"{format_model_kwargs(saved_kwargs, as_options=True) or 'no --model_kwargs'} (as in "
                              f"the command logged in its pretrain_log.txt)")
    saved_width = saved_decoder_width(ckpt)
    if saved_width != decoder_width:
        raise CheckpointError(f"{path} was pre-training with a decoder of width {saved_width}, this run builds one of "
                              f"{decoder_width}: to continue that run, give --decoder_width {saved_width}")
    return ckpt


def _check_epochs_left(path: str, ckpt: dict, epochs: int, model_name: str) -> None:
    """Refuse a ``--ep`` below what checkpoint ``path`` has done (a run cannot be shortened); raise
    :class:`NothingToTrain` when it has done exactly ``--ep`` epochs (a finished run resumed, e.g. a requeued job)."""
    done, within = ckpt["epoch"], ckpt["iteration"]
    encoder = Path(path).parent / f"{model_name}{PRETRAINED}"
    its_encoder = f"its pre-trained encoder is {encoder}" if encoder.is_file() else f"{encoder} is missing"
    if done > epochs or (done == epochs and within):
        extra = f" and {within} iterations of epoch {done + 1}" if within else ""
        raise ConfigError(f"--ep {epochs}: {path} has already done {epochs_text(done)}{extra}, and a run cannot be "
                          f"shortened. To continue it, give --ep above {done}; to use it as it is, {its_encoder}")
    if done == epochs:
        raise NothingToTrain(f"nothing to train: {path} has done all {epochs_text(epochs)} of --ep {epochs} ({its_encoder}); "
                             f"to train it further, resume with --ep above {epochs} (the schedules stretch to the "
                             f"new length)", RunState(done, 0, ckpt.get("min_loss", math.inf)))


def parameters_without_gradient(spark: SparK, device: torch.device, amp_dtype: Optional[torch.dtype]) -> list[str]:
    """The trainable parameters a training step leaves without a gradient: parts of the encoder its hierarchical
    forward never calls (a user model's classifier head). The optimizer skips them anyway, and
    DistributedDataParallel fails on them (its reducer waits for every parameter's gradient), so the run
    freezes them.

    One step at batch 2 on random images, under the run's autocast; the random streams, BatchNorm statistics
    and every module's train/eval mode are left as they were, and the gradients cleared (the run has none yet).
    """
    spark.zero_grad(set_to_none=True)
    with left_as_it_was(spark), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        spark.train()
        images = torch.randn(2, 3, *spark.input_hw, device=device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = spark(images)
        loss.backward()
        return [name for name, param in spark.named_parameters() if param.requires_grad and param.grad is None]


class Trainer:
    """One pre-training run: everything is built (and every setting checked) in the constructor.

    ``capture_console`` tees ``sys.stdout``/``sys.stderr`` into the run's console backups while
    :meth:`run` runs; the CLI asks for it, a library caller keeps its streams untouched by default.
    """

    def __init__(self, cfg: PretrainConfig, cmd: str, capture_console: bool = False):
        self.cfg, self.cmd, self.capture_console = cfg, cmd, capture_console
        self.warnings: list[str] = []
        self.ctx: DistContext = init_distributed(cfg.device, tuning_s=cfg.autotune_budget)
        for module in cfg.import_module:                      # the user's models, before the name is looked up
            import_user_module(module)
        self.model_name = resolve_model_name(cfg.model)
        self.dataset = _build_dataset(cfg)                    # fails before any file is written
        self.normalize = ImageNormalizer()                    # the loader's uint8 batches -> SparK's inputs
        self.outputs = RunOutputs(cfg.output_dir, self.model_name, self.ctx.is_main)
        self.resume_path = self._resume_path()
        self._check_output_folder()
        if cfg.overwrite and self.outputs.continues_this_folder(self.resume_path):
            self._warn("--overwrite is ignored: the run resumes from this folder's own checkpoint, so its files are "
                       "kept and its log is appended to")
        # read and checked now: a wrong file is named before minutes of kernel tuning, not after
        self.resume_checkpoint = self._read_resume_checkpoint(self.resume_path) if self.resume_path else None
        if self.resume_checkpoint is not None:
            try:
                _check_epochs_left(self.resume_path, self.resume_checkpoint, cfg.ep, self.model_name)
            except NothingToTrain as done:
                if self.ctx.is_main:                # once, not once per process
                    print(f"[spark-pretrain] {done}")
                raise
        self.local_batch, self.global_batch, batch_warnings = split_global_batch(cfg.bs, self.ctx.world_size,
                                                                                 len(self.dataset))
        self.warnings += batch_warnings
        if self.dataset.unlisted_folders:
            unlisted = self.dataset.unlisted_folders
            self._warn(f"{len(unlisted)} folder(s) under --data_path could not be listed and their images are left "
                       f"out: {'; '.join(unlisted[:3])}{' ...' if len(unlisted) > 3 else ''}")
        self.iters_per_epoch = cfg.iterations_per_epoch(len(self.dataset), self.global_batch)
        self.data_fingerprint = self.dataset.fingerprint()
        if self.resume_checkpoint is not None:
            self._check_same_data(self.resume_path, self.resume_checkpoint)
        self.total_iters = cfg.ep * self.iters_per_epoch
        crowded = too_many_loader_workers(cfg.dataloader_workers, self.ctx.local_world_size, _usable_cpus())
        if crowded:
            self._warn(crowded)
        if cfg.wp_ep >= cfg.ep:
            self._warn(f"--wp_ep {cfg.wp_ep:g} is not below --ep {cfg.ep}: the learning rate never leaves its linear "
                       f"warm-up (SparK: 40 of 1600 epochs); lower --wp_ep for a short run")
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
            flag = "--tb_lg_dir" if cfg.tb_lg_dir else "--tensorboard"
            raise ConfigError(f"{flag} needs the tensorboard package: pip install tensorboard, or drop the flag")

        torch.manual_seed(cfg.seed)   # the initial weights are part of the run: make them the seed's
        self.speed = plan_speed(cfg.recipe, self.ctx.device, backend=cfg.backend, channels_last=cfg.channels_last,
                                compile_decoder=cfg.compile, foreach_optimizer=cfg.foreach_optimizer,
                                grad_ckpt=cfg.grad_ckpt)
        self.sync_bn = cfg.sbn and self.ctx.initialized and self.ctx.device.type == "cuda"
        self.spark: SparK = self._create_spark(self.speed.backend)
        # loaded now, not at the first step: a file that does not fit is named before minutes of kernel tuning
        # (not when resuming: the checkpoint's weights replace them, and a job script's restart may no longer have it)
        self.init_note = (load_pretrained(self.spark, cfg.init_weight, self.model_name, cfg.model_kwargs)
                          if cfg.init_weight and not self.resume_path else None)
        with _console_recorded(capture_console) as self.printed_before:      # into the backups once they open
            self.autotune = self._autotune()      # backend 'auto': kernels measured (or the resumed run's plan)
        self.spark, self.speed = self.autotune.spark, self.speed.with_autotune(self.autotune)
        self.plan = self.spark.backend.plan(self.spark.encoder, self.ctx.device, self.amp_dtype or torch.float32)
        apply_speed_plan(self.spark, self.speed)
        self.batch_estimate = estimate_max_batch(self.spark, self.spark.input_hw, self.ctx.device,
                                                 amp_dtype=self.amp_dtype)
        self._check_precision_and_memory()
        self._freeze_untrainable_parameters()
        self.model: nn.Module = self.spark
        if self.ctx.initialized:
            self.model = DistributedDataParallel(
                self.spark, device_ids=[self.ctx.local_rank] if self.ctx.device.type == "cuda" else None,
                **_NO_BUFFER_SYNC)

        self.peak_lr = cfg.lr(self.global_batch)
        self.beta2 = cfg.ada or default_beta2(self.spark.densify_norm_kind)
        self.groups = param_groups(self.spark)
        self.optimizer = build_optimizer(cfg.opt, self.groups, self.peak_lr, self.beta2, cfg.clip,
                                         foreach=self.speed.foreach_optimizer)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=cfg.amp == "fp16")
        self.sampler = EpochBatchSampler(len(self.dataset), self.global_batch, cfg.seed, self.ctx.rank,
                                         self.ctx.world_size)
        self.loader: Optional[DataLoader] = None
        self.state = RunState()
        self.unreadable_named: set[int] = set()     # unreadable files already named in this process's console
        self.tb = None

    # ------------------------------------------------------------------ measured dispatch (backend 'auto')
    def _create_spark(self, backend: str) -> SparK:
        cfg = self.cfg
        return create_spark(self.model_name, backend=backend, input_size=cfg.input_size, mask_ratio=cfg.mask,
                            drop_path_rate=cfg.dp, sync_bn=self.sync_bn, decoder_width=cfg.decoder_width,
                            strict_backend=cfg.strict_backend, **cfg.model_kwargs).to(self.ctx.device)

    def _autotune(self) -> AutotuneResult:
        """Pin the ``auto`` backend's kernels before the first step (other backends: nothing to do).

        A resumed run re-applies the plan saved in its checkpoint (exact resume needs the same
        kernels); otherwise ``--autotune`` measures (or reads from the cache) on this run's batch per
        process, input size, mask ratio and dtype. The guard may hand back the model on ``masked``.
        """
        cfg = self.cfg
        saved = self.resume_checkpoint.get("autotune") if self.resume_checkpoint else None
        options = AutotuneOptions(mode=cfg.autotune, budget_s=cfg.autotune_budget, progress=self.ctx.is_main,
                                  seed=cfg.seed, memory_limit=cfg.autotune_memory or None)
        return autotune(self.spark, self.local_batch, self.ctx.device, self.amp_dtype,
                        channels_last=self.speed.channels_last, options=options,
                        build_masked=lambda: self._create_spark("masked"), plan_state=saved)

    # ------------------------------------------------------------------ settings checked before the first step
    def _check_output_folder(self) -> None:
        """The main process checks the folder; every process learns the outcome before the first collective
        (the kernel tuning), so a refused run ends on every rank with one line, not a hung peer's traceback."""
        refusal = None
        if self.ctx.is_main:
            try:
                self.outputs.check_writable()
                self.outputs.check_not_in_use()
                self.outputs.check_reusable(self.resume_path, self.cfg.overwrite, self.cmd, self.cfg.ep,
                                            resume_auto=self.cfg.resume_from == RESUME_AUTO,
                                            model_kwargs=self.cfg.model_kwargs)
            except ConfigError as err:
                refusal = err
        if self.ctx.any_rank(refusal is not None)[0]:
            raise refusal or ConfigError(f"rank {self.ctx.rank}: stopped, the main process refused the output "
                                         f"folder (its error above says why)")

    def _resume_path(self) -> Optional[str]:
        """``--resume_from``, with ``auto`` resolved to this folder's checkpoint (``None``: a new run)."""
        if self.cfg.resume_from != RESUME_AUTO:
            if self.cfg.resume_from is not None and Path(self.cfg.resume_from).is_dir():
                raise ConfigError(f"--resume_from {self.cfg.resume_from}: a folder, not a checkpoint; pass the "
                                  f"<model>_still_pretraining.pth inside it, or --resume_from=auto with that folder "
                                  f"as --exp_dir")
            if self.cfg.resume_from is not None and not Path(self.cfg.resume_from).is_file():
                raise ConfigError(f"--resume_from {self.cfg.resume_from}: no such file (a run's "
                                  f"<model>_still_pretraining.pth, or 'auto' for the output folder's own)")
            return self.cfg.resume_from
        found = self.outputs.still_pretraining_path
        return str(found) if found.is_file() else None

    def _read_resume_checkpoint(self, path: str) -> dict:
        """Checkpoint ``path`` read and checked for this run (:func:`_resumable_checkpoint`), told whether it is
        this output folder's own."""
        return _resumable_checkpoint(path, self.model_name, self.cfg.model_kwargs, self.cfg.decoder_width,
                                     own=self.outputs.continues_this_folder(path))

    def _check_precision_and_memory(self) -> None:
        device = self.ctx.device
        if self.cfg.amp == "fp16" and device.type == "cpu":
            self._warn("--amp fp16 on a CPU: many CPUs have no optimised fp16 convolution backward (oneDNN then "
                       "runs its reference kernels, 10-100x slower than fp32); use --amp bf16 on CPUs")
        estimate = self.batch_estimate.max_batch
        if self.local_batch > estimate:
            self._warn(f"the batch per process ({self.local_batch}) is larger than the estimated largest that fits "
                       f"on {device} (about {estimate}: {self.batch_estimate.describe(str(device))}); expect running "
                       f"out of memory: lower --bs, add --grad_ckpt, or use --amp bf16")

    def _freeze_untrainable_parameters(self) -> None:
        """A user's encoder may hold parameters its hierarchical forward never uses (a classifier head): find
        and freeze them. This package's encoders build none, or freeze their heads themselves
        (``modules_outside_hierarchy``), as its tests check: the probe step is spared them."""
        if type(self.spark.encoder).__module__.startswith(f"{__package__.split('.')[0]}."):
            return
        unused = parameters_without_gradient(self.spark, self.ctx.device, self.amp_dtype)
        for name in unused:
            self.spark.get_parameter(name).requires_grad_(False)
        if unused:
            shown = ", ".join(unused[:4]) + (" ..." if len(unused) > 4 else "")
            self._warn(f"{len(unused)} parameter(s) get no gradient from SparK's loss and are frozen: {shown}; the "
                       f"encoder's hierarchical forward never uses them (a classifier head?), so SparK cannot train "
                       f"them and the export holds them as initialised: build the encoder without them")

    def _warn(self, message: str) -> None:
        """Printed before the first step (by the main process) and kept in the log header."""
        self.warnings.append(message)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, progress: Optional[dict] = None) -> dict:
        """Everything to resume exactly; ``progress`` is the partial epoch (loss sum, unreadable images)."""
        return {"format": CHECKPOINT_FORMAT, "version": __version__, "model": self.spark.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.state.epoch, "iteration": self.state.iteration, "min_loss": self.state.min_loss,
                "epoch_progress": progress if progress is not None else self.state.progress(),
                "args": self.cfg.as_dict(), "model_name": self.model_name, "world_size": self.ctx.world_size,
                "data": self.data_fingerprint, "autotune": self.autotune.plan_state()}

    def save(self, final: bool = False) -> None:
        """Write both checkpoints (main process); every process must call it (the loss sum is averaged)."""
        progress = self.state.progress()
        # each rank summed its own losses: keep their mean, which every rank resumes from (equal counts)
        progress["loss_sum"] = self.ctx.all_mean(progress["loss_sum"])
        progress["unreadable"] = sorted(self.ctx.all_union(set(progress["unreadable"])))
        if not self.ctx.is_main:
            return
        atomic_save(self.checkpoint(progress), self.outputs.still_pretraining_path)
        atomic_save(self.spark.encoder_state_dict(), self.outputs.pretrained_path)
        if final:
            built = f", built with {format_model_kwargs(self.cfg.model_kwargs)}" if self.cfg.model_kwargs else ""
            kind = ("timm-style encoder" if hasattr(self.spark.encoder, "timm_state_dict") else
                    f"the encoder's state dict, for {type(self.spark.encoder).__qualname__}.load_state_dict")
            print(f"[spark-pretrain] saved {self.outputs.pretrained_path} ({kind}{built})")

    def resume(self, path: str) -> None:
        ckpt = self.resume_checkpoint if self.resume_checkpoint is not None else self._read_resume_checkpoint(path)
        self.resume_checkpoint = None          # read once: do not hold a second copy of the weights while training
        load_spark_state(self.spark, ckpt["model"], f"{path}")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        progress = ckpt.get("epoch_progress", {})
        self.state = RunState(ckpt["epoch"], ckpt["iteration"], ckpt.get("min_loss", math.inf),
                              progress.get("loss_sum", 0.0), set(progress.get("unreadable", ())))
        args = ckpt.get("args", {})
        changed = [f"--{key} {getattr(self.cfg, key)} (was {args[key]})" for key in RESUME_KEEPS
                   if key in args and args[key] != getattr(self.cfg, key)]
        if args.get("ep", self.cfg.ep) != self.cfg.ep and self.state.epoch < args["ep"]:
            # an unfinished run's length is its schedule's; a finished one is continued by a larger --ep (as designed)
            changed.append(f"--ep {self.cfg.ep} (was {args['ep']}: the lr and weight-decay schedules stretch to the new "
                           f"length)")
        if changed:
            self._warn(f"resuming {path} with settings that differ from its run: {', '.join(changed)}; the run goes "
                       f"on with the new values, so it is no longer the run that was interrupted")
        processes = ckpt.get("world_size")          # older checkpoints did not save it: not checked
        if processes is not None and processes != self.ctx.world_size:
            self._warn(f"resuming {path}, a run of {processes} process(es), with {self.ctx.world_size}: each step "
                       f"still sees the same images, but BatchNorm statistics are per process and each process draws "
                       f"its own masks and drop-path, so it is no longer the run that was interrupted (its log's "
                       f"command has its launch flags)")
        if self.state.iteration and "epoch_progress" not in ckpt:
            self._warn(f"{path} predates epoch_progress: epoch {self.state.epoch + 1}'s logged loss will cover only "
                       f"the iterations after the resume")
        within = (f", then {self.state.iteration}/{self.iters_per_epoch} iterations of epoch {self.state.epoch + 1}"
                  if self.state.iteration else "")
        if self.ctx.is_main:
            print(f"[spark-pretrain] resumed from {path}: {self.state.epoch} of {self.cfg.ep} epochs done{within}")

    def _check_same_data(self, path: str, ckpt: dict) -> None:
        """Warn when the images differ from those the checkpoint's run listed; refuse when its interrupted epoch
        had done more iterations than an epoch of the new data holds (there is no place to continue from)."""
        saved, now = ckpt.get("data"), self.data_fingerprint
        if saved is None or saved == now:          # older checkpoints did not save it: not checked
            return
        old_iters = self.cfg.iterations_per_epoch(saved["images"], ckpt.get("args", {}).get("bs", self.global_batch))
        if saved["images"] != now["images"]:
            what = (f"its run listed {saved['images']} images, the data now holds {now['images']} (an epoch is "
                    f"{self.iters_per_epoch} iterations, was {old_iters}; the lr and weight-decay schedules follow)")
        else:
            what = f"the same number of images ({now['images']}) but other files (added, removed or renamed)"
        if ckpt["iteration"] >= self.iters_per_epoch:
            raise ConfigError(f"cannot resume {path} on this data: {what}, and its interrupted epoch had already done "
                              f"{ckpt['iteration']} iterations. Put the data back as it was to resume, or start a "
                              f"new run from its weights with --init_weight {path}")
        self._warn(f"resuming {path} on other data: {what}; each index now draws another image, so it is no longer "
                   f"the run that was interrupted")

    # ------------------------------------------------------------------ one step
    def lr_wd_at(self, global_it: int) -> tuple[float, float]:
        """The schedule's learning rate and weight decay at ``global_it`` (SparK's warm-up, then cosine)."""
        cfg = self.cfg
        return lr_wd_at(global_it, self.peak_lr, cfg.wd, cfg.wde or cfg.wd, cfg.wp_ep * self.iters_per_epoch,
                        self.total_iters)

    def step(self, images: torch.Tensor, global_it: int, stop: Optional[_StopFlag] = None) -> tuple[float, bool]:
        """One optimisation step; ``(loss, stop)`` where ``stop`` says some rank asked to stop after it.

        Every rank learns before backward whether any rank saw a non-finite loss or a stop request
        (``stop``'s flag, read after the forward: a signal that arrives during it stops this step's run),
        so all of them skip (or finish) the same step and stop at the same iteration.
        """
        cfg = self.cfg
        apply_lr_wd(self.optimizer, *self.lr_wd_at(global_it))
        seed = _seed_for(cfg.seed, global_it, self.ctx.rank)
        torch.manual_seed(seed)
        mask = self.spark.mask(images.shape[0], generator=torch.Generator().manual_seed(seed), device=images.device)
        autocast = (torch.autocast(self.ctx.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext())
        with autocast:
            loss = self.model(images, mask)
        loss_value = float(loss.detach())
        finite_here = math.isfinite(loss_value)
        non_finite, stop_after = self.ctx.any_rank(not finite_here, stop is not None and stop.requested)
        if non_finite:
            what = f"loss is {loss_value}" if not finite_here else "loss is not finite on another rank"
            raise TrainingError(f"{what} at epoch {self.state.epoch} iteration {self.state.iteration}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.clip > 0 and cfg.opt != "lamb":          # LAMB clips the global norm itself
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.groups for p in g["params"]], cfg.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss_value, stop_after

    # ------------------------------------------------------------------ the run
    def _epoch_batches(self, epoch: int, skip: int):
        """An iterator over ``epoch``'s batches (skipping ``skip`` iterations when resuming), from the run's
        one DataLoader.

        Its workers persist across epochs (no process start-up per epoch); the sampler is told
        the epoch before each ``iter(loader)``, which is when the DataLoader reads it. Too many workers
        for this machine's CPUs were already warned about, with the fix (torch's warning is muted).
        """
        self.sampler.set_epoch(epoch, skip)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TORCH_WORKER_WARNING, category=UserWarning)
            if self.loader is None:
                workers = self.cfg.dataloader_workers
                self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=workers,
                                         pin_memory=self.ctx.device.type == "cuda", persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers > 0 else None,
                                         worker_init_fn=functools.partial(
                                             _loader_worker_init, folder_lock=self.outputs.held_lock())
                                         if workers > 0 else None)
            return iter(self.loader)

    def _header(self) -> dict:
        git = git_state()
        return {"name": self.cfg.exp_name, "cmd": self.cmd, **git, "git_commit_id": git["git_commit"],     # SparK's
                "model": self.model_name,
                "backend": self.speed.backend, "world_size": self.ctx.world_size, "device": str(self.ctx.device),
                "global_batch": self.global_batch, "lr": self.peak_lr, "iters_per_epoch": self.iters_per_epoch,
                "sync_bn": self.sync_bn, "speed_plan": self.speed.as_dict(), "backend_plan": self.plan,
                "autotune": self.autotune.plan_state(), "autotune_seconds": round(self.autotune.seconds, 2),
                "resumed_from": self.resume_path, "warnings": self.warnings, "args": self.cfg.as_dict(),
                "resolved": self._resolved()}

    def _resolved(self) -> dict:
        """The values the run took for the settings left to SparK's per-model defaults (``args`` holds what was given)."""
        dp = self.cfg.dp if self.cfg.dp is not None else model_default_drop_path(self.model_name)
        return {"dp": dp, "ada": self.beta2, "densify_norm": self.spark.densify_norm_kind}

    def _print_start(self) -> None:
        cfg = self.cfg
        source = "embedded demo photos (scikit-image)" if cfg.data_path is None else str(self.dataset.root)
        print(f"[spark-pretrain] {self.model_name} on {self.speed.backend!r}, {self.ctx.world_size} process(es), "
              f"device {self.ctx.device}, amp {cfg.amp}")
        hidden = self.dataset.hidden_note()
        hidden = f" ({hidden})" if hidden else ""
        print(f"[spark-pretrain] data: {len(self.dataset)} images from {source}{hidden}; global batch "
              f"{self.global_batch}, {self.iters_per_epoch} iterations/epoch, {epochs_text(cfg.ep)}, peak lr "
              f"{self.peak_lr:.3g}")
        resolved = self._resolved()
        print(f"[spark-pretrain] drop path {resolved['dp']:g} (--dp), Adam beta2 {resolved['ada']:g} (--ada), densify "
              f"norm {resolved['densify_norm']}")
        if cfg.sbn and not self.sync_bn and self.ctx.initialized:    # one process has nothing to synchronise
            print(f"[spark-pretrain] --sbn: SyncBatchNorm needs CUDA processes; the {self.ctx.world_size} "
                  f"{self.ctx.device.type} processes use plain BatchNorm")
        print(self.speed.describe())
        if self.autotune.applies:       # per-layer ms follow in the plan, or here when the guard chose masked;
            # the summary is the recipe's backend reason, printed just above
            print(self.autotune.describe() if self.autotune.backend == "masked" else
                  f"{self.autotune.headline()}: what it measured is the backend's reason above")
        print(f"[spark-pretrain] {self.batch_estimate.describe(str(self.ctx.device))} (this run: {self.local_batch})")
        print("[spark-pretrain] backend plan (layer: kernel):")
        for layer, how in self.plan:
            print(f"  {layer:<40} {how}")
        for message in self.warnings:
            print(f"[spark-pretrain] warning: {message}", file=sys.stderr)

    def run(self, max_epochs: Optional[int] = None) -> RunState:
        """Train to ``--ep`` (or for at most ``max_epochs`` more epochs, e.g. within a job's time slot)."""
        cfg = self.cfg
        with _console_recorded(self.capture_console) as printed_now:     # into the backups too
            if self.resume_path and cfg.init_weight:
                print(f"[spark-pretrain] --init_weight {cfg.init_weight} ignored: resuming, the checkpoint's weights "
                      f"continue the run")
            elif self.init_note is not None:
                print(f"[spark-pretrain] initialised from {cfg.init_weight} ({self.init_note})")
            if self.resume_path:
                self.resume(self.resume_path)
        printed = {name: self.printed_before.get(name, "") + printed_now.get(name, "") for name in printed_now}
        fresh = cfg.overwrite and not self.outputs.continues_this_folder(self.resume_path)
        self.outputs.open(fresh=fresh, capture_console=self.capture_console, printed_before=printed)
        self.printed_before = {}                 # in the backups now: a second run() must not repeat it
        try:
            if self.ctx.is_main:
                self._print_start()
            self.outputs.write_header(self._header())
            if cfg.tensorboard and self.ctx.is_main:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(cfg.tensorboard_dir))
            last = cfg.ep if max_epochs is None else min(cfg.ep, self.state.epoch + max_epochs)
            with _StopFlag(announces=self.ctx.is_main) as stop:
                while self.state.epoch < last:
                    self._run_epoch(stop)
            if self.ctx.is_main and self.state.epoch == cfg.ep:
                self._visualise()
                print(f"[spark-pretrain] finished: min loss {self.state.min_loss:.4f}; outputs in {self.outputs.dir}")
            return self.state
        # what ends the run is printed by its caller once the backups are closed (the CLI: the line below): a
        # copy goes into stderr_backup.txt, which must tell how its run ended
        except StopRequested as stop:
            self.outputs.record_in_backup("stderr", f"[spark-pretrain] {stop}\n")
            raise
        except SparkSparseError as err:
            self.outputs.record_in_backup("stderr", f"Error: {err}\n")
            raise
        finally:
            self.loader = None   # stops the persistent loader workers now, not whenever the trainer is collected
            if self.tb is not None:
                self.tb.close()
            self.outputs.close()

    def _run_epoch(self, stop: _StopFlag) -> None:
        cfg, state = self.cfg, self.state
        self.spark.train()
        start_time, seen, resumed_at = time.time(), 0, state.iteration
        stopped_at_epoch_end = False
        batches = _batches(self._epoch_batches(state.epoch, state.iteration))
        # counted by hand, not by iterating the bar: a loop left with break closes tqdm's iterator at the count it
        # had before the step, so a stop in an epoch's last step left the bar at 2/3
        bar = tqdm(total=self.iters_per_epoch, initial=state.iteration, disable=not self.ctx.is_main,
                   desc=f"epoch {state.epoch + 1}/{cfg.ep}", dynamic_ncols=True, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0)
        for images, bad_indices in batches:
            global_it = state.epoch * self.iters_per_epoch + state.iteration
            images = self.normalize(images.to(self.ctx.device, non_blocking=True))
            try:
                loss, stop_now = self.step(images, global_it, stop)
            except TrainingError as err:
                bar.close()   # ends the bar's line: the error is printed below it
                self.save()   # the weights are still those of the last good step
                raise TrainingError(f"{err}; stopped. The last good state is saved in "
                                    f"{self.outputs.still_pretraining_path} (try a lower --base_lr or --clip)") from None
            state.iteration += 1
            seen += images.shape[0] * self.ctx.world_size
            state.loss_sum += loss
            state.unreadable.update(int(i) for i in bad_indices if i >= 0)
            rate = seen / max(time.time() - start_time, 1e-9)
            lr = self.lr_wd_at(global_it)[0]
            # the epoch's mean so far, as the epoch line reports it at the end (a last step's loss differed from it)
            bar.set_postfix(loss=f"{state.loss_sum / state.iteration:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}",
                            refresh=False)
            bar.update()
            if self.tb is not None:
                self.tb.add_scalar("train/loss", loss, global_it)
                self.tb.add_scalar("train/lr", lr, global_it)
            if stop_now:
                if state.iteration == self.iters_per_epoch:
                    stopped_at_epoch_end = True              # close the epoch as usual (log line, checkpoint) first
                    break
                bar.close()
                self.save()
                raise StopRequested(f"stopped after iteration {state.iteration}/{self.iters_per_epoch} of epoch "
                                    f"{state.epoch + 1}/{cfg.ep}; resume with: "
                                    f"{resume_command(self.cmd, self.outputs.still_pretraining_path)}", stop.signum)
        bar.close()
        unreadable = sorted(self.ctx.all_union(state.unreadable))     # each rank read its own share of the data
        if self.ctx.is_main:
            self._report_unreadable(unreadable, state.epoch + 1)
        epoch_loss = self.ctx.all_mean(state.loss_sum / max(state.iteration, 1))   # the whole epoch, resumed or not
        elapsed = time.time() - start_time
        # a resumed epoch ran only part of its iterations here: the estimate is per whole epoch
        seconds_per_epoch = elapsed * self.iters_per_epoch / max(state.iteration - resumed_at, 1)
        state.min_loss = min(state.min_loss, epoch_loss)
        state.epoch, state.iteration, state.loss_sum, state.unreadable = state.epoch + 1, 0, 0.0, set()
        remaining, finish = RunOutputs.eta(seconds_per_epoch, cfg.ep - state.epoch)
        if self.ctx.is_main:      # before the save's lines: they belong to this epoch
            print(f"[spark-pretrain] epoch {state.epoch}/{cfg.ep}: loss {epoch_loss:.4f} (min {state.min_loss:.4f}), "
                  f"{seen / max(elapsed, 1e-9):.1f} images/s, remaining {remaining}, finish @ {finish}")
        self.save(final=state.epoch == cfg.ep)
        self.outputs.log_epoch({"epoch": state.epoch, "loss": epoch_loss, "min_loss": state.min_loss,
                                "lr": self.lr_wd_at(state.epoch * self.iters_per_epoch - 1)[0],
                                "images_per_s": round(seen / max(elapsed, 1e-9), 2),
                                "epoch_seconds": round(elapsed, 2), "remaining": remaining, "finish_time": finish,
                                "unreadable_images": len(unreadable),
                                **({"resumed_at_iteration": resumed_at} if resumed_at else {}),
                                # SparK's own keys for the same values, so that its users' log readers work as they are
                                "cur_ep": f"{state.epoch}/{cfg.ep}", "last_L": epoch_loss, "rema": remaining,
                                "fini": finish})
        self.ctx.barrier()
        if stopped_at_epoch_end and state.epoch < cfg.ep:
            raise StopRequested(f"stopped after epoch {state.epoch}/{cfg.ep}; resume with: "
                                f"{resume_command(self.cmd, self.outputs.still_pretraining_path)}", stop.signum)

    def _report_unreadable(self, unreadable: list[int], epoch: int) -> None:
        """Name each unreadable file once per run (at most :data:`UNREADABLE_NAMED` an epoch, so a broken share
        does not flood the console) and say per epoch how many were replaced and what share of the data that is."""
        if not unreadable:
            return
        new = [index for index in unreadable if index not in self.unreadable_named]
        shown = new[:UNREADABLE_NAMED]
        for index in shown:
            print(f"[spark-pretrain] warning: could not read {self.dataset.describe(index)} "
                  f"({self.dataset.why_unreadable(index)})", file=sys.stderr)
        self.unreadable_named.update(shown)
        named = [f"{len(shown)} named above"]
        if len(new) > len(shown):
            named.append(f"{len(new) - len(shown)} more named in later epochs")
        if len(unreadable) > len(new):
            named.append(f"{len(unreadable) - len(new)} named in an earlier epoch")
        print(f"[spark-pretrain] warning: epoch {epoch}: {len(unreadable)} unreadable image(s), "
              f"{100 * len(unreadable) / len(self.dataset):.2g}% of the data, each replaced by the next readable one "
              f"({', '.join(named)})", file=sys.stderr)

    def _visualise(self) -> None:
        n = min(self.cfg.vis_images, len(self.dataset))
        picks = torch.linspace(0, len(self.dataset) - 1, n).long().tolist()
        images = self.normalize(torch.stack([self.dataset[(index, self.cfg.seed + index)][0] for index in picks]))
        mask = self.spark.mask(n, generator=torch.Generator().manual_seed(self.cfg.seed))
        title = f"{self.model_name}, {self.state.epoch} epochs, min epoch loss {self.state.min_loss:.3f}"
        path = save_reconstruction_grid(self.spark, images.to(self.ctx.device), mask.to(self.ctx.device),
                                        self.outputs.reconstruction_path, title=title)
        print(f"[spark-pretrain] wrote {path}")


def pretrain(cfg: PretrainConfig, cmd: str = "", max_epochs: Optional[int] = None,
             capture_console: bool = False) -> RunState:
    """Run (or resume) a pre-training run; returns the final state.

    ``capture_console``: tee this process's stdout/stderr into the run's ``stdout_backup.txt`` /
    ``stderr_backup.txt`` while it runs (the CLI does; off by default so that a library call
    leaves the caller's ``sys.stdout`` and ``sys.stderr`` alone).

    Under torchrun the process group it joins is left when it returns or fails, so that the process
    can exit cleanly; a group the caller joined before is left to the caller.
    """
    joins_a_group = not in_process_group()      # (a caller's own group is the caller's to leave)
    try:
        try:
            trainer = Trainer(cfg, cmd, capture_console)
        except NothingToTrain as done:
            state = done.state
        else:
            state = trainer.run(max_epochs)
    except BaseException:
        if joins_a_group:
            leave_process_group(failed=True)
        raise
    if joins_a_group:
        leave_process_group()
    return state
