"""Checkpoint files: atomic writes, encoder export, and SparK's released formats.

Formats read:

- a timm-style encoder state dict (our ``<model>_1kpretrained.pth``; SparK's
  ``*_1kpretrained_timm_style.pth``), for ConvNeXt in timm's or in the official FB layout;
- SparK's ``*_withdecoder_1kpretrained_spark_style.pth``: ``{"module": SparK state dict (+ "config"), ...}``;
- our ``<model>_still_pretraining.pth``: ``{"model": SparK state dict, ...}``.

Every load checks what it finds and says what it expected when the file is not a checkpoint or is
of another model.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .decoder import SPARK_DECODER_WIDTH
from .errors import SparkSparseError
from .models.model_kwargs import format_model_kwargs

__all__ = ["CheckpointError", "atomic_save", "read_checkpoint", "convnext_fb_to_timm", "convnext_timm_to_fb",
           "is_fb_convnext", "load_encoder_state", "load_spark_state", "load_pretrained", "saved_decoder_width",
           "spark_state_from_official"]

PathLike = Union[str, os.PathLike]


class CheckpointError(SparkSparseError, ValueError):
    pass


def new_file_mode() -> int:
    """What ``open`` gives a new file (0o666 less the umask); mkstemp's 0o600 would hide checkpoints from the
    rest of a shared cluster's group, unlike the run's other files."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or Ctrl-C during the write leaves the previous file intact, never a truncated one. A
    process killed outright (SIGKILL, a pre-empted node) cannot remove its temporary file: the next
    save of ``path`` does, so checkpoint-sized leftovers do not pile up over restarts. A write that
    fails for lack of space says so (torch's own message names a file position).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):     # one writer per file: ours
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, (OSError, RuntimeError)) and _disk_full(path.parent)   # before our file goes
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise CheckpointError(f"could not write {path}: its disk is full ({type(err).__name__}: "
                                  f"{(str(err).strip().splitlines() or [''])[0]}); free some space (the previous "
                                  f"file, if any, is intact)") from err
        raise
    return path


def _disk_full(folder: Path, below: int = 64 * 2**20) -> bool:
    try:
        return shutil.disk_usage(folder).free < below
    except OSError:
        return False


def _unreadable(path: Path, exc: Exception) -> str:
    # the first line; the rest is torch's advice. Its weights-only unpickler's own words follow "error:"
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
    reason = unpickler.group(1) if unpickler else (str(exc).strip().splitlines() or [""])[0]
    return (f"{str(path)!r} is not a readable PyTorch checkpoint (expected a file written by torch.save, e.g. a "
            f"run's <model>_still_pretraining.pth or <model>_1kpretrained.pth): {type(exc).__name__}: {reason}")


def read_checkpoint(path: PathLike) -> dict:
    """Load a checkpoint file on the CPU, with a clear error when it is missing or not a checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder, not a checkpoint file (a run's folder holds "
                              f"<model>_still_pretraining.pth and <model>_1kpretrained.pth)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:            # torch says only "EOFError: " of it
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): a copy or download that did not "
                              f"finish, or a file created but never written (this package saves atomically)")
    try:
        # weights only: unpickling arbitrary objects can run code hidden in the file (released checkpoints come
        # from third parties); this package's files, SparK's, timm's and torchvision's hold tensors and plain values
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found is None:                                        # a damaged file, not a foreign object
            raise CheckpointError(_unreadable(path, exc)) from exc
        what = f" (e.g. {found.group(1)})"
        raise CheckpointError(f"{str(path)!r} holds Python objects besides tensors and plain values{what}, which are "
                              f"not unpickled: unpickling can run code hidden in the file. If you trust it, save "
                              f"its weights alone and pass that file: torch.save(torch.load(path, "
                              f"weights_only=False)['model'], 'weights.pth') (or the key that holds them)") from exc
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(_unreadable(path, exc)) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, expected a dict (a state dict or a "
                              f"checkpoint with 'model' / 'module' keys)")
    return obj


# ---------------------------------------------------------------------- ConvNeXt key layouts
_FB_TO_TIMM = [
    (r"^downsample_layers\.0\.0\.", "stem.0."),
    (r"^downsample_layers\.0\.1\.", "stem.1."),
    (r"^downsample_layers\.(\d+)\.(\d+)\.", r"stages.\1.downsample.\2."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.(norm|gamma)", r"stages.\1.blocks.\2.\3"),
    (r"^norm\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
_TIMM_TO_FB = [
    (r"^stem\.(\d+)\.", r"downsample_layers.0.\1."),
    (r"^stages\.(\d+)\.downsample\.(\d+)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.(norm|gamma)", r"stages.\1.\2.\3"),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]


def _rename(state: dict, rules: list[tuple[str, str]]) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            new_key, n = re.subn(pattern, repl, key)
            if n:
                key = new_key
                break
        out[key] = value
    return out


def is_fb_convnext(state: dict) -> bool:
    return any(k.startswith("downsample_layers.") for k in state)


def convnext_fb_to_timm(state: dict) -> dict:
    """Official FB ConvNeXt (and SparK's) keys -> timm's. ``gamma`` has the same shape in both."""
    return _rename(state, _FB_TO_TIMM)


def convnext_timm_to_fb(state: dict) -> dict:
    """timm ConvNeXt keys -> the official FB layout SparK's ConvNeXt uses."""
    return _rename(state, _TIMM_TO_FB)


# ---------------------------------------------------------------------- loading into a SparK model
def _strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _describe_mismatch(missing, unexpected, shape_errors) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys (e.g. {', '.join(list(missing)[:4])})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(list(unexpected)[:4])})")
    if shape_errors:
        parts.append(f"{len(shape_errors)} shape mismatches (e.g. {'; '.join(shape_errors[:3])})")
    return ", ".join(parts)


