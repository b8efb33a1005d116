"""Where a whole SparK training step's time goes, per variant: encoder, densify, decoder, optimizer, the rest.

    python benchmarks/step_breakdown.py --models resnet50 convnext_tiny --variants recipe:spark recipe:fast recipe:fast@bf16
    python benchmarks/step_breakdown.py --models resnet18 --variants recipe:spark recipe:fast --decoder-widths 768 384 256

Each part is timed alone on the variant's real shapes (medians of ``--repeats`` after one warm-up,
variants interleaved): the encoder's forward+backward, the decoder's forward+backward on fixed
densified inputs, densify (norms, mask tokens, projections) forward+backward on fixed encoder
features, one optimizer step; "loss, rest" is the whole step minus those four.
This explains the step speed-ups of ``compare_backends.py --what step``; it is not a substitute.
``--decoder-widths 768 384 256`` times each variant with each width of spark-pretrain's
``--decoder_width`` (SparK's 768 by default): a narrower decoder shrinks the decoder, densify's
projections and their optimizer state, which no backend makes sparse.
With ``--out DIR`` the medians are also written to ``DIR/breakdown.json`` (with the run's commit,
machine and versions), which ``render_benchmarks.py`` turns into BENCHMARKS.md's table.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import spark_sparse as ss
from spark_sparse.autotune import AutotuneResult
from spark_sparse.decoder import SPARK_DECODER_WIDTH
from spark_sparse.speed import RECIPES
from _args import (HelpFormatter, at_least, decoder_width, first_problem, input_size, mask_ratio, positive_seconds,
                   unknown_model, unusable_backend)
from _measure import Workload, summarize, time_once
from _report import breakdown_lines, breakdown_title, provenance, row_label
from _variants import DTYPES, Variant, add_autotune_arguments, autocast, autotune_record, tune_workload

PARTS = ("step", "encoder", "densify", "decoder", "optimizer")
#: printed under each table: the last column is not timed itself, so it carries the other columns' noise
REST_NOTE = ("loss, rest = step - encoder - densify - decoder - optimizer, medians of parts timed alone: a remainder, "
             "not timed itself, so timing noise (or a part slower alone than inside the step) can make it negative")
VARIANT_SYNTAX = (f"a variant is a backend (e.g. masked, sparse) or recipe:<{'|'.join(RECIPES)}>, optionally with "
                  f"@<{'|'.join(DTYPES)}> for its autocast dtype (e.g. recipe:fast@bf16)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"], help="spark-sparse model names")
    p.add_argument("--variants", nargs="+", default=["recipe:spark", "recipe:fast", "recipe:fast@bf16"],
                   help=f"{VARIANT_SYNTAX}; each is timed on every model")
    p.add_argument("--decoder-widths", nargs="+", type=int, default=[SPARK_DECODER_WIDTH],
                   help="the decoder's width at its coarsest level (spark-pretrain's --decoder_width); each variant is "
                        "timed with each")
    p.add_argument("--mask", type=float, default=0.6, help="mask ratio")
    p.add_argument("--batch-size", type=int, default=8, help="images per timed call")
    p.add_argument("--input-size", type=int, default=224, help="image side in pixels (multiple of 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round (medians reported)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    add_autotune_arguments(p)
    p.add_argument("--out", type=Path, default=None, help="also write the medians to OUT/breakdown.json")
    args = p.parse_args(argv)
    problem = unknown_model("--models", args.models) or unknown_variant(args.variants) or first_problem([
        *[decoder_width("--decoder-widths", width) for width in args.decoder_widths],
        mask_ratio("--mask", args.mask), at_least("--batch-size", args.batch_size, 1),
        input_size("--input-size", args.input_size), at_least("--repeats", args.repeats, 1),
        at_least("--threads", args.threads, 1), positive_seconds("--autotune-budget", args.autotune_budget)])
    if problem:
        p.error(problem)
    args.decoder_widths = list(dict.fromkeys(args.decoder_widths))      # each width once
    return args


def unknown_variant(names: list[str]) -> Optional[str]:
    """The first of ``--variants`` that names no recipe, backend or dtype this machine runs (else building it
    would raise, after the models before it were built)."""
    for name in names:
        variant = Variant(name)
        if variant.dtype is not None and variant.dtype not in DTYPES:
            return f"--variants {name}: unknown dtype {variant.dtype!r} after '@'; {VARIANT_SYNTAX}"
        if variant.recipe is not None:
            if variant.recipe not in RECIPES:
                return f"--variants {name}: unknown recipe {variant.recipe!r}; {VARIANT_SYNTAX}"
        elif problem := unusable_backend("--variants", [variant.base]):
            registered = variant.base in {info.name for info in ss.list_backends()}
            return problem if registered else f"{problem}; {VARIANT_SYNTAX}"
    return None


def part_functions(work: Workload) -> dict[str, Callable[[], None]]:
    """Each part of ``work``'s step as a call to time alone. Densify and decoder run on fixed inputs (the
    encoder's features, densify's outputs) made once here, and back-propagate fixed random gradients, so
    neither times the parts before it nor a stand-in loss."""
    spark = work.spark
    with torch.no_grad(), autocast(work.device, work.dtype):
        features = spark.encode(work.images, work.fresh_mask())
        decoder_inputs = spark.densify(features)
        densify_grads = [torch.randn_like(t) for t in decoder_inputs]
        decoder_grad = torch.randn_like(spark.decoder(decoder_inputs))

    def densify() -> None:
        inputs = [f.with_data(f.data.detach().requires_grad_(True)) for f in features]     # fresh leaves, no copy
        with autocast(work.device, work.dtype):
            out = spark.densify(inputs)
        torch.autograd.backward(out, densify_grads)
        spark.zero_grad(set_to_none=True)

    def decoder() -> None:
        inputs = [t.detach().requires_grad_(True) for t in decoder_inputs]
        with autocast(work.device, work.dtype):
            out = spark.decoder(inputs)
        out.backward(decoder_grad)
        spark.zero_grad(set_to_none=True)

    def optimizer() -> None:
        for p in spark.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        work.optimizer.step()

    return {"step": work.step, "encoder": work.forward_backward, "densify": densify, "decoder": decoder,
            "optimizer": optimizer}


Key = tuple[str, int]         # (variant, decoder width)


def tuned_workloads(args, model: str) -> tuple[dict[Key, Workload], dict[Key, AutotuneResult]]:
    """Each (variant, decoder width)'s Workload and its tuning: a variant on backend auto is tuned before it is
    timed, its first width with ``--autotune``, the others from the cache that left (``cached``), so the rows of
    one variant run the same encoder kernels and differ in the decoder width alone."""
    works, tunings = {}, {}
    for name in args.variants:
        for index, width in enumerate(args.decoder_widths):
            works[name, width] = work = Workload(Variant(name), model, args.input_size, args.mask, args.batch_size,
                                                 "fp32", "cpu", decoder_width=width)
            mode = "cached" if index and args.autotune == "on" else args.autotune
            tunings[name, width] = tuned = tune_workload(work, work.dtype, mode, args.autotune_budget)
            if tuned.applies:
                print(f"[breakdown] {model} {name}, decoder width {width}: runs {tuned.backend} ({mode}, "
                      f"{tuned.seconds:.1f} s, not in the timings); {tuned.summary()}", flush=True)
    return works, tunings


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, tables = time.time(), []
    for model in args.models:
        works, tunings = tuned_workloads(args, model)
        parts = {key: part_functions(work) for key, work in works.items()}
        samples = {key: {part: [] for part in PARTS} for key in works}
        for rep in range(args.repeats + 1):
            for key in works:
                for part in PARTS:
                    elapsed = time_once(parts[key][part], "cpu")
                    if rep:
                        samples[key][part].append(elapsed)
            print(f"[breakdown] {model}: " + (f"repeat {rep}/{args.repeats}" if rep else "warm-up done"), flush=True)
        rows = []
        for name, width in works:
            med = {part: summarize(samples[name, width][part])["median"] for part in PARTS}
            rows.append({"variant": name, "decoder_width": width, **med,
                         "rest": med["step"] - sum(med[part] for part in PARTS[1:]),
                         "autotune": autotune_record(tunings[name, width])})
        table = {"model": model, "rows": rows}
        print("\n" + "\n".join([breakdown_title(table, vars(args)), *breakdown_lines(rows)]))
        negative = [row_label(row, rows) for row in rows if row["rest"] < 0]
        print(REST_NOTE + (f"; negative here for {', '.join(negative)}" if negative else ""))
        print()
        tables.append(table)
    if args.out is not None:
        write_breakdown(args, tables, time.time() - started)


def write_breakdown(args, tables: list[dict], seconds: float) -> None:
    from compare_backends import machine_info, versions

    meta = {"command": shlex.join([sys.executable] + sys.argv), "batch_size": args.batch_size,
            "input_size": args.input_size, "mask": args.mask, "decoder_widths": args.decoder_widths,
            "autotune": args.autotune,
            "threads": args.threads, "repeats": args.repeats,
            "seconds": round(seconds, 1), "machine": machine_info(), "versions": versions(),
            "provenance": provenance()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "breakdown.json").write_text(json.dumps({"meta": meta, "tables": tables}, indent=1))
    print(f"[breakdown] wrote {args.out / 'breakdown.json'}")


if __name__ == "__main__":
    main()
