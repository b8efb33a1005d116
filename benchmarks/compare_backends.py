#!/usr/bin/env python
"""Compare every backend (and speed recipe) on speed, peak memory and equivalence to ``masked``.

    python benchmarks/compare_backends.py                           # CPU defaults, ~10-15 min on 2 cores
    python benchmarks/compare_backends.py --quick                   # tiny, for CI (< 1 min)
    python benchmarks/compare_backends.py --families                # one model of each of the first timm families
    python benchmarks/compare_backends.py --what step --recipes spark fast --models resnet50
    python benchmarks/compare_backends.py --device cuda --batch-size 128 --dtype fp32 bf16 --check-batch 16
    python benchmarks/compare_backends.py --what equivalence --models resnet50 regnety_016  # errors only
    python benchmarks/compare_backends.py --what equivalence --fp64 --reference sparse       # backends vs one another

Every variant starts from the same weights: timm's initialisation with the parameters that switch
residual branches off (zero last-BatchNorm weights, zero gains, 1e-6 layer scales) drawn from
U(0.5, 1.5), so the error columns cover every branch (``--weights init`` keeps timm's as they are).

Variants of one (model, mask ratio, dtype) are measured interleaved (A B C A B C ...) so machine
drift cancels in the speed-up; on the CPU memory is measured for each configuration in a fresh
subprocess, on CUDA during the last timed call (``max_memory_allocated``). Configurations run in
priority order (every model at the first mask ratio first) and results.json/results.md are
rewritten after each, so a ``--budget-s`` that runs out (or a kill) leaves every finished row.
Outputs in --out: results.json, results.md, speedup_vs_mask_ratio.png, peak_memory.png (not with
--memory off; no plots with --what equivalence).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import timm  # noqa: E402

import spark_sparse as ss  # noqa: E402
from spark_sparse.models.model_kwargs import format_model_kwargs  # noqa: E402
from spark_sparse.testing import switch_branches_on  # noqa: E402
from spark_sparse.user_modules import UserModuleError, import_user_module  # noqa: E402
from _args import (HelpFormatter, at_least, first_problem, input_size, mask_ratio, positive_seconds,  # noqa: E402
                   unknown_backend, unknown_model, unknown_recipe)
from _equivalence import compare, fp32_noise_floor, outputs_of  # noqa: E402
from _capacity import fit_largest_batch, markdown_section, memory_budget_mb  # noqa: E402
from _measure import (Workload, peak_growth_mb, peak_memory as peak_memory_in_process, persistent_mb,  # noqa: E402
                      summarize, time_and_cuda_peak, time_once)
from _report import CPU_FEATURES, _fmt, error_vs_floor, provenance, write_json, write_markdown, write_plots  # noqa: E402
from _variants import (DTYPES, Variant, add_autotune_arguments, add_model_kwargs_argument, autotune_record,  # noqa: E402
                       parse_model_kwargs_argument, tune_workload)


#: one model per timm CNN family SparK-sparse supports beyond ResNet/ConvNeXt (all checked on every backend
#: by the test suite); the depthwise-heavy EfficientNet / MobileNet rows are where sparse libraries lose
FAMILY_MODELS = ("resnet50d", "seresnet50", "resnext50_32x4d", "regnety_016", "efficientnet_b0",
                 "mobilenetv3_large_100", "convnextv2_tiny", "resnetv2_50x1_bit")

#: an "x floor" above this is explained after the run (decoder kink flips), not left for the reader to worry about
FAR_FROM_FLOOR = 10

#: what --quick sets, unless given on the command line. Five repeats, not two: a median of two is their
#: mean, and on a shared 2-core machine one computation timed twice differs by several percent, more on
#: small inputs (benchmarks/guard_noise.py), while a call here takes only 30-120 ms
QUICK_PRESET = {"models": ["resnet18", "convnext_tiny"], "input_size": 64, "batch_size": 2, "mask": [0.6],
                "repeats": 5, "warmup": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"], help="spark-sparse model names")
    p.add_argument("--import-module", action="append", default=[], metavar="MODULE_OR_FILE.py",
                   help="import this module first, as spark-pretrain's --import_module: your models, blocks, "
                        "converters, kernels or backends (then named in --models / --backends); repeatable")
    add_model_kwargs_argument(p, "the constructor arguments of every model, as spark-pretrain's --model_kwargs "
                                 "(e.g. img_size=192 window_size=6)")
    p.add_argument("--families", action="store_true",
                   help=f"measure timm's CNN families instead of --models: {', '.join(FAMILY_MODELS)}")
    p.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    p.add_argument("--recipes", nargs="*", default=[],
                   help="also measure whole speed recipes: spark, fast, or fast@bf16 / fast@fp16 (own AMP dtype)")
    p.add_argument("--mask", nargs="+", type=float, default=[0.6, 0.75], help="mask ratios")
    p.add_argument("--batch-size", type=int, default=8, help="images per timed call")
    p.add_argument("--input-size", type=int, default=224, help="image side in pixels (multiple of 32)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32"],
                   help="one or more autocast dtypes, each measured on the same models")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every variant runs")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant (medians reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--what", choices=["encoder", "step", "equivalence"], default="encoder",
                   help="time encoder forward+backward, or the whole training step (decoder, loss, optimizer), or "
                        "only check every variant's errors against masked (no timing, no memory)")
    p.add_argument("--fp64", action="store_true",
                   help="--what equivalence: compare in float64 (every model and image in double, no fp32 floor), "
                        "to tell a difference of maths from amplified fp32 rounding")
    p.add_argument("--reference", default="masked",
                   help="the backend every variant's errors are measured against (speed-ups stay against masked); "
                        "another one tells whether the sparse backends agree with one another where they differ "
                        "from masked")
    p.add_argument("--weights", choices=["branches-on", "init"], default="branches-on",
                   help="the weights every variant starts from: timm's initialisation with its switched-off residual "
                        "branches drawn from U(0.5, 1.5) (errors then cover every branch), or timm's as they are")
    p.add_argument("--quick", action="store_true",
                   help="tiny models and sizes, for CI: " + " ".join(
                       f"--{key.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                       for key, v in QUICK_PRESET.items()) + " (options given explicitly win)")
    p.add_argument("--memory", choices=["subprocess", "inprocess", "off"], default=None,
                   help="peak memory: one fresh subprocess per (model, mask) with glibc returning freed blocks "
                        "(default on CPU), in this process (default on CUDA: during the last timed call; on the CPU "
                        "mostly 0, as glibc keeps what the warm-up freed), or off ('-')")
    p.add_argument("--check-batch", type=int, default=None,
                   help="equivalence on the first N images only (default: the whole batch)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new (model, mask, dtype) once this many seconds are spent or the next would "
                        "not fit (estimated from the last one); the rest is listed as not run")
    p.add_argument("--max-batch", action="store_true",
                   help="--what step: also the largest batch at equal memory (peak at the batch and at half of it)")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip --backends that are not registered in this version (with the reason) instead of failing")
    add_autotune_arguments(p)
    p.add_argument("--out", type=Path, default=Path("bench_out"),
                   help="folder for results.json, results.md and the plots (printed at the end)")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK_PRESET)      # as defaults, so that e.g. --quick --repeats 15 keeps 15
    args = p.parse_args(argv)
    for spec in args.import_module:          # before --models and --backends are looked up
        try:
            import_user_module(spec)
        except UserModuleError as err:
            p.error(str(err))
    parse_model_kwargs_argument(p, args)
    if args.families:
        args.models = list(FAMILY_MODELS)
    args.memory = args.memory or ("inprocess" if args.device == "cuda" else "subprocess")
    if args.max_batch and args.what != "step":
        p.error("--max-batch measures training steps: use it with --what step")
    if args.fp64 and args.what != "equivalence":
        p.error("--fp64 compares in float64 without timing: use it with --what equivalence")
    problem = invalid_setting(args)
    if problem:
        p.error(problem)
    return args


def invalid_setting(args: argparse.Namespace) -> Optional[str]:
    """What makes the run impossible, checked before anything is built (else every configuration would fail
    alike, each with a traceback, and the run end with empty tables)."""
    problem = (unknown_model("--models", args.models) or unknown_recipe("--recipes", args.recipes)
               or (None if args.allow_missing else unknown_backend("--backends", args.backends or []))
               or unknown_backend("--reference", [args.reference]) or first_problem([
        input_size("--input-size", args.input_size), *[mask_ratio("--mask", r) for r in args.mask],
        at_least("--batch-size", args.batch_size, 1), at_least("--repeats", args.repeats, 1),
        at_least("--warmup", args.warmup, 0), at_least("--threads", args.threads, 1),
        positive_seconds("--autotune-budget", args.autotune_budget),
        ("--check-batch", args.check_batch, args.check_batch is None or args.check_batch >= 1, "at least 1")]))
    if problem:
        return problem
    if args.device == "cuda" and not torch.cuda.is_available():
        return f"--device cuda: torch {torch.__version__} sees no CUDA device here (torch.cuda.is_available() is False)"
    return None


def select_variants(args) -> tuple[list[Variant], dict[str, str]]:
    infos = {b.name: b for b in ss.list_backends()}
    wanted = args.backends or list(infos)
    skipped = {}
    for name in wanted:
        if name not in infos:               # only with --allow-missing: parse_args refuses it otherwise
            skipped[name] = f"not registered in this version of spark-sparse (registered: {', '.join(infos)})"
            print(f"[bench] skipping backend {name}: {skipped[name]}", flush=True)
            continue
        if not infos[name].available:
            skipped[name] = infos[name].reason
            print(f"[bench] skipping backend {name}: {infos[name].reason}", flush=True)
    if not infos[args.reference].available:
        raise SystemExit(f"--reference {args.reference} cannot run here: {infos[args.reference].reason}")
    wanted = wanted + ([args.reference] if args.reference not in wanted else [])
    names = ["masked"] + [n for n in wanted if n != "masked" and n not in skipped]
    return [Variant(n) for n in names] + [Variant(f"recipe:{r}") for r in args.recipes], skipped


def machine_info() -> dict:
    """The machine a table was measured on. CPUs of one model name can differ in what matters (one "Intel(R)
    Xeon(R) Processor" has AMX-BF16 tiles, another not), so the features in :data:`CPU_FEATURES` are recorded."""
    cpu, flags = platform.processor() or "unknown", None
    try:
        with open("/proc/cpuinfo") as fh:
            info = dict(line.split(":", 1) for line in fh.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {key.strip(): value.strip() for key, value in info.items()}
        cpu, flags = info.get("model name", cpu), set(info.get("flags", "").split())
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_features": None if flags is None else [f for f in CPU_FEATURES if f in flags],
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def versions() -> dict:
    found = {"torch": torch.__version__, "timm": timm.__version__, "spark_sparse": ss.__version__}
    for module in ("spconv", "MinkowskiEngine"):
        try:
            from importlib.metadata import version
            found[module] = version(module if module != "MinkowskiEngine" else "MinkowskiEngine")
        except Exception:
            found[module] = None
    return found


def peak_memory(args, works: list[Workload], model: str, mask_ratio: float, dtype: str) -> dict[str, float]:
    """Peak memory growth of each variant's fwd+bwd (or step) for one (model, mask ratio, dtype)."""
    if args.memory == "off":
        return {}
    if args.memory == "inprocess":
        return {w.variant.name: peak_memory_in_process(w, args.what)["peak_mem_mb"] for w in works}
    spec = dict(variants=[w.variant.name for w in works], model=model, input_size=args.input_size,
                mask_ratio=mask_ratio, batch=args.batch_size, dtype=dtype, device=args.device, what=args.what,
                threads=args.threads, autotune="off" if args.autotune == "off" else "cached",   # the parent's plan
                model_kwargs=args.model_kwargs,
                import_module=[str(Path(m).resolve()) if m.endswith(".py") else m for m in args.import_module])
    # the child runs in benchmarks/: the user's folder stays on its path for dotted module names
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.getcwd()]), MALLOC_MMAP_THRESHOLD_="65536",
               MALLOC_TRIM_THRESHOLD_="0")
    result = subprocess.run([sys.executable, str(HERE / "_measure.py"), json.dumps(spec)], capture_output=True,
                            text=True, cwd=HERE, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {model} mask {mask_ratio} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_growth_mb(work: Workload) -> float:
    """Peak memory growth of one training step of ``work`` (CUDA: allocated; CPU: resident, VmHWM reset)."""
    return peak_growth_mb(work.step, work.device)


def largest_batch(args, work: Workload) -> dict:
    """Peak step memory at half the batch and at the batch -> the largest batch at equal memory (_capacity.py).

    The half-batch step runs twice first: a compiled decoder recompiles for the new shape there and a
    measuring backend tunes there, so neither lands in the measured step.
    """
    half = max(1, args.batch_size // 2)
    part = work.subset(half)
    part.step()
    growth = {half: step_growth_mb(part), args.batch_size: step_growth_mb(work)}
    return fit_largest_batch(growth, persistent_mb(work), memory_budget_mb(args.device)[0])


def units(args) -> list[tuple[str, float, str]]:
    """(model, mask ratio, dtype) in priority order: every model at the first mask ratio before the next ratio."""
    return [(m, r, d) for r in args.mask for m in args.models for d in args.dtype]


def cuda_info() -> Optional[dict]:
    if not torch.cuda.is_available():
        return None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_mb": round(props.total_memory / 2**20), "capability": [props.major, props.minor],
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "triton": triton_version,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def make_meta(args, skipped: dict, not_run: list[dict], failed: list[dict], started: float, origin: dict) -> dict:
    """The run's description; ``origin``: its provenance, taken when it started (the code it measured)."""
    return {"command": shlex.join([sys.executable] + sys.argv), "what": args.what, "device": args.device,
            "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "machine": machine_info(),
            "versions": versions(), "skipped": skipped, "seconds": round(time.time() - started, 1),
            "dtypes": ["fp64"] if args.fp64 else args.dtype, "weights": args.weights, "reference": args.reference,
            "model_kwargs": format_model_kwargs(args.model_kwargs_values),
            "check_batch": args.check_batch, "budget_s": args.budget_s, "not_run": not_run,
            "failed": failed,
            "cuda": cuda_info() if args.device == "cuda" else None,
            "capacity_budget": memory_budget_mb(args.device)[1] if args.max_batch else None,
            "memory_method": {"off": "not measured",
                              "inprocess": ("peak growth of allocated memory during the last timed fwd+bwd/step "
                                            "(CUDA max_memory_allocated)" if args.device == "cuda" else
                                            "peak growth of one fwd+bwd/step (VmHWM reset), in the benchmark process"),
                              "subprocess": "peak growth of one fwd+bwd/step (VmHWM reset), fresh process per "
                                            "(model, mask), glibc returning freed blocks"
                                            + (" (CUDA: max_memory_allocated)" if args.device == "cuda" else "")
                              }[args.memory],
            "provenance": origin}


def write_tables(out: Path, meta: dict, records: list[dict]) -> None:
    """results.json and results.md (rewritten after every configuration: a stopped run keeps its rows)."""
    write_json(out / "results.json", meta, records)
    write_markdown(out / "results.md", meta, records)
    extra = []
    if meta["cuda"]:
        c = meta["cuda"]
        extra += ["", f"GPU: {c['name']} ({c['memory_mb']} MB), CUDA {c['cuda']}, cuDNN {c['cudnn']}, Triton "
                      f"{c['triton']}; TF32 in cuDNN convolutions {c['cudnn_allow_tf32']}, in matmuls "
                      f"{c['matmul_allow_tf32']} (torch defaults unless the command changed them)."]
    if meta["check_batch"]:
        extra += ["", f"Errors computed on the first {meta['check_batch']} images of each batch."]
    if meta["not_run"]:
        extra += ["", "Not run:"] + [f"- {u['model']} mask {u['mask_ratio']} {u['dtype']}: {u['why']}"
                                     for u in meta["not_run"]]
    if meta["failed"]:
        extra += ["", "Failed (variant left out of that configuration):"] + [
            f"- {f['variant']} on {f['model']} mask {f['mask_ratio']} {f['dtype']} ({f['stage']}): {f['error']}"
            for f in meta["failed"]]
    extra += markdown_section(records, meta["capacity_budget"] or "")
    if extra:
        with open(out / "results.md", "a") as fh:
            fh.write("\n".join(extra) + "\n")


class Failures:
    """Variants that raised, left out of their configuration (a GPU run must not lose the whole table to one)."""

    def __init__(self):
        self.entries: list[dict] = []

    def guard(self, work_or_name, unit: tuple, stage: str, fn):
        """``fn()``, or None after recording the error (the CUDA cache is emptied after an out-of-memory)."""
        try:
            return fn()
        except Exception as exc:   # any failure of one variant: record it, keep the others going
            name = work_or_name if isinstance(work_or_name, str) else work_or_name.variant.name
            model, mask_ratio, dtype = unit
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            self.entries.append({"variant": name, "model": model, "mask_ratio": mask_ratio, "dtype": dtype,
                                 "stage": stage, "error": error})
            print(f"[bench]   {name} failed in {stage}: {error}", flush=True)
            traceback.print_exc()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None


def build_works(args, variants: list[Variant], unit: tuple, failures: Failures) -> tuple[list[Workload], dict]:
    """``masked`` (the baseline) and every variant that builds, all on ``masked``'s initial weights
    (with ``--weights branches-on``, its encoder's switched-off parameters drawn first)."""
    model, mask_ratio, _ = unit
    baseline = Workload(variants[0], model, args.input_size, mask_ratio, args.batch_size, args.dtype[0], args.device,
                        model_kwargs=args.model_kwargs_values)
    if args.weights == "branches-on":
        baseline.switched_on = switch_branches_on(baseline.spark.encoder)
        print(f"[bench]   {len(baseline.switched_on)} switched-off encoder parameters drawn", flush=True)
    state = copy.deepcopy(baseline.spark.state_dict())
    works = [baseline]
    for variant in variants[1:]:
        work = failures.guard(variant.name, unit, "build", lambda: Workload(
            variant, model, args.input_size, mask_ratio, args.batch_size, args.dtype[0], args.device, state,
            model_kwargs=args.model_kwargs_values))
        if work is not None:
            work.switched_on = baseline.switched_on
            works.append(work)
    return works, state


def run(args) -> tuple[dict, list[dict]]:
    torch.set_num_threads(args.threads)
    variants, skipped = select_variants(args)
    order = {v.name: i for i, v in enumerate(variants)}
    todo = units(args)
    rows, not_run, durations, failures, started = [], [], {}, Failures(), time.time()
    origin = provenance()        # now: an edit made while the run goes on is not what it measured
    works, state, built, noise = [], {}, None, None
    main_phase = "fwd_bwd_ms" if args.what == "encoder" else "step_ms"
    cuda_peak = args.device == "cuda" and args.memory == "inprocess"

    def meta_and_records():
        return (make_meta(args, skipped, not_run, failures.entries, started, origin),
                [record for _, record in sorted(rows, key=lambda row: row[0])])

    for index, unit in enumerate(todo):
        model, mask_ratio, dtype = unit
        spent = time.time() - started
        estimate = max(durations.get(model) or [d for ds in durations.values() for d in ds], default=0.0)
        if args.budget_s is not None and durations and spent + estimate > args.budget_s:
            why = f"time budget: {spent:.0f} s of {args.budget_s:.0f} s spent, one takes about {estimate:.0f} s"
            not_run.append({"model": model, "mask_ratio": mask_ratio, "dtype": dtype, "why": why})
            print(f"[bench] ({index + 1}/{len(todo)}) {model} mask {mask_ratio} {dtype}: not run ({why})", flush=True)
            continue
        unit_started = time.time()
        print(f"[bench] ({index + 1}/{len(todo)}) {model} mask {mask_ratio} {dtype} batch {args.batch_size}: "
              f"{', '.join(v.name for v in variants)}", flush=True)
        try:
            if built != (model, mask_ratio):
                works = noise = None
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                built = None
                works, state = build_works(args, variants, unit, failures)
                built = (model, mask_ratio)
            else:
                for work in works:      # the timed calls of the last dtype moved weights and BN statistics
                    work.spark.load_state_dict(state)
            records = measure_unit(args, works, unit, failures, noise, cuda_peak, main_phase)
            noise = records[0]["fp32_noise_floor"]
        except Exception as exc:        # the reference itself failed: this configuration has no table
            traceback.print_exc()
            why = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            not_run.append({"model": model, "mask_ratio": mask_ratio, "dtype": dtype, "why": why})
            works, built = [], None
            if args.device == "cuda":
                torch.cuda.empty_cache()
            continue
        key = (args.models.index(model), args.mask.index(mask_ratio), args.dtype.index(dtype))
        rows += [((*key, order[r["backend"]]), r) for r in records]
        write_tables(args.out, *meta_and_records())
        if args.max_batch:
            add_largest_batches(args, works, records, unit, failures, started, not_run)
            write_tables(args.out, *meta_and_records())
        durations.setdefault(model, []).append(time.time() - unit_started)
    return meta_and_records()


def tune_unit(args, works: list[Workload], unit: tuple, failures: Failures) -> dict:
    """Tune every column on backend ``auto`` for this configuration's dtype, before anything is timed."""
    tuning = {}
    for work in works[1:]:
        result = failures.guard(work, unit, "autotune",
                                lambda: tune_workload(work, work.dtype, args.autotune, args.autotune_budget))
        if result is not None and result.applies:
            tuning[work.variant.name] = result
            print(f"[bench]   {work.variant.name} tuned in {result.seconds:.1f} s (not in its timings): runs "
                  f"{result.backend}; {result.summary()}", flush=True)
    return tuning


def measure_unit(args, works: list[Workload], unit: tuple, failures: Failures, noise: Optional[dict],
                 cuda_peak: bool, main_phase: str) -> list[dict]:
    """Equivalence, interleaved timings, memory (and largest batch) of every variant of one configuration;
    equivalence alone with ``--what equivalence``."""
    model, mask_ratio, dtype = unit
    for work in works:
        work.dtype = work.variant.dtype or dtype
    tuning = tune_unit(args, works, unit, failures)
    checked = {w.variant.name: (w.subset(args.check_batch) if args.check_batch else w) for w in works}
    if args.reference not in checked:
        raise RuntimeError(f"the reference ({args.reference}) did not build: {failures.entries[-1]['error']}")
    reference = checked[args.reference]
    # equivalence first: the timed steps below update each variant's weights. The reference runs once for
    # every variant's comparison; its own row is a second run against the first (all zeros unless it is
    # not reproducible) and still counts its non-zero masked sites; a failing reference fails the configuration
    reference_outputs = outputs_of(reference, args.fp64)
    equivalence = {args.reference: compare(reference, reference_outputs, args.fp64)}
    for work in works:
        if work.variant.name == args.reference:
            continue
        result = failures.guard(work, unit, "equivalence",
                                lambda: compare(checked[work.variant.name], reference_outputs, args.fp64))
        if result is not None:
            equivalence[work.variant.name] = result
    if "masked" not in equivalence:
        raise RuntimeError(f"masked, whose timings are the baseline, failed: {failures.entries[-1]['error']}")
    if args.fp64:
        noise = None            # an fp32 floor says nothing about fp64 differences
        for work in works:
            work.dtype = "fp64"
    else:
        masked_fp32 = reference_outputs if args.reference == "masked" and reference.dtype == "fp32" else None
        noise = noise or fp32_noise_floor(checked["masked"], masked_fp32)
    del reference_outputs
    live = [w for w in works if w.variant.name in equivalence]
    if args.what == "equivalence":
        stats, memory = {w.variant.name: {} for w in live}, {}
    else:
        stats, peaks = time_interleaved(args, live, unit, failures, cuda_peak, main_phase)
        memory = peaks if cuda_peak else peak_memory(args, live, model, mask_ratio, dtype)
    base = stats["masked"].get(main_phase, {}).get("median")
    records = []
    for work in live:
        name = work.variant.name
        median = stats[name].get(main_phase, {}).get("median")
        record = {"model": model, "backend": name, "mask_ratio": mask_ratio, "dtype": work.dtype,
                  "device": args.device, "batch_size": args.batch_size, "input_size": args.input_size,
                  "fwd_ms": stats[name].get("fwd_ms", {}).get("median"),
                  "fwd_bwd_ms": stats[name].get("fwd_bwd_ms", {}).get("median"),
                  "step_ms": stats[name].get("step_ms", {}).get("median"),
                  "images_per_s": args.batch_size / median * 1000 if median else None,
                  "speedup_vs_masked": base / median if median else None,
                  "peak_mem_mb": memory.get(name), "max_abs_err": equivalence[name]["max_abs_err"],
                  "max_rel_err": equivalence[name]["max_rel_err"], "timings": stats[name],
                  "equivalence": equivalence[name],
                  "fp32_noise_floor": noise and {"max_abs_err": noise["max_abs_err"],
                                                 "max_rel_err": noise["max_rel_err"], "errors": noise["errors"]},
                  "switched_on": len(work.switched_on),
                  "capacity": None, "autotune": autotune_record(tuning.get(name)),
                  "plan": work.spark.backend.plan(work.spark.encoder, args.device)}
        records.append(record)
        timing = (f"{main_phase} {median:8.1f} ms  {record['speedup_vs_masked']:.2f}x  "
                  f"peak {'-' if record['peak_mem_mb'] is None else round(record['peak_mem_mb'])} MB  "
                  if median else "")
        print(f"[bench]   {name:<14} {timing}max abs err {record['max_abs_err']:.1e}  "
              f"x floor {_fmt(error_vs_floor(record), 2)}", flush=True)
    return records


def time_interleaved(args, live: list[Workload], unit: tuple, failures: Failures, cuda_peak: bool,
                     main_phase: str) -> tuple[dict[str, dict], dict[str, float]]:
    """Per variant, ``phase -> summary`` of its timed calls, interleaved (A B C A B C ...), and its CUDA peak
    (MB, during the last timed call) where ``cuda_peak``. A variant that fails is dropped from ``live``."""
    samples = {w.variant.name: {} for w in live}
    peaks = {}
    reference = live[0]
    total = args.warmup + args.repeats
    for rep in range(total):
        for work in list(live):
            for phase, fn in work.phases(args.what).items():
                if cuda_peak and rep == total - 1 and phase == main_phase:
                    measured = failures.guard(work, unit, phase, lambda: time_and_cuda_peak(fn))
                    elapsed = None if measured is None else measured[0]
                    if measured is not None:
                        peaks[work.variant.name] = measured[1]
                else:
                    elapsed = failures.guard(work, unit, phase, lambda: time_once(fn, args.device))
                if elapsed is None:
                    if work is reference:
                        raise RuntimeError(f"the reference (masked) failed in {phase}: {failures.entries[-1]['error']}")
                    live.remove(work)
                    break
                if rep >= args.warmup:
                    samples[work.variant.name].setdefault(phase, []).append(elapsed)
        done = (f"warm-up {rep + 1}/{args.warmup}" if rep < args.warmup
                else f"repeat {rep + 1 - args.warmup}/{args.repeats}")
        print(f"[bench]   {done} done", flush=True)
    return {w.variant.name: {phase: summarize(values) for phase, values in samples[w.variant.name].items()}
            for w in live}, peaks


def add_largest_batches(args, works: list[Workload], records: list[dict], unit: tuple, failures: Failures,
                        started: float, not_run: list[dict]) -> None:
    """``record["capacity"]`` of each variant, after its timed row is written (a compiled decoder recompiles
    for the half batch: the slowest part of a step configuration); stops at ``--budget-s``."""
    model, mask_ratio, dtype = unit
    by_name = {w.variant.name: w for w in works}
    for record in records:
        spent = time.time() - started
        if args.budget_s is not None and spent > args.budget_s:
            not_run.append({"model": model, "mask_ratio": mask_ratio, "dtype": dtype,
                            "why": f"largest batch of {record['backend']}: time budget ({spent:.0f} s of "
                                   f"{args.budget_s:.0f} s spent)"})
            continue
        work = by_name[record["backend"]]
        record["capacity"] = failures.guard(work, unit, "largest batch", lambda: largest_batch(args, work))
        if record["capacity"]:
            print(f"[bench]   {record['backend']:<14} largest batch {record['capacity']['max_batch']} "
                  f"({record['capacity']['per_image_mb']:.1f} MB per image)", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    meta, records = run(args)
    write_tables(args.out, meta, records)
    plots = write_plots(args.out, records) if args.what != "equivalence" else []   # no timings to plot
    print(f"[bench] wrote {', '.join(str(p) for p in [args.out / 'results.json', args.out / 'results.md', *plots])} "
          f"in {meta['seconds']} s")
    if not records:
        raise SystemExit(f"[bench] no configuration finished: {args.out / 'results.md'} lists why (not run, failed)")
    far = [r for r in records if (error_vs_floor(r) or 0) > FAR_FROM_FLOOR]
    if far:
        print(f"[bench] note: {len(far)} row(s) at more than {FAR_FROM_FLOOR}x the fp32 floor "
              f"({', '.join(sorted({r['backend'] for r in far}))}). In whole-model gradients that is mostly decoder "
              f"ReLU6 inputs within rounding of a kink landing on its other side (BENCHMARKS.md, \"Where the large "
              f"gradient errors come from\"; python benchmarks/kink_flips.py measures it); every layer agrees to fp32 "
              f"rounding in the test suite", flush=True)


if __name__ == "__main__":
    main()
