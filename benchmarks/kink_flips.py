#!/usr/bin/env python
"""Where a whole-model gradient difference comes from: elements that cross a ReLU kink in the decoder.

    python benchmarks/kink_flips.py --out benchmarks/results/cpu_kink_flips
    python benchmarks/kink_flips.py --quick          # one model, one seed: checks that it runs

The benchmark tables compare every parameter gradient of SparK's whole loss with ``masked``. At
small sizes a backend can differ there by far more than fp32 rounding although each of its layers
is exact to rounding (test suite). This script tells the two causes apart. For each model, seed and
backend, on the same weights, images and mask as ``masked`` (by default timm's initialisation with its
switched-off residual branches drawn, as ``compare_backends.py`` starts from; ``--weights init`` keeps
timm's as they are):

1. forward+backward of SparK's loss on both; the worst relative error over parameter gradients,
   defined as in the tables (a tensor's max abs error over its max |reference|);
2. the inputs of the decoder's ReLU/ReLU6 in both runs: a *flip* is an element on the other side of
   a kink (0, and 6 for ReLU6) than in the reference; its gradient is switched on in one run and
   off in the other;
3. the backend again, with every flipped element moved to the reference's side of its kink (its
   value set to the reference's, its gradient still flowing through it), and the errors again.
   A flip can cause others further down (counted in step 2); aligned, those do not happen.

If step 3's error sits at fp32 rounding, the difference of step 1 came from the flips alone, not
from the backend's arithmetic. The decoder is the same dense module on every backend, so its
activations can be matched element by element. The encoder's ReLUs (ResNets) act on rows in the
sparse backends and are not aligned here: a ResNet's remaining error can come from them (and from
its deepest BatchNorm, which sees few active sites at small sizes). Row ``masked fp32`` compares
``masked`` in fp32 with ``masked`` in fp64, aligned to fp64's kinks: the tables' floor column.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import spark_sparse as ss  # noqa: E402
from spark_sparse.testing import switch_branches_on  # noqa: E402
from _args import (HelpFormatter, at_least, first_problem, input_size, mask_ratio, unknown_model,  # noqa: E402
                   unusable_backend)
from _equivalence import _errors, _outputs  # noqa: E402
from _measure import Workload  # noqa: E402
from _report import write_reference  # noqa: E402
from _variants import Variant  # noqa: E402

KINKS: dict[type, tuple[float, ...]] = {nn.ReLU: (0.0,), nn.ReLU6: (0.0, 6.0)}
FP32_FLOOR = "masked fp32"           # the row comparing masked fp32 with masked fp64
#: what --quick sets, unless given on the command line
QUICK_PRESET = {"models": ["convnext_tiny"], "seeds": [0], "backends": ["sparse"]}


def kink_side(x: torch.Tensor, kinks: tuple[float, ...]) -> torch.Tensor:
    """Which piece of a piecewise-linear activation each element falls in (0 = below every kink)."""
    side = torch.zeros(x.shape, dtype=torch.int8, device=x.device)
    for kink in kinks:
        side += x > kink
    return side


def decoder_kinks(spark: nn.Module) -> dict[str, tuple[nn.Module, tuple[float, ...]]]:
    """The decoder's piecewise-linear activations by name, with the inputs where their slope changes."""
    kinks = {name: (module, KINKS[type(module)]) for name, module in spark.decoder.named_modules()
             if type(module) in KINKS}
    if not kinks:
        raise ValueError("the decoder has no ReLU/ReLU6 module to check")
    return kinks


class DecoderKinks:
    """Records the decoder's activation inputs; optionally moves flipped elements to a reference's side.

    A forward pre-hook sees the input before an in-place activation overwrites it. Alignment adds a
    detached correction, so the element takes the reference's value while its gradient still flows
    to the layer before: exactly the run the backend would make had rounding not crossed the kink.
    """

    def __init__(self, spark: nn.Module, align_to: Optional[dict[str, torch.Tensor]] = None):
        self.align_to, self.inputs = align_to, {}
        self.handles = [module.register_forward_pre_hook(self._hook(name, kinks))
                        for name, (module, kinks) in decoder_kinks(spark).items()]

    def _hook(self, name: str, kinks: tuple[float, ...]):
        def hook(module, args):
            if name in self.inputs:
                raise RuntimeError(f"decoder activation {name} ran twice in one forward; match by call, not by name")
            x = args[0]
            if self.align_to is not None:
                want = self.align_to[name].to(x.dtype)
                flipped = kink_side(x, kinks) != kink_side(want, kinks)
                x = x + torch.where(flipped, want - x, torch.zeros_like(x)).detach()
            self.inputs[name] = x.detach().clone()
            return (x, *args[1:])
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def count_flips(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], spark: nn.Module) -> int:
    """Elements of the recorded activation inputs ``got`` on another side of a kink than in ``want``."""
    return sum(int((kink_side(got[name], kinks) != kink_side(want[name].to(got[name].dtype), kinks)).sum())
               for name, (_, kinks) in decoder_kinks(spark).items())


