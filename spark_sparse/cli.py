"""``spark-pretrain``: SparK's pre-training command, with SparK's argument names and defaults.

SparK's spellings (``--data_path=...``) and dashed ones (``--data-path ...``) both work, as do
SparK's older aliases (``--model=res50``, ``--resume=PATH``, ``--sparse_conv=1``). With several
processes requested through SparK's launch flags (``--ngpu_per_node``, ``--num_nodes``, ...) the
command re-launches itself under ``torch.distributed.run``; under ``torchrun`` it just joins.

Errors: a :class:`~spark_sparse.errors.SparkSparseError` (bad data, checkpoint, backend, model,
device or settings) is printed as ``Error: <what and the fix>`` with exit status 1; anything else
is a bug or an environment failure and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import click

from .autotune import MODES
from .backends import UnknownBackendError, get_backend_class, list_backends, recommended_sparse_backend
from .decoder import SPARK_DECODER_WIDTH
from .errors import SparkSparseError
from .models import UnknownModelError, list_models, resolve_model_name
from .speed import RECIPES
from .train.config import DEMO_DEFAULTS, PretrainConfig
from .train.distributed import stop_when_launcher_dies, under_torchrun
from .train.outputs import without_flags
from .user_modules import UserModuleError, import_user_module

__all__ = ["launch_command", "main", "pretrain_command"]

_SPARK_DEFAULTS = PretrainConfig()


def _opt(name: str, *aliases: str, **kwargs):
    """An option under SparK's underscore name, its dashed twin and any aliases."""
    dashed = name.replace("_", "-")
    names = [f"--{name}"] + ([f"--{dashed}"] if dashed != name else []) + [f"--{a}" for a in aliases]
    kwargs.setdefault("show_default", True)
    return click.option(*names, name, **kwargs)


def _computed_at_run_time(name: str, why: str, **kwargs):
    """A hidden option for a setting SparK's ``Args`` lists but computes at run time: given, it is refused with
    ``why`` (the rule) instead of being overwritten in silence (as SparK does) or unknown (as click would say)."""
    def refuse(ctx, param, value) -> None:
        if value is not None:
            raise click.UsageError(f"--{name} is set at run time: {why}")
    return _opt(name, default=None, hidden=True, expose_value=False, callback=refuse, **kwargs)


class _HelpAtDisplayOption(click.Option):
    """An option whose help is computed when ``--help`` is shown, not when the module is imported.

    The backend list says which backends are available, which imports spconv and MinkowskiEngine:
    only ``--help`` (or an unknown ``--backend``) should pay for that.
    """

    def __init__(self, *args, help_factory, **kwargs):
        super().__init__(*args, **kwargs)
        self._help_factory = help_factory

    def get_help_record(self, ctx):
        self.help = self._help_factory()
        return super().get_help_record(ctx)


def _backend_help() -> str:
    listed = "; ".join(f"{b.name}{'' if b.available else ' (unavailable: ' + b.reason + ')'}" for b in list_backends())
    return f"encoder backend; default: the recipe's. {listed}"


def _validate_backend(ctx, param, value: Optional[str]) -> Optional[str]:
    """Check the named backend only (checking all would import every optional library)."""
    if value is None:
        return None
    try:
        available, reason = get_backend_class(value).availability()
    except UnknownBackendError as err:
        raise click.BadParameter(str(err)) from None
    if not available:
        lines = "\n".join(f"  {b}" for b in list_backends())
        raise click.BadParameter(f"unavailable backend {value!r}: {reason}. Backends:\n{lines}")
    return value


def _import_user_modules(ctx, param, value: tuple[str, ...]) -> tuple[str, ...]:
    """Import the user's modules first (an eager option), so that ``--model`` can name what they register."""
    for spec in value:
        try:
            import_user_module(spec)
        except UserModuleError as err:
            raise click.BadParameter(str(err)) from None
        except SparkSparseError as err:     # this package refused what the module registers: no traceback needed
            raise click.BadParameter(f"importing {spec}: {err}") from None
    return value


