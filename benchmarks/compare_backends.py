#!/usr/bin/env python
"""Compare every backend (and speed recipe) on speed, peak memory and equivalence to ``masked``.

    python benchmarks/compare_backends.py                           # CPU defaults, ~10-15 min on 2 cores
    python benchmarks/compare_backends.py --quick                   # tiny, for CI (< 1 min)
    python benchmarks/compare_backends.py --what step --recipes spark fast --models resnet50

Variants of one (model, mask ratio, dtype) are measured interleaved (A B C A B C ...) so machine
drift cancels in the speed-up; memory is measured for each configuration in a fresh subprocess.
Outputs in --out: results.json, results.md, speedup_vs_mask_ratio.png, peak_memory.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import timm  # noqa: E402

import spark_sparse as ss  # noqa: E402
from _equivalence import compare, fp32_noise_floor  # noqa: E402
from _measure import Workload, peak_memory as peak_memory_in_process, summarize, time_once  # noqa: E402
from _report import write_json, write_markdown, write_plots  # noqa: E402
from _variants import Variant  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"])
    p.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    p.add_argument("--recipes", nargs="*", default=[],
                   help="also measure whole speed recipes: spark, fast, or fast@bf16 / fast@fp16 (own AMP dtype)")
    p.add_argument("--mask", nargs="+", type=float, default=[0.6, 0.75])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--what", choices=["encoder", "step"], default="encoder")
    p.add_argument("--quick", action="store_true", help="tiny models and sizes (CI)")
    p.add_argument("--memory", choices=["subprocess", "inprocess", "off"], default=None,
                   help="peak memory: one fresh subprocess per (model, mask) with glibc returning freed blocks "
                        "(default), in this process (cheaper, under-reads reused memory), or off")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.input_size, args.batch_size, args.mask = ["resnet18", "convnext_tiny"], 64, 2, [0.6]
        args.repeats, args.warmup = 2, 1
    args.memory = args.memory or "subprocess"
    return args


def select_variants(args) -> tuple[list[Variant], dict[str, str]]:
    infos = {b.name: b for b in ss.list_backends()}
    wanted = args.backends or list(infos)
    skipped = {}
    for name in wanted:
        if name not in infos:
            raise SystemExit(f"unknown backend {name!r}; registered: {', '.join(infos)}")
        if not infos[name].available:
            skipped[name] = infos[name].reason
            print(f"[bench] skipping backend {name}: {infos[name].reason}", flush=True)
    names = ["masked"] + [n for n in wanted if n != "masked" and n not in skipped]
    return [Variant(n) for n in names] + [Variant(f"recipe:{r}") for r in args.recipes], skipped


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
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


def peak_memory(args, works: list[Workload], model: str, mask_ratio: float) -> dict[str, float]:
    """Peak memory growth of each variant's fwd+bwd (or step) for one (model, mask ratio)."""
    if args.memory == "off":
        return {}
    if args.memory == "inprocess":
        return {w.variant.name: peak_memory_in_process(w, args.what)["peak_mem_mb"] for w in works}
    spec = dict(variants=[w.variant.name for w in works], model=model, input_size=args.input_size,
                mask_ratio=mask_ratio, batch=args.batch_size, dtype=args.dtype, device=args.device, what=args.what,
                threads=args.threads)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    result = subprocess.run([sys.executable, str(HERE / "_measure.py"), json.dumps(spec)], capture_output=True,
                            text=True, cwd=HERE, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {model} mask {mask_ratio} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(args) -> tuple[dict, list[dict]]:
    torch.set_num_threads(args.threads)
    variants, skipped = select_variants(args)
    configs = [(m, r) for m in args.models for r in args.mask]
    records, started = [], time.time()
    for index, (model, mask_ratio) in enumerate(configs):
        print(f"[bench] ({index + 1}/{len(configs)}) {model} mask {mask_ratio} {args.dtype} batch {args.batch_size}: "
              f"{', '.join(v.name for v in variants)}", flush=True)
        reference = Workload(variants[0], model, args.input_size, mask_ratio, args.batch_size, args.dtype, args.device)
        state = reference.spark.state_dict()
        works = [reference] + [Workload(v, model, args.input_size, mask_ratio, args.batch_size, args.dtype, args.device,
                                        state) for v in variants[1:]]
        # equivalence first: the timed steps below update each variant's weights
        equivalence = {w.variant.name: compare(w, reference) for w in works}
        noise = fp32_noise_floor(reference)
        samples = {w.variant.name: {} for w in works}
        total = args.warmup + args.repeats
        for rep in range(total):
            for work in works:                       # interleaved: A B C A B C ...
                for phase, fn in work.phases(args.what).items():
                    elapsed = time_once(fn, args.device)
                    if rep >= args.warmup:
                        samples[work.variant.name].setdefault(phase, []).append(elapsed)
            elapsed_all = time.time() - started
            print(f"[bench]   repeat {rep + 1}/{total} done ({elapsed_all:.0f} s elapsed)", flush=True)
        main_phase = "fwd_bwd_ms" if args.what == "encoder" else "step_ms"
        base = summarize(samples["masked"][main_phase])["median"]
        memory = peak_memory(args, works, model, mask_ratio)
        for work in works:
            stats = {phase: summarize(values) for phase, values in samples[work.variant.name].items()}
            median = stats[main_phase]["median"]
            record = {"model": model, "backend": work.variant.name, "mask_ratio": mask_ratio, "dtype": work.dtype,
                      "device": args.device, "batch_size": args.batch_size, "input_size": args.input_size,
                      "fwd_ms": stats.get("fwd_ms", {}).get("median"),
                      "fwd_bwd_ms": stats.get("fwd_bwd_ms", {}).get("median"),
                      "step_ms": stats.get("step_ms", {}).get("median"),
                      "images_per_s": args.batch_size / median * 1000, "speedup_vs_masked": base / median,
                      "peak_mem_mb": memory.get(work.variant.name), "max_abs_err": equivalence[work.variant.name]["max_abs_err"],
                      "max_rel_err": equivalence[work.variant.name]["max_rel_err"], "timings": stats,
                      "equivalence": equivalence[work.variant.name],
                      "fp32_noise_floor": {"max_abs_err": noise["max_abs_err"], "max_rel_err": noise["max_rel_err"],
                                           "errors": noise["errors"]},
                      "plan": work.spark.backend.plan(work.spark.encoder, args.device)}
            records.append(record)
            print(f"[bench]   {work.variant.name:<14} {main_phase} {median:8.1f} ms  {record['speedup_vs_masked']:.2f}x  "
                  f"peak {record['peak_mem_mb'] or 0:.0f} MB  max abs err {record['max_abs_err']:.1e}", flush=True)
    meta = {"command": shlex.join([sys.executable] + sys.argv), "what": args.what, "device": args.device,
            "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "machine": machine_info(),
            "versions": versions(), "skipped": skipped, "seconds": round(time.time() - started, 1),
            "memory_method": {"off": "not measured",
                              "inprocess": "peak growth of one fwd+bwd/step (VmHWM reset), in the benchmark process",
                              "subprocess": "peak growth of one fwd+bwd/step (VmHWM reset), fresh process per "
                                            "(model, mask), glibc returning freed blocks"}[args.memory]
            + (" (CUDA: max_memory_allocated)" if args.device == "cuda" else "")}
    return meta, records


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    meta, records = run(args)
    write_json(args.out / "results.json", meta, records)
    write_markdown(args.out / "results.md", meta, records)
    plots = write_plots(args.out, records)
    print(f"[bench] wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {', '.join(str(p) for p in plots)} "
          f"in {meta['seconds']} s")


if __name__ == "__main__":
    main()
