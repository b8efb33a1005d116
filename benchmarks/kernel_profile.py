"""Where the sparse encoder's time and memory go, next to SparK's ``masked`` reference.

    python benchmarks/kernel_profile.py --model resnet50 --mask 0.6 --batch 16 --ops
    python benchmarks/kernel_profile.py --model convnext_tiny --layers --candidates gemm dense --memory
    python benchmarks/kernel_profile.py --device cuda --dtype bf16 --batch 128 --backends masked triton \\
        --layers --candidates triton gemm dense

Sections (each optional except the first):

1. encoder forward+backward of every ``--backends`` entry on ``--device``, timed interleaved
   (A B A B ...; CUDA synchronised around each run) with ``torch.set_num_threads(--threads)``;
   medians after ``--warmup`` runs; speed-up vs the first;
2. ``--ops``: one profiled fwd+bwd per backend, self time grouped into gather / GEMM+conv / scatter /
   norm / copy+alloc / elementwise / triton / other (torch.profiler op names; on CUDA the GPU time
   of the kernels each op launched);
3. ``--layers``: every converted conv of the sparse backend replayed alone on its real input
   (fwd+bwd under the same autocast, medians), grouped by layer kind and stride, with the kernel the
   backend chose and, for ``--candidates``, each other kernel that supports the layer (e.g.
   ``triton gemm dense`` on CUDA);
4. ``--memory``: peak memory growth of one fwd+bwd, each backend in a fresh process: resident memory
   on the CPU (glibc returning freed blocks, ``MALLOC_MMAP_THRESHOLD_``, so the figure follows live
   memory), allocated GPU memory on CUDA.

This is a diagnosis tool; ``benchmarks/compare_backends.py`` produces the official tables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _args import (HelpFormatter, at_least, first_problem, input_size, mask_ratio, unknown_model,  # noqa: E402
                   unusable_backend)
from _measure import peak_growth_mb, time_once  # noqa: E402
from _variants import DTYPES, add_model_kwargs_argument, parse_model_kwargs_argument  # noqa: E402

import spark_sparse as ss  # noqa: E402
from spark_sparse.kernels import ConvSpec, get_kernel, list_kernels  # noqa: E402
from spark_sparse.backends.rows import SparseConv2d  # noqa: E402
from spark_sparse.models.model_kwargs import format_model_kwargs  # noqa: E402


#: profiler op name -> category; the first matching rule wins (substring match on the op name)
OP_CATEGORIES = (
    ("triton", ("spark_sparse::triton_",)),
    ("scatter", ("index_put", "index_add", "scatter", "_unsafe_index_put")),
    ("gather", ("aten::index", "index_select", "aten::gather", "embedding")),
    ("GEMM+conv", ("aten::mm", "addmm", "bmm", "convolution", "conv2d", "mkldnn", "linear", "matmul")),
    ("norm", ("batch_norm", "layer_norm", "native_layer_norm")),
    ("copy+alloc", ("copy_", "aten::cat", "zeros", "fill_", "clone", "empty", "contiguous", "to_copy",
                    "aten::stack", "repeat")),
    ("elementwise", ("aten::add", "aten::mul", "aten::sub", "aten::div", "relu", "gelu", "threshold", "addcmul",
                     "aten::sum", "aten::where", "aten::neg", "square", "aten::pow", "aten::mean")),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="resnet50", help="spark-sparse model name")
    add_model_kwargs_argument(p, "the model constructor's arguments, as spark-pretrain's --model_kwargs")
    p.add_argument("--device", default="cpu", help="cpu or cuda (e.g. cuda:0)")
    p.add_argument("--backends", nargs="+", default=["masked", "sparse"],
                   help="backends to time, interleaved; speed-ups and memory ratios are against the first")
    p.add_argument("--mask", type=float, default=0.6, help="mask ratio")
    p.add_argument("--batch", type=int, default=16, help="images per fwd+bwd")
    p.add_argument("--input-size", type=int, default=224, help="image side in pixels (multiple of 32)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (fp32: none)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per backend, and per conv with --layers")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per backend first")
    p.add_argument("--ops", action="store_true", help="profiler breakdown by op category")
    p.add_argument("--layers", action="store_true", help="per-conv-layer replay of the sparse backend")
    p.add_argument("--candidates", nargs="*", default=[],
                   help="with --layers: also replay every conv on each of these kernels (e.g. gemm dense)")
    p.add_argument("--memory", action="store_true", help="peak memory per backend in fresh processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, images and mask")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parse_model_kwargs_argument(p, args)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible to torch on this machine")
    unknown = sorted(set(args.candidates) - set(list_kernels()))
    if unknown:
        p.error(f"--candidates {' '.join(unknown)}: not registered kernels; registered: {', '.join(sorted(list_kernels()))}")
    if args.layers and set(args.backends) <= {"masked"}:
        p.error("--layers replays the convs of the first backend other than masked: add one to --backends")
    problem = unknown_model("--model", [args.model]) or unusable_backend("--backends", args.backends)
    problem = problem or first_problem([
        mask_ratio("--mask", args.mask), at_least("--batch", args.batch, 1),
        input_size("--input-size", args.input_size), at_least("--threads", args.threads, 1),
        at_least("--repeats", args.repeats, 1), at_least("--warmup", args.warmup, 0)])
    if problem:
        p.error(problem)
    return args


class EncoderWork:
    """One backend's encoder on fixed images, weights and mask pattern (a fresh mask object per call,
    so index tables are built inside the timed region as in training)."""

    def __init__(self, args, backend: str, state: dict | None = None):
        torch.manual_seed(args.seed)
        self.device = torch.device(args.device)
        self.spark = ss.create_spark(args.model, backend=backend, input_size=args.input_size, mask_ratio=args.mask,
                                     drop_path_rate=0.0, **args.model_kwargs_values)
        if state is not None:
            self.spark.load_state_dict(state)
        self.spark.to(self.device)
        self.images = torch.randn(args.batch, 3, args.input_size, args.input_size,
                                  generator=torch.Generator().manual_seed(args.seed)).to(self.device)
        self.active = self.spark.mask(args.batch, generator=torch.Generator().manual_seed(args.seed + 1)
                                      ).active.to(self.device)
        self.dtype = DTYPES[args.dtype]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def mask(self) -> ss.ActiveMask:
        return ss.ActiveMask(self.active.clone(), self.spark.downsample_ratio)

    def fwd_bwd(self) -> None:
        with self.autocast():
            feats = self.spark.encode(self.images, self.mask())
            loss = sum(f.active_rows().float().square().mean() for f in feats)   # as compare_backends
        loss.backward()
        self.spark.zero_grad(set_to_none=True)


def timed(fn, device: torch.device) -> float:
    return time_once(fn, str(device))


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def time_interleaved(works: dict[str, EncoderWork], repeats: int, warmup: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in works}
    for i in range(warmup + repeats):
        for name, work in works.items():
            ms = timed(work.fwd_bwd, work.device)
            if i >= warmup:
                samples[name].append(ms)
    return samples


def categorize(op: str) -> str:
    for category, needles in OP_CATEGORIES:
        if any(n in op for n in needles):
            return category
    return "other"


def op_breakdown(work: EncoderWork) -> dict[str, float]:
    """Milliseconds per op category over one profiled fwd+bwd: self CPU time of each op on the CPU;
    on CUDA the GPU time of the kernels each op launched itself (CPU-side op events only, so no
    kernel is counted twice)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = work.device.type == "cuda"
    work.fwd_bwd()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        work.fwd_bwd()
        if cuda:
            torch.cuda.synchronize()
    shares: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if cuda and event.device_type != DeviceType.CPU:
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        shares[categorize(event.key)] += us / 1000
    return dict(shares)