def _validate_model(ctx, param, value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    try:
        return resolve_model_name(value)
    except UnknownModelError as err:
        raise click.BadParameter(f"{err}. A model of your own: register it with @spark_sparse.register_model in a "
                                 f"module and pass --import_module MODULE_OR_FILE.py") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110})
@click.argument("exp_name", required=False)
@click.option("--exp_name", "--exp-name", "exp_name_opt",
              help="the run's name (SparK's flag; or the EXP_NAME argument); default: the model's name (demo: demo)")
@_opt("exp_dir", help="output folder (default: output_<exp_name>)")
@_opt("data_path", help="image folder (uses <data_path>/train if present); omitted: embedded demo photos")
@_opt("import_module", multiple=True, is_eager=True, callback=_import_user_modules, show_default=False,
      help="import this Python module first (a dotted name found in the current folder or the environment, or a "
           "path to a .py file): your encoders registered with @spark_sparse.register_model, their blocks and layers; "
           "repeatable")
@_opt("model", callback=_validate_model, help=f"encoder ({', '.join(list_models())}); default resnet50, "
                                             f"or {DEMO_DEFAULTS['model']} for the demo")
@_opt("model_kwargs", multiple=True, show_default=False, metavar="KEY=VALUE",
      help="an argument of the model's constructor, as timm's --model-kwargs (the value read as a Python literal, "
           "else as a string), e.g. --model_kwargs img_size=192 --model_kwargs window_size=6 (or both in one quoted "
           "value); repeatable. Part of the run: a resume repeats them, and the exported encoder loads into "
           "timm.create_model(model, num_classes=0, **these)")
@_opt("input_size", type=int, help="image size (multiple of 32); default 224 (demo: 96)")
@_opt("mask", type=float, help="mask ratio; default 0.6")
@_opt("bs", type=int, help="global batch size over all processes; default 4096 (demo: 32)")
@_opt("ep", type=int, help="epochs; default 1600 (demo: 10)")
@_opt("wp_ep", type=float, help="warm-up epochs; default 40 (demo: 1)")
@_opt("base_lr", type=float, help="lr = base_lr * global batch / 256; default 2e-4 (demo: 1e-2)")
@_opt("wd", type=float, default=_SPARK_DEFAULTS.wd, help="initial weight decay")
@_opt("wde", type=float, default=_SPARK_DEFAULTS.wde, help="final weight decay (cosine); 0 = same as --wd")
@_opt("clip", type=float, default=_SPARK_DEFAULTS.clip, help="gradient norm clip (<= 0: off)")
@_opt("opt", type=click.Choice(["lamb", "adamw", "sgd"], case_sensitive=False), default="lamb",
      help="optimizer (SparK: lamb)")
@_opt("ada", type=float, default=0.0,
      help="Adam beta2; 0 = SparK's by the densify norm: 0.95 for BatchNorm nets (ResNet), 0.999 for LayerNorm "
           "ones (ConvNeXt, attention nets)")
@_opt("dp", type=float, default=None, help="drop-path rate; default: SparK's for the model")
@_opt("sbn", type=bool, default=True, help="SyncBatchNorm when several CUDA processes run")
@_opt("decoder_width", type=int, default=SPARK_DECODER_WIDTH,
      help="the light decoder's width at its coarsest level, halved at each level (SparK: 768; a narrower one, "
           "e.g. 256 for a ResNet-18, makes the dense decoder's share of each step smaller)")
@_opt("dataloader_workers", type=int, help="loader processes per training process; default 8 (demo: 2)")
@_opt("init_weight", help="initialise weights from a checkpoint (ours, SparK's spark-style or timm-style)")
@_opt("resume_from", "resume", help="resume a run from its <model>_still_pretraining.pth; 'auto': from the output "
                                   "folder's one if it exists, else start a new run")
@_opt("overwrite", is_flag=True, default=False,
      help="start over in an output folder that holds another run (deletes its log and checkpoints first); "
           "without it such a folder is refused")
