#!/usr/bin/env python
"""Reference points that explain the benchmark tables: what this machine's matmul and SparK's decoder do.

    python benchmarks/reference_points.py --out benchmarks/results/cpu_reference_points
    python benchmarks/reference_points.py --quick          # tiny sizes, to check that it runs

Three sections, each timed as medians of ``--repeats`` after one warm-up, ``--threads`` threads:

1. ``matmul``: a square ``--matmul-size`` matmul in fp32 and bf16, in GFLOP/s: the machine's peak.
2. ``gemm``: the gather-GEMMs of the ``sparse`` encoder (``--model`` at ``--batch-size``, mask
   ``--mask``; every ordinary conv that runs on the ``gemm`` kernel, shapes taken from a real
   forward): ``torch.mm`` against the same product as a oneDNN 1x1 convolution
   (:func:`spark_sparse.kernels._rowmatmul.rows_times_weight`), in GFLOP/s. This is why
   ``kernels/_rowmatmul.py`` routes row GEMMs through oneDNN.
3. ``decoder``: SparK's decoder alone, forward+backward on fixed densified inputs, NCHW and
   channels-last, fp32 and bf16 autocast, with its FLOPs counted by ``torch.utils.flop_counter``.

Writes ``OUT/reference.json`` (tables for ``render_benchmarks.py`` plus the single values its
template quotes). CPU only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import spark_sparse as ss  # noqa: E402
from spark_sparse.backends.rows import SparseConv2d  # noqa: E402
from spark_sparse.kernels._rowmatmul import rows_times_weight  # noqa: E402
from _args import HelpFormatter  # noqa: E402
from _report import run_reference_sections  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()                                            # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def matmul_section(args) -> tuple[dict, dict]:
    n = args.matmul_size
    rows, values = [], {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        ms = median_ms(lambda: a @ b, args.repeats)
        gflops = 2 * n**3 / ms / 1e6
        rows.append([name, f"{n}x{n}", f"{ms:.1f}", f"{gflops:.0f}"])
        values[f"{name}_gflops"] = gflops
    return {"title": "Square matmul (the machine's peak)", "columns": ["dtype", "size", "ms", "GFLOP/s"],
            "rows": rows}, values


def gemm_shapes(args) -> list[tuple[int, int, int]]:
    """``(rows, K * C_in, C_out)`` of every gather-GEMM of the sparse encoder, from a real forward."""
    spark = ss.create_spark(args.model, backend="sparse", input_size=args.input_size, mask_ratio=args.mask)
    shapes = set()

    def hook(module, inputs, output):
        kh, kw = module.kernel_size
        if module.groups == 1 and module.in_channels > spark.backend.IMAGE_LIKE_CHANNELS:   # gemm's layers
            shapes.add((output.data.shape[0], kh * kw * module.in_channels, module.out_channels))

    handles = [m.register_forward_hook(hook) for m in spark.encoder.modules() if isinstance(m, SparseConv2d)]
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    with torch.no_grad():
        spark.encode(images, spark.mask(args.batch_size, generator=torch.Generator().manual_seed(0)))
    for handle in handles:
        handle.remove()
    return sorted(shapes)


def gemm_section(args) -> tuple[dict, dict]:
    rows, mm_rates, onednn_rates = [], [], []
    for n, k, o in gemm_shapes(args):
        x, w = torch.randn(n, k), torch.randn(o, k)
        flop = 2 * n * k * o
        mm = flop / median_ms(lambda: x @ w.t(), args.repeats) / 1e6
        onednn = flop / median_ms(lambda: rows_times_weight(x, w), args.repeats) / 1e6
        mm_rates.append(mm)
        onednn_rates.append(onednn)
        rows.append([f"{n} x {k} x {o}", f"{mm:.0f}", f"{onednn:.0f}"])
    values = {"mm_gflops_min": min(mm_rates), "mm_gflops_max": max(mm_rates),
              "onednn_gflops_min": min(onednn_rates), "onednn_gflops_max": max(onednn_rates)}
    return {"title": f"Gather-GEMMs of the sparse {args.model} encoder (batch {args.batch_size}, mask {args.mask}), "
                     f"GFLOP/s", "columns": ["rows x K*C_in x C_out", "torch.mm", "oneDNN 1x1 conv"],
            "rows": rows}, values


def decoder_section(args) -> tuple[dict, dict]:
    spark = ss.create_spark(args.model, backend="masked", input_size=args.input_size, mask_ratio=args.mask)
    images = torch.randn(args.decoder_batch, 3, args.input_size, args.input_size)
    with torch.no_grad():
        inputs = [t.detach() for t in spark.densify(spark.encode(images, spark.mask(args.decoder_batch)))]
    rows, values = [], {}
    for layout in ("nchw", "channels_last"):
        decoder = spark.decoder
        if layout == "channels_last":
            decoder = decoder.to(memory_format=torch.channels_last)
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            def fwd_bwd():
                xs = [t.clone().requires_grad_(True) for t in inputs]
                if layout == "channels_last":
                    xs = [t.contiguous(memory_format=torch.channels_last) for t in xs]
                with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = decoder(xs)
                out.float().square().mean().backward()
                decoder.zero_grad(set_to_none=True)

            if not values:
                with FlopCounterMode(display=False) as counter:
                    fwd_bwd()
                values["gflop"] = counter.get_total_flops() / 1e9
            ms = median_ms(fwd_bwd, args.repeats)
            values[f"{layout}_{name}_ms"] = ms
            rows.append([layout, name, f"{ms:.0f}", f"{values['gflop'] / ms * 1e3:.0f}"])
    title = (f"SparK's decoder alone, fwd+bwd, batch {args.decoder_batch}, {args.input_size} px "
             f"({values['gflop']:.0f} GFLOP counted)")
    return {"title": title, "columns": ["layout", "dtype", "ms", "GFLOP/s"], "rows": rows}, values


SECTIONS = {"matmul": matmul_section, "gemm": gemm_section, "decoder": decoder_section}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                   help="which reference points to measure")
    p.add_argument("--model", default="resnet50", help="model whose conv shapes the gemm section times")
    p.add_argument("--batch-size", type=int, default=16, help="encoder batch for the gemm shapes")
    p.add_argument("--decoder-batch", type=int, default=8, help="batch of the decoder section")
    p.add_argument("--input-size", type=int, default=224, help="image side in pixels (multiple of 32)")
    p.add_argument("--mask", type=float, default=0.6, help="mask ratio (sets the gemm shapes' active rows)")
    p.add_argument("--matmul-size", type=int, default=4096, help="side of the square matmul section's matrices")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per point (the median is reported)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, measures nothing useful")
    p.add_argument("--out", type=Path, default=Path("bench_out/reference_points"),
                   help="folder for reference.json and reference.md")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.decoder_batch, args.input_size = "resnet18", 2, 2, 64
        args.matmul_size, args.repeats = 128, 1
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return run_reference_sections(SECTIONS, args, __file__, argv, tag="reference")


if __name__ == "__main__":
    main()
