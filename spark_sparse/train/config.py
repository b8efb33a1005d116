"""One dataclass holds every setting of a pre-training run (SparK's arguments plus ours)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..decoder import SPARK_DECODER_WIDTH, check_decoder_width, decoder_width_rule
from ..errors import ConfigError
from ..mask import kept_patches_per_image
from ..models.model_kwargs import check_literal_model_kwargs, parse_model_kwargs

__all__ = ["PretrainConfig", "DEMO_DEFAULTS"]

#: what replaces SparK's ImageNet defaults when no --data_path is given (explicit flags still win)
DEMO_DEFAULTS = dict(model="resnet18", input_size=96, bs=32, ep=10, wp_ep=1, base_lr=1e-2, mask=0.6,
                     dataloader_workers=2)

#: SparK's mask patch: every encoder's downsample ratio (feature maps at strides 4, 8, 16 and 32)
PATCH = 32

#: create_spark's own arguments, which --model_kwargs cannot pass to the model's constructor
_SPARK_OWN_ARGUMENTS = dict(drop_path_rate="--dp", input_size="--input_size", mask_ratio="--mask",
                            backend="--backend", sync_bn="--sbn", strict_backend="--strict_backend",
                            decoder_width="--decoder_width", model="--model")


#: the settings that are real numbers: nan and infinity are refused (an infinite --base_lr made a nan loss at step 1)
_FLOAT_SETTINGS = ("mask", "wp_ep", "base_lr", "wd", "wde", "clip", "ada", "dp", "autotune_budget", "autotune_memory")


def _decoder_width_or_none(width: object) -> Optional[int]:
    """``width`` as an int (numpy's too: a sweep script's) if the decoder can take it at SparK's patch size, else
    ``None`` (the refusal below names the flag)."""
    try:
        return check_decoder_width(PATCH, width)
    except ConfigError:
        return None


@dataclass
class PretrainConfig:
    exp_name: Optional[str] = None        # default: the model's name (the output folder is output_<exp_name>)
    exp_dir: Optional[str] = None
    data_path: Optional[str] = None
    model: str = "resnet50"
    model_kwargs: dict = field(default_factory=dict)   # the model constructor's arguments (img_size=192, ...)
    import_module: tuple[str, ...] = ()   # the user's modules that register models (dotted names or .py paths)
    input_size: int = 224
    mask: float = 0.6
    bs: int = 4096
    ep: int = 1600
    wp_ep: float = 40
    base_lr: float = 2e-4
    wd: float = 0.04
    wde: float = 0.2
    clip: float = 5.0
    opt: str = "lamb"
    ada: float = 0.0
    dp: Optional[float] = None
    sbn: bool = True
    decoder_width: int = SPARK_DECODER_WIDTH
    dataloader_workers: int = 8
    init_weight: Optional[str] = None
    resume_from: Optional[str] = None     # a still_pretraining.pth, or 'auto': this run's folder's if present
    overwrite: bool = False               # start over in a folder that holds another run (deletes its files)
    backend: Optional[str] = None
    strict_backend: bool = False
    autotune: str = "on"                  # backend 'auto': on (cache + measure the rest), cached, off (static rule)
    autotune_budget: float = 60.0         # seconds of per-layer measurement at most (the guard comes on top)
    autotune_memory: float = 1.0          # most the tuned step's peak may be, x masked's (0: no limit)
    device: str = "auto"
    amp: str = "none"
    seed: int = 0
    tensorboard: bool = False
    tb_lg_dir: Optional[str] = None       # SparK's TensorBoard folder: given, TensorBoard is on and writes there
    recipe: str = "fast"
    channels_last: Optional[bool] = None
    compile: Optional[bool] = None
    foreach_optimizer: Optional[bool] = None
    grad_ckpt: bool = False
    demo: bool = False
    vis_images: int = 4

    def __post_init__(self):
        """Refuse values no run can use, before anything is built or written (the CLI prints one line); a run
        named nothing is named after its model, as on the command line; one module to import may be a string, and the
        model's constructor arguments may be ``KEY=VALUE`` words (as ``--model_kwargs`` takes them)."""
        if self.exp_name is None:
            self.exp_name = self.model
        for name in ("resume_from", "init_weight", "tb_lg_dir"):
            if getattr(self, name) == "":         # SparK's default, '' (a job script's unset $CKPT): none
                setattr(self, name, None)
        if self.tb_lg_dir:                    # SparK always writes TensorBoard logs; naming its folder asks for them
            self.tensorboard = True
        if isinstance(self.import_module, str):
            self.import_module = (self.import_module,)
        if not isinstance(self.model_kwargs, dict):           # words, as the command line gives them
            self.model_kwargs = parse_model_kwargs(self.model_kwargs)
        check_literal_model_kwargs(self.model_kwargs)
        taken = [f"{key} is {flag}" for key, flag in _SPARK_OWN_ARGUMENTS.items() if key in self.model_kwargs]
        if taken:
            raise ConfigError(f"--model_kwargs: {'; '.join(taken)} (SparK's own settings, not the model constructor's)")
        clip_off = " (<= 0 turns clipping off)"
        not_finite = [f"--{name} {value}: must be a finite number{clip_off if name == 'clip' else ''}"
                      for name in _FLOAT_SETTINGS
                      if (value := getattr(self, name)) is not None and not math.isfinite(value)]
        if not_finite:      # nan passes no comparison: the rules below would name the wrong fault
            raise ConfigError("; ".join(not_finite))
        decoder_width = _decoder_width_or_none(self.decoder_width)
        problems = [f"--{name} {value}: {rule}" for name, value, ok, rule in (
            ("data_path", "''", self.data_path != "", "an empty folder name (an unset shell variable?) would read the "
                                                      "current folder: give the image folder, or leave the flag out "
                                                      "for the demo photos"),
            ("input_size", self.input_size, self.input_size > 0 and self.input_size % PATCH == 0,
             f"must be a positive multiple of {PATCH} (SparK's mask patch, the encoders' downsample ratio), e.g. 224"),
            ("mask", self.mask, 0 < self.mask < 1, "the ratio of patches hidden must be above 0 (something to "
                                                   "reconstruct) and below 1 (something to see), e.g. 0.6"),
            ("bs", self.bs, self.bs >= 1, "the global batch must hold at least one image"),
            ("ep", self.ep, self.ep >= 1, "at least one epoch"),
            ("wp_ep", self.wp_ep, self.wp_ep >= 0, "warm-up epochs cannot be negative"),
            ("base_lr", self.base_lr, self.base_lr > 0, "must be positive (SparK: 2e-4)"),
            ("wd", self.wd, self.wd >= 0, "weight decay cannot be negative"),
            ("wde", self.wde, self.wde >= 0, "the final weight decay cannot be negative (0: --wd throughout)"),
            ("ada", self.ada, 0 <= self.ada < 1, "Adam's beta2 must be in [0, 1) (0 picks SparK's: 0.95 with a "
                                                 "BatchNorm densify norm, else 0.999)"),
            ("dp", self.dp, self.dp is None or 0 <= self.dp < 1, "a drop-path rate is in [0, 1) (not given: "
                                                                 "SparK's for the model)"),
            ("dataloader_workers", self.dataloader_workers, self.dataloader_workers >= 0,
             "0 (load in the training process) or more"),
            ("autotune_budget", self.autotune_budget, self.autotune_budget >= 0, "seconds, 0 or more"),
            ("decoder_width", self.decoder_width, decoder_width is not None, decoder_width_rule(PATCH)),
        ) if not ok]
        if problems:
            raise ConfigError("; ".join(problems))
        self.decoder_width = decoder_width          # a Python int: the log header is JSON
        kept_patches_per_image((self.input_size // PATCH) ** 2, self.mask)    # something visible, something hidden

    @property
    def output_dir(self) -> Path:
        if self.exp_dir:
            return Path(self.exp_dir)
        safe = "".join(ch if (ch.isalnum() or ch in "-_.") else "_" for ch in self.exp_name)
        return Path(f"output_{safe}")

    @property
    def tensorboard_dir(self) -> Path:
        """Where TensorBoard logs go when on: ``--tb_lg_dir``, else ``<exp_dir>/tensorboard_log`` (SparK's default)."""
        return Path(self.tb_lg_dir) if self.tb_lg_dir else self.output_dir / "tensorboard_log"

    def lr(self, global_batch: int) -> float:
        """SparK's linear scaling rule: ``base_lr * global batch / 256``."""
        return self.base_lr * global_batch / 256

    def iterations_per_epoch(self, num_samples: int, global_batch: int) -> int:
        return math.ceil(num_samples / global_batch)

    def as_dict(self) -> dict:
        return asdict(self)