@_opt("backend", callback=_validate_backend, cls=_HelpAtDisplayOption, help_factory=_backend_help)
@_opt("sparse_conv", type=int, default=0, help="SparK's old flag: 1 selects the recommended true-sparse backend")
@_opt("strict_backend", is_flag=True, default=False, help="a layer the backend's preferred kernel cannot run is an error")
@_opt("autotune", type=click.Choice(MODES), default=_SPARK_DEFAULTS.autotune,
      help="backend auto: on = time every kernel per layer before the first step (results cached in the user cache "
           "folder, SPARK_SPARSE_CACHE_DIR), cached = the cache only, off = the static rule")
@_opt("autotune_budget", type=float, default=_SPARK_DEFAULTS.autotune_budget,
      help="seconds of per-layer measurement at most; layers left keep the static rule (the whole-encoder guard "
           "then times the tuned, static and masked encoders, a few steps each, outside this budget)")
@_opt("autotune_memory", type=click.FloatRange(min=0), default=_SPARK_DEFAULTS.autotune_memory,
      help="most the tuned step's peak memory may be, as a multiple of masked's (one forward and backward of each "
           "plan measured before training; layers move to kernels that hold less until it fits); 0 = no limit")
@_opt("recipe", type=click.Choice(RECIPES), default="fast",
      help="spark: SparK's exact recipe (masked, NCHW, fp32); fast: every option that keeps the fp32 maths")
@_opt("channels_last", type=bool, default=None, help="NHWC dense parts (default: the recipe's)")
@_opt("compile", type=bool, default=None, help="torch.compile the decoder (default: the recipe's)")
@_opt("foreach_optimizer", type=bool, default=None,
      help="multi-tensor (foreach) optimizer updates (default: the recipe's)")
@_opt("grad_ckpt", is_flag=True, default=False, help="recompute decoder blocks in backward to save memory")
@_opt("device", default="auto", help="auto, cpu, cuda or cuda:N")
@_opt("amp", type=click.Choice(["none", "bf16", "fp16"]), default="none", help="mixed precision (SparK: none)")
@_opt("seed", type=int, default=0, help="seeds the initial weights, masks, augmentation and data order")
@_opt("tensorboard", is_flag=True, default=False, help="write TensorBoard logs to <exp_dir>/tensorboard_log")
@_opt("tb_lg_dir", help="SparK's TensorBoard folder: write TensorBoard logs there (turns --tensorboard on)")
@_opt("local_rank", type=int, default=None, hidden=True, expose_value=False,
      help="what torch.distributed.launch adds to each process's arguments; the rank is read from its environment")
@_computed_at_run_time("lr", "the peak lr is --base_lr x global batch / 256 (SparK's rule): give --base_lr",
                       type=float)
@_computed_at_run_time("batch_size_per_gpu", "it is --bs (the global batch) / processes, as SparK sets it: give --bs",
                       type=int)
@_computed_at_run_time("glb_batch_size", "it is --bs rounded down to a multiple of the process count, as SparK sets "
                                         "it: give --bs", type=int)
@_computed_at_run_time("densify_norm", "it follows the model, as SparK sets it (LayerNorm for nets with LayerNorm and no "
                                       "BatchNorm, BatchNorm otherwise; your own encoder may set a densify_norm "
                                       "attribute, 'ln' or 'bn')")