def _load_checked(module: nn.Module, state: dict, what: str, optional_missing: tuple[str, ...] = ()) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(optional_missing)]
    unexpected = [k for k in state if k not in own]
    shape_errors = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shape_errors:
        raise CheckpointError(f"{what} does not fit this model: {_describe_mismatch(missing, unexpected, shape_errors)}")
    module.load_state_dict(state, strict=False)


def load_encoder_state(spark: nn.Module, state: dict, what: str = "encoder weights") -> list[str]:
    """Load a timm-style (or FB ConvNeXt) encoder state dict into ``spark.encoder``; returns the keys of a
    classification checkpoint's classifier, which are left out (the encoder has none)."""
    if is_fb_convnext(state):
        state = convnext_fb_to_timm(state)
    target = getattr(spark.encoder, "model", spark.encoder)   # timm encoders keep the timm model in .model
    classifier = _classifier_keys(target, state)
    state = {k: v for k, v in state.items() if k not in classifier}
    # SparK's ConvNeXt has no classifier norm when num_classes=0: keep ours then.
    _load_checked(target, state, what, optional_missing=("head.norm.",))
    return classifier


def _classifier_keys(model: nn.Module, state: dict) -> list[str]:
    """Keys of ``state`` under the classifier timm names for ``model`` (``fc``, ``head.fc``, ...) that the model,
    built without one, lacks; none for a model timm did not build."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    own = model.state_dict()
    return [k for k in state if k not in own and any(k.startswith(f"{name}.") for name in names)]


#: the first parts of the keys of SparK's own model that :func:`spark_state_from_official` converts
_OFFICIAL_PREFIXES = ("sparse_encoder.sp_cnn.", "dense_decoder.", "densify_norms.", "densify_projs.", "mask_tokens.")
#: the entries of SparK's ``SparK.state_dict(with_config=True)`` that are not weights
_OFFICIAL_NON_WEIGHTS = ("config", "imn_m", "imn_s", "norm_black")


def spark_state_from_official(module_state: dict) -> dict:
    """SparK's own ``SparK.state_dict()`` keys -> this library's ``SparK`` keys (encoder left timm-side).

    SparK's non-weight entries are dropped. Any other key that none of SparK's prefixes places is kept under
    its own name, so the checked load reports it as unexpected: dropped, a file of another layout was
    refused naming only the keys the model missed, never the file's own."""
    state = {k: v for k, v in module_state.items() if k not in _OFFICIAL_NON_WEIGHTS}
    out = {k: v for k, v in state.items() if not k.startswith(_OFFICIAL_PREFIXES)}
    encoder = _strip_prefix(state, "sparse_encoder.sp_cnn.")
    if is_fb_convnext(encoder):
        encoder = convnext_fb_to_timm(encoder)
    out.update({f"encoder.model.{k}": v for k, v in encoder.items()})
    out.update({f"decoder.{k}": v for k, v in _strip_prefix(state, "dense_decoder.").items()})
    for prefix in ("densify_norms.", "densify_projs.", "mask_tokens."):
        out.update({prefix + k: v for k, v in _strip_prefix(state, prefix).items()})
    return out


