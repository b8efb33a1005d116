#!/usr/bin/env python
"""How far apart the autotune guard's timings can land by chance on this machine: an A/A control.

    python benchmarks/guard_noise.py --model resnet50d --batch-size 8 --rounds 12

The ``auto`` backend's whole-encoder guard (``spark_sparse/autotune/guard.py``) compares medians
of a few interleaved rounds of the encoder's forward+backward. This script times, interleaved and
with the order rotated every round as the guard does: the tuned plan (layer timings from the
autotune cache, measured where missing), the static rule, **the static rule again** (the same plan
under another name: any difference between the two is noise) and ``masked``. It prints each
variant's median over all rounds and the medians of consecutive ``--window``-round windows (what a
guard of that many rounds would see), the largest gap between the two identical plans' window
medians (a guard margin below that gap lets noise decide) and, from 5 rounds, how far apart the
middle half of each variant's rounds lies (the guard warns about its choice above 50%).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import spark_sparse as ss  # noqa: E402
from spark_sparse.autotune import AutotuneOptions, autotune  # noqa: E402
from spark_sparse.autotune.guard import UNSTEADY_SPREAD, EncoderVariant, middle_half, time_encoder_rounds  # noqa: E402
from spark_sparse.autotune.timing import WallClockTimer  # noqa: E402
from spark_sparse.backends.auto import LayerDecision, sparse_convs  # noqa: E402
from _args import HelpFormatter, at_least, first_problem, input_size, mask_ratio, unknown_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default="resnet50d", help="spark-sparse model name")
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder forward+backward")
    p.add_argument("--input-size", type=int, default=224, help="image side in pixels (multiple of 32)")
    p.add_argument("--mask", type=float, default=0.6, help="mask ratio")
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds, each timing every variant once")
    p.add_argument("--window", type=int, default=3, help="rounds per simulated guard")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    problem = unknown_model("--model", [args.model]) or first_problem([
        at_least("--batch-size", args.batch_size, 1), input_size("--input-size", args.input_size),
        mask_ratio("--mask", args.mask), at_least("--window", args.window, 1),
        ("--rounds", args.rounds, args.rounds >= args.window,
         f"at least --window ({args.window}): the gap is read between medians of whole {args.window}-round windows"),
        at_least("--threads", args.threads, 1)])
    if problem:
        p.error(problem)
    return args


def main(argv=None) -> dict[str, list[float]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    def build(backend: str) -> ss.SparK:
        torch.manual_seed(0)
        return ss.create_spark(args.model, backend=backend, input_size=args.input_size, mask_ratio=args.mask,
                               drop_path_rate=0.0)

    spark = build("auto")
    # without build_masked the guard is skipped: the result's decisions are the per-layer plan itself
    tuned = dict(autotune(spark, args.batch_size, "cpu", options=AutotuneOptions(progress=False)).decisions)
    static = {name: LayerDecision(name, spark.backend.static_kernel(conv, "cpu", torch.float32), "static rule")
              for name, conv in sparse_convs(spark.encoder)}
    differ = sum(tuned[name].kernel != static[name].kernel for name in static)
    print(f"[guard-noise] {args.model}: the tuned plan differs from the static rule on {differ} of {len(static)} convs")
    twin = build("masked")
    twin.load_state_dict(spark.state_dict())
    pin = spark.backend.pin
    variants = [EncoderVariant("tuned", spark, lambda: pin(spark.encoder, "cpu", torch.float32, tuned)),
                EncoderVariant("static", spark, lambda: pin(spark.encoder, "cpu", torch.float32, static)),
                EncoderVariant("static again", spark, lambda: pin(spark.encoder, "cpu", torch.float32, static)),
                EncoderVariant("masked", twin)]
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=torch.Generator().manual_seed(0))
    grid = (args.input_size // spark.downsample_ratio,) * 2
    active = ss.ActiveMask.random(args.batch_size, grid, args.mask, spark.downsample_ratio,
                                  generator=torch.Generator().manual_seed(0)).active
    samples = time_encoder_rounds(variants, images, active, None, WallClockTimer("cpu"), warmup=1,
                                  repeats=args.rounds)
    w = args.window
    windows = {name: [statistics.median(v[i:i + w]) for i in range(0, len(v) - w + 1, w)] for name, v in samples.items()}
    for name, values in samples.items():
        print(f"{name:>13}: median {statistics.median(values):7.1f} ms over {len(values)} rounds; "
              f"{w}-round medians " + " ".join(f"{m:.0f}" for m in windows[name]))
    if args.rounds >= 5:                       # as the guard: fewer rounds are too few to judge a spread by
        spans = {name: middle_half(values) for name, values in samples.items()}
        print("[guard-noise] middle half of the rounds spans: " + ", ".join(
            f"{name} {upper / lower - 1:.1%}" for name, (lower, upper) in spans.items())
            + f" (the guard warns above {UNSTEADY_SPREAD:.0%})")
    gaps = [abs(a - b) / min(a, b) for a, b in zip(windows["static"], windows["static again"])]
    overall = abs(statistics.median(samples["static"]) - statistics.median(samples["static again"]))
    print(f"[guard-noise] same plan twice: {w}-round medians up to {max(gaps):.1%} apart; over all rounds "
          f"{overall / statistics.median(samples['static']):.1%}")
    return samples


if __name__ == "__main__":
    main()