@_computed_at_run_time("log_txt_name", "it is <exp_dir>/pretrain_log.txt, as SparK sets it: give --exp_dir")
@_computed_at_run_time("cmd", "the log's header records the command line that ran")
@_computed_at_run_time("commit_id", "the log's header records the code's git commit (git_commit, git_commit_id)")
@_computed_at_run_time("commit_msg", "the log's header records the code's git commit (git_commit, git_commit_id)")
@_opt("num_nodes", type=int, default=1, help="SparK launch flag: nodes")
@_opt("ngpu_per_node", type=int, default=1, help="SparK launch flag: processes per node")
@_opt("node_rank", type=int, default=0, help="SparK launch flag: this node's rank")
@_opt("master_address", default="127.0.0.1", help="SparK launch flag: rendezvous host")
@_opt("master_port", type=int, default=29500, help="SparK launch flag: rendezvous port")
def pretrain_command(exp_name: Optional[str], exp_name_opt: Optional[str], num_nodes: int, ngpu_per_node: int,
                     node_rank: int, master_address: str, master_port: int, sparse_conv: int, **options) -> None:
    """Pre-train a CNN with SparK. EXP_NAME names the output folder output_<EXP_NAME>/."""
    if exp_name and exp_name_opt and exp_name != exp_name_opt:
        raise click.UsageError(f"two names for the run: EXP_NAME {exp_name!r} and --exp_name {exp_name_opt!r}")
    if exp_name and options["model_kwargs"] and _looks_like_a_model_kwarg(exp_name):
        raise click.UsageError(f"EXP_NAME {exp_name!r} looks like a constructor argument that followed "
                               f"--model_kwargs: give each its own --model_kwargs, or several in one quoted value "
                               f"(--model_kwargs \"img_size=192 window_size=6\")")
    exp_name = exp_name or exp_name_opt
    launch = [("--num_nodes", num_nodes, num_nodes >= 1, "at least 1"),
              ("--ngpu_per_node", ngpu_per_node, ngpu_per_node >= 1, "at least 1 process per node"),
              ("--node_rank", node_rank, 0 <= node_rank < max(num_nodes, 1), f"from 0 to --num_nodes - 1 "
                                                                          f"({max(num_nodes, 1) - 1})")]
    for flag, value, ok, rule in launch:       # a wrong rank would wait in the rendezvous for ever
        if not ok:
            raise click.BadParameter(f"{value}: must be {rule}", param_hint=flag)
    if (num_nodes > 1 or ngpu_per_node > 1) and not under_torchrun():
        _relaunch(num_nodes, ngpu_per_node, node_rank, master_address, master_port)
        return
    if sparse_conv:
        if options["backend"] is not None:
            raise click.UsageError("--sparse_conv=1 selects a backend: do not combine it with --backend")
        options["backend"] = recommended_sparse_backend()
    demo = options["data_path"] is None
    demo_defaults = {key: value for key, value in DEMO_DEFAULTS.items() if demo and options.get(key) is None}
    options.update(demo_defaults)
    for key in ("model", "input_size", "mask", "bs", "ep", "wp_ep", "base_lr", "dataloader_workers"):
        if options.get(key) is None:
            options[key] = getattr(_SPARK_DEFAULTS, key)
    if demo and int(os.environ.get("RANK", 0)) == 0:        # once, not once per process
        defaults = f" with demo defaults {', '.join(f'{k}={v}' for k, v in demo_defaults.items())}" if demo_defaults else ""
        click.echo(f"[spark-pretrain] no --data_path: pre-training on the embedded demo photos{defaults}", err=True)
    exp_name = exp_name or ("demo" if demo else options["model"])
    from .train.engine import StopRequested, pretrain
    if under_torchrun():
        stop_when_launcher_dies()
    try:
        with _sigterm_interrupts():
            cfg = PretrainConfig(exp_name=exp_name, demo=demo, **options)
            pretrain(cfg, cmd=launch_command(sys.argv), capture_console=True)
    except StopRequested as stop:
        if int(os.environ.get("RANK", 0)) == 0:          # every rank stops at the same step: said once
            click.echo(f"[spark-pretrain] {stop}", err=True)
        sys.exit(128 + stop.signum)         # 130 after Ctrl-C, 143 after SIGTERM, as a killed process reports
    except KeyboardInterrupt as stop:    # outside the training steps (setup, kernel tuning) or a second Ctrl-C
        signum = getattr(stop, "signum", signal.SIGINT)
        click.echo(f"\n[spark-pretrain] {signal.Signals(signum).name} received outside the training steps (setup, "
                   f"kernel tuning) or a second Ctrl-C: stopped without saving a checkpoint (any written before is "
                   f"whole: checkpoints are replaced atomically)", err=True)
        sys.exit(128 + signum)
    except SparkSparseError as err:      # the user's to fix, and the message says how: no traceback
        raise click.ClickException(str(err)) from None


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the training steps, raised like Ctrl-C's KeyboardInterrupt (``signum`` says which)."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM ends the process with a message, as Ctrl-C does, where the training loop does not catch it (it
    installs its own handlers, which save a checkpoint, while it runs); Python's default ends it in silence."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise _Terminated()
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)