def layer_kind(conv: SparseConv2d) -> str:
    k = conv.kernel_size[0]
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return f"depthwise {k}x{k}"
    if conv.in_channels <= 4:
        return f"stem {k}x{k} s{conv.stride[0]}"
    if conv.stride[0] > 1:
        return f"{k}x{k} s{conv.stride[0]}"
    return f"{k}x{k}"


def layer_replay(work: EncoderWork, repeats: int, candidates: list[str]) -> list[dict]:
    """Each sparse conv alone, fwd+bwd on the input it saw in a real forward (medians of ``repeats``),
    on the kernel the backend chose and on each of ``candidates`` that supports it (the reasons of
    those that do not are kept in the row's ``"skipped"``)."""
    captured = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: captured.append((name, mod, inp[0])))
             for name, m in work.spark.encoder.named_modules() if isinstance(m, SparseConv2d)]
    with torch.no_grad(), work.autocast():
        work.spark.encode(work.images, work.mask())
    for h in hooks:
        h.remove()
    rows = []
    for name, conv, rows_in in captured:
        x = rows_in.data.detach().requires_grad_(name != captured[0][0])   # the stem's input needs no grad
        features = type(rows_in)(x, rows_in.mask, rows_in.stride)

        def run(conv=conv, features=features):
            with work.autocast():
                out = conv(features).data
            out.backward(torch.ones_like(out))
        dtype = work.dtype if work.dtype != torch.float32 else x.dtype     # what the conv computes in
        chosen = conv.kernel_for(x.device, dtype)
        row = {"layer": name, "kind": layer_kind(conv), "stride": rows_in.stride, "kernel": chosen.NAME,
               "shape": f"{conv.in_channels}->{conv.out_channels}", "rows": x.shape[0]}
        key = (x.device.type, dtype)
        spec = ConvSpec.of(conv, x.device, dtype)
        row["skipped"] = {c: reasons for c in candidates if (reasons := list_kernels()[c].not_supported_reasons(spec))}
        for kernel in [chosen.NAME] + [c for c in candidates if c not in row["skipped"]]:
            conv._chosen[key] = get_kernel(kernel)
            run()                                   # warm-up (and Triton's autotuning) outside the timing
            row["ms" if kernel == chosen.NAME and "ms" not in row else kernel] = median(
                [timed(run, work.device) for _ in range(repeats)])
        conv._chosen[key] = chosen
        conv.zero_grad(set_to_none=True)
        rows.append(row)
    return rows