def load_spark_state(spark: nn.Module, state: dict, what: str = "SparK weights") -> None:
    """Load a whole SparK state dict (encoder, decoder, densify layers, mask tokens), checked."""
    _load_checked(spark, state, what, optional_missing=("encoder.model.head.norm.",))


#: the first parts of a whole SparK model's keys (an encoder's alone never start with these)
_SPARK_PREFIXES = ("encoder.", "decoder.", "densify_norms.", "densify_projs.", "mask_tokens.")


def _built_otherwise(ckpt: dict, model_name: Optional[str], model_kwargs: Optional[dict]) -> str:
    """Why a spark-sparse checkpoint may not fit: the model and ``--model_kwargs`` its run recorded, set against
    this run's (when known), with the options that build the same model; '' when the file records neither."""
    saved_name, saved_kwargs = ckpt.get("model_name"), (ckpt.get("args") or {}).get("model_kwargs") or {}
    if not isinstance(saved_name, str) or not isinstance(saved_kwargs, dict):
        return ""
    saved = f"{saved_name} built with {format_model_kwargs(saved_kwargs) or 'its defaults'}"
    if model_name is None or (model_name == saved_name and model_kwargs == saved_kwargs):
        return f"; it was saved by a run of {saved}"
    this = f"{model_name} with {format_model_kwargs(model_kwargs or {}) or 'its defaults'}"
    options = [f"--model={saved_name}"] if saved_name != model_name else []
    options.append(format_model_kwargs(saved_kwargs, as_options=True) or "no --model_kwargs")
    return f"; it was saved by a run of {saved}, this run builds {this}: to start from it, give {' '.join(options)}"


def saved_decoder_width(ckpt: dict) -> int:
    """The decoder width of a checkpoint's run (spark-sparse), else SparK's 768 (older runs, SparK's own files,
    whose ``args`` is a string)."""
    args = ckpt.get("args")
    return args.get("decoder_width", SPARK_DECODER_WIDTH) if isinstance(args, dict) else SPARK_DECODER_WIDTH


def _decoder_otherwise(ckpt: dict, spark: nn.Module) -> str:
    """A checkpoint's decoder width against ``spark``'s, and the option that builds the checkpoint's."""
    saved = saved_decoder_width(ckpt)
    width = getattr(getattr(spark, "decoder", None), "width", None)
    if width is None or saved == width:
        return ""
    return f"; its decoder is {saved} wide, this run's {width}: give --decoder_width {saved}"


def load_pretrained(spark: nn.Module, path: PathLike, model_name: Optional[str] = None,
                    model_kwargs: Optional[dict] = None) -> str:
    """Initialise ``spark`` from any supported file (``--init_weight``); returns the format found.

    ``model_name`` and ``model_kwargs``, what ``spark`` was built as, let the refusal of a spark-sparse checkpoint
    that does not fit say which model and ``--model_kwargs`` would (the file records its run's)."""
    ckpt = read_checkpoint(path)
    model = ckpt.get("model")
    if isinstance(model, dict) and any(k.startswith(_SPARK_PREFIXES) for k in model):
        try:
            load_spark_state(spark, model, f"{path} (spark-sparse checkpoint)")
        except CheckpointError as err:
            raise CheckpointError(f"{err}{_built_otherwise(ckpt, model_name, model_kwargs)}"
                                  f"{_decoder_otherwise(ckpt, spark)}") from None
        return "spark-sparse"
    if isinstance(ckpt.get("module"), dict):
        try:
            load_spark_state(spark, spark_state_from_official(ckpt["module"]), f"{path} (SparK spark-style checkpoint)")
        except CheckpointError as err:        # SparK's decoder is always SparK's width
            raise CheckpointError(f"{err}{_decoder_otherwise(ckpt, spark)}") from None
        return "spark-style"
    # an encoder's weights: bare (timm, ours), under 'model' (the official ConvNeXt releases) or under
    # 'state_dict' (timm's train.py; 'module.' prefixed when saved from DistributedDataParallel)
    held, where = next(((ckpt[key], f"'{key}' ") for key in ("model", "state_dict") if isinstance(ckpt.get(key), dict)),
                       (ckpt, ""))
    tensors = {k: v for k, v in held.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = _strip_prefix(tensors, "module.")
    if not tensors:
        raise CheckpointError(f"{path} has neither 'model', 'module' nor 'state_dict' keys nor tensors; keys found: "
                              f"{', '.join(list(ckpt)[:8])}")
    left_out = load_encoder_state(spark, tensors, f"{path} ({where}timm-style encoder)")
    return f"{where}timm-style encoder" + (f", its classifier left out ({', '.join(left_out)})" if left_out else "")