def run(spark, images, mask, align_to=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """One forward+backward of SparK's loss (:func:`_equivalence._outputs`) and the decoder's activation inputs."""
    kinks = DecoderKinks(spark, align_to)
    try:
        out = _outputs(spark, images, mask, "cpu", "fp32")
    finally:
        kinks.remove()
    return out, kinks.inputs


def worst_grad(got: dict, ref: dict) -> tuple[float, str]:
    """The worst relative error over parameter gradients and the tensor it is in."""
    errors = {name: _errors(got["grads"][name], ref["grads"][name])[1] for name in ref["grads"] if name in got["grads"]}
    name = max(errors, key=errors.get)
    return errors[name], name


def compare_one(label: str, spark, images, mask_for, ref: dict, ref_inputs: dict) -> list:
    got, inputs = run(spark, images, mask_for())
    flips = count_flips(inputs, ref_inputs, spark)
    before, where = worst_grad(got, ref)
    aligned, _ = run(spark, images, mask_for(), align_to=ref_inputs)
    after, where_after = worst_grad(aligned, ref)
    return [label, flips, f"{before:.1e}", where, f"{after:.1e}", where_after]


def measure(model: str, seed: int, backends: list[str], args) -> list[list]:
    ref = Workload(Variant("masked"), model, args.input_size, args.mask, args.batch_size, "fp32", "cpu", seed=seed)
    if args.weights == "branches-on":
        switch_branches_on(ref.spark.encoder)
    state = ref.spark.state_dict()
    exact = copy.deepcopy(ref.spark).double()
    ref_out, ref_inputs = run(ref.spark, ref.images, ref.fresh_mask())
    exact_out, exact_inputs = run(exact, ref.images.double(), ref.fresh_mask())
    rows = [[model, seed, *compare_one(FP32_FLOOR, ref.spark, ref.images, ref.fresh_mask, exact_out, exact_inputs)]]
    del exact
    for backend in backends:
        work = Workload(Variant(backend), model, args.input_size, args.mask, args.batch_size, "fp32", "cpu",
                        state=state, seed=seed)
        rows.append([model, seed, *compare_one(backend, work.spark, work.images, work.fresh_mask, ref_out, ref_inputs)])
        print(f"[kinks] {model} seed {seed} {backend}: {rows[-1][3]} flips, worst param-grad rel err "
              f"{rows[-1][4]} -> {rows[-1][6]} with them aligned", flush=True)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", default=["convnext_tiny", "resnet18"], help="spark-sparse model names")
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: every available backend but masked and auto (auto runs other backends' kernels)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3],
                   help="seeds of the weights, images and mask (one row per model, seed and backend)")
    p.add_argument("--input-size", type=int, default=64, help="image side in pixels (multiple of 32)")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward+backward")
    p.add_argument("--mask", type=float, default=0.6, help="mask ratio")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--weights", choices=["branches-on", "init"], default="branches-on",
                   help="timm's initialisation with its switched-off residual branches drawn (as compare_backends.py), "
                        "or as it is")
    p.add_argument("--quick", action="store_true",
                   help="one model, one seed, the sparse backend: " + " ".join(
                       f"--{key} {' '.join(map(str, v))}" for key, v in QUICK_PRESET.items())
                   + " (options given explicitly win)")
    p.add_argument("--out", type=Path, default=Path("bench_out/kink_flips"),
                   help="folder for reference.json (its path is printed at the end)")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK_PRESET)      # as defaults, so that e.g. --quick --models resnet18 keeps resnet18
    args = p.parse_args(argv)
    problem = unknown_model("--models", args.models)
    problem = problem or (unusable_backend("--backends", args.backends) if args.backends is not None else None)
    problem = problem or first_problem([
        input_size("--input-size", args.input_size), at_least("--batch-size", args.batch_size, 1),
        mask_ratio("--mask", args.mask), at_least("--threads", args.threads, 1)])
    if problem:
        p.error(problem)
    if args.backends is None:
        args.backends = [b.name for b in ss.list_backends() if b.available and b.name not in ("masked", "auto")]
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    rows = [row for model in args.models for seed in args.seeds for row in measure(model, seed, args.backends, args)]
    columns = ["model", "seed", "run", "decoder kink flips", "worst param-grad rel err", "in",
               "with the flips aligned", "in"]
    weights = "switched-off branches drawn" if args.weights == "branches-on" else "timm's initialisation"
    section = {"title": f"Whole-model parameter gradients vs masked ({args.input_size} px, batch {args.batch_size}, "
                        f"mask {args.mask}, {weights}; row '{FP32_FLOOR}': masked fp32 vs fp64)", "columns": columns,
               "rows": rows}
    values = {"rows_with_flips": sum(1 for row in rows if row[3])}
    for model in args.models:
        ours = [row for row in rows if row[0] == model]
        values[f"max_{model}_rel_err"] = max(float(row[4]) for row in ours)
        values[f"max_{model}_aligned_rel_err"] = max(float(row[6]) for row in ours)
    path = write_reference(args.out, __file__, argv, [section], {"kinks": values}, threads=args.threads,
                           seconds=round(time.time() - started, 1))
    print(f"[kinks] wrote {path}")
    return path


if __name__ == "__main__":
    main()