def _looks_like_a_model_kwarg(word: str) -> bool:
    """timm's ``--model-kwargs a=1 b=2`` takes several words; click gives ``b=2`` to EXP_NAME instead."""
    key, sep, _ = word.partition("=")
    return bool(sep) and key.isidentifier()


def launch_command(argv: list[str]) -> str:
    """The command that started this process, as it can be typed again (the log's ``cmd``, the folder guard's
    "continue it" line): ``<this python> -m spark_sparse.cli`` for the module run, whose ``argv[0]`` is this file
    (not executable), and under torchrun its launch flags in front, so that a resume runs as many processes."""
    words = list(argv[1:])
    program = Path(argv[0]) if argv else Path("spark-pretrain")
    if under_torchrun():                                   # a console script too: torchrun runs the module
        local, world = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), int(os.environ["WORLD_SIZE"])
        prefix = [_beside_python("torchrun"), f"--nnodes={max(world // max(local, 1), 1)}", f"--nproc_per_node={local}"]
        if world > local:
            prefix += [f"--node_rank={os.environ.get('GROUP_RANK', 0)}",
                       f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
                       f"--master_port={os.environ.get('MASTER_PORT', 29500)}"]
        prefix += ["-m", "spark_sparse.cli"]
    elif program.resolve() == Path(__file__).resolve():
        prefix = [sys.executable or "python", "-m", "spark_sparse.cli"]
    else:
        prefix = [str(program)]
    return shlex.join(prefix + words)


def _beside_python(script: str) -> str:
    """``script`` by its path in this interpreter's ``bin`` folder when it is there: a command pasted from a log
    or a refusal then runs in this environment even where it is not activated (a console script is
    logged by its path, as the shell found it)."""
    path = Path(sys.executable).parent / script if sys.executable else None
    return str(path) if path is not None and path.is_file() else script


def _relaunch(num_nodes: int, nproc: int, node_rank: int, address: str, port: int) -> None:
    from torch.distributed import run as torchrun

    passthrough = without_flags(sys.argv[1:], valued=("num_nodes", "ngpu_per_node", "node_rank", "master_address",
                                                      "master_port"))
    args = [f"--nnodes={num_nodes}", f"--nproc_per_node={nproc}", f"--node_rank={node_rank}",
            f"--master_addr={address}", f"--master_port={port}", "-m", "spark_sparse.cli", *passthrough]
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    click.echo(f"[spark-pretrain] launching {num_nodes}x{nproc} processes: torchrun {' '.join(args)}", err=True)
    try:
        torchrun.main(args)
    except ChildFailedError as failed:     # each process printed its own error: one line here, not a traceback
        click.echo(f"[spark-pretrain] {_describe_failures(failed)}", err=True)
        sys.exit(_exit_status(failed.get_first_failure()[1].exitcode))
    except SignalException as stopped:     # torchrun passed the signal on: the processes saved and said so above
        click.echo(f"[spark-pretrain] {stopped.sigval.name} received: the processes were stopped (a running run "
                   f"saves its checkpoint first and prints how to resume it)", err=True)
        sys.exit(128 + int(stopped.sigval))


def _exit_status(exitcode: int) -> int:
    """A process's status as a shell reports it: a signal's as 128 + its number, a failure as at least 1."""
    return 128 - exitcode if exitcode < 0 else max(exitcode, 1)


def _describe_failures(failed) -> str:
    """torchrun's ``ChildFailedError`` in one line: which process failed first, and how the others ended (torchrun
    stops the rest with SIGTERM once one has failed)."""
    first_rank, first = failed.get_first_failure()
    others = [f"rank {rank} ({_status_words(failure.exitcode)})" for rank, failure in sorted(failed.failures.items())
              if rank != first_rank]
    also = f"; also ended: {', '.join(others)}" if others else ""
    return f"rank {first_rank} failed first ({_status_words(first.exitcode)}): its error above says why{also}"


def _status_words(exitcode: int) -> str:
    if exitcode >= 0:
        return f"exit status {exitcode}"
    if exitcode == -signal.SIGTERM:
        return "SIGTERM: stopped by torchrun"
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def main() -> None:
    pretrain_command()


if __name__ == "__main__":
    main()