def memory_child(args) -> None:
    """Fresh process: peak memory growth of one fwd+bwd (after a warm-up) for one backend."""
    torch.set_num_threads(args.threads)
    work = EncoderWork(args, args.memory_child)
    work.fwd_bwd()
    print(json.dumps({"peak_mb": peak_growth_mb(work.fwd_bwd, work.device)}))


def measure_memory(args, backend: str) -> float:
    argv = [sys.executable, __file__, "--memory-child", backend, "--backends", backend, "--device", args.device,
            "--model", args.model, "--mask", str(args.mask),
            "--batch", str(args.batch), "--input-size", str(args.input_size), "--dtype", args.dtype,
            "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.model_kwargs:
        argv += ["--model-kwargs", *args.model_kwargs]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    built = f" ({format_model_kwargs(args.model_kwargs_values)})" if args.model_kwargs_values else ""
    print(f"# {args.model}{built}, mask {args.mask}, batch {args.batch}, {args.input_size} px, {args.dtype}, "
          f"{where}, torch {torch.__version__}")
    works: dict[str, EncoderWork] = {}
    for name in args.backends:
        works[name] = EncoderWork(args, name, next(iter(works.values())).spark.state_dict() if works else None)

    samples = time_interleaved(works, args.repeats, args.warmup)
    base = median(samples[args.backends[0]])
    print(f"\n## encoder fwd+bwd, median of {args.repeats} after {args.warmup} warm-up, interleaved")
    for name, s in samples.items():
        print(f"{name:<10} {median(s):8.1f} ms  (min {min(s):7.1f}, max {max(s):7.1f})  "
              f"speed-up {base / median(s):5.2f}x")

    if args.ops:
        clock = "GPU time of the kernels each op launched" if device.type == "cuda" else "self CPU time"
        print(f"\n## {clock} by op category, one profiled fwd+bwd (ms, share)")
        for name, work in works.items():
            shares = op_breakdown(work)
            total = sum(shares.values())
            parts = ", ".join(f"{k} {v:.0f} ({v / total:.0%})" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
            print(f"{name:<10} total {total:.0f}: {parts}")

    sparse_name = next((n for n in args.backends if n != "masked"), None)
    if args.layers and sparse_name:
        rows = layer_replay(works[sparse_name], args.repeats, args.candidates)
        print(f"\n## {sparse_name}: convs replayed alone, fwd+bwd ms (median of {args.repeats})")
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for row in rows:
            groups[(row["kind"], row["stride"], row["kernel"])].append(row)
        total = sum(r["ms"] for r in rows)
        for (kind, stride, kernel), members in sorted(groups.items(), key=lambda kv: -sum(r["ms"] for r in kv[1])):
            ms = sum(r["ms"] for r in members)
            alternatives = "".join(f"  {c}: {sum(r.get(c, float('nan')) for r in members):.1f}" for c in args.candidates)
            print(f"{kind:<14} in-stride {stride:<3} {kernel:<8} x{len(members):<3} {ms:8.1f} ms ({ms / total:5.1%})"
                  f"{alternatives}")
        print(f"{'all convs':<14} {'':<12} {'':<8} x{len(rows):<3} {total:8.1f} ms")
        for candidate in args.candidates:
            skipped = [r for r in rows if candidate in r["skipped"]]
            if skipped:
                print(f"{candidate} not run on {len(skipped)} of {len(rows)} convs, e.g. {skipped[0]['layer']}: "
                      f"{'; '.join(skipped[0]['skipped'][candidate])}")

    if args.memory:
        memory = "allocated GPU memory" if device.type == "cuda" else "RSS"
        print(f"\n## peak {memory} growth of one fwd+bwd (fresh process per backend)")
        mems = {name: measure_memory(args, name) for name in args.backends}
        for name, mb in mems.items():
            print(f"{name:<10} {mb:8.0f} MB  ratio {mb / mems[args.backends[0]]:.2f}")


if __name__ == "__main__":
    main()
