"""The Triton programs behind :mod:`spark_sparse.kernels.triton_conv` (imported only when one runs).

Every program reads ``[N, C]`` rows through a neighbour table ``[N_dst, K]`` (``K`` taps, row-major
``(ky, kx)``): an entry ``>= N_src`` (a masked site, the zero padding, or "no output" in a
transposed table) reads a zero row, so masked loads do the job of SparK's zeros and no padded copy
of the rows is ever made. Accumulation is fp32 for every dtype; results are stored in the dtype of
the destination tensor.

Tiles are sized for Hopper (H100/H200: 227 KB shared memory per block, 132 SMs) and picked per layer shape by
``triton.autotune`` among a few configurations. Under ``TRITON_INTERPRET=1`` (the CPU interpreter
used by the tests) the programs run untuned with small tiles, so tiny test shapes still cover
several tiles and every masked edge.

Only long-standing Triton APIs are used (``tl.load``/``tl.store`` with masks, ``tl.dot`` with an
accumulator and ``input_precision``, ``triton.autotune``), so the same code runs on Triton 3.6 and 3.8
(the tests compile every program for sm_90 without a GPU; both versions were checked).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

__all__ = ["INTERPRETED", "gather_gemm", "gather_gemm_weight_grad", "depthwise", "depthwise_weight_grad"]

#: whether ``@triton.jit`` produced interpreted functions (``TRITON_INTERPRET=1`` when this module was imported)
INTERPRETED: bool


# ---------------------------------------------------------------------------------------- programs
# Row and tap counts are not specialised on (one compilation serves every batch, stride and kernel
# size); channel counts are, as they fix the rows' strides (16-aligned rows load as vectors).
@triton.jit(do_not_specialize=["n_dst", "n_src", "K"])
def _gather_gemm_kernel(src_ptr, table_ptr, w_ptr, out_ptr, n_dst, n_src, C, O, K,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SKIP_EMPTY_TAPS: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """``out[m, o] = sum_k sum_c src[table[m, k], c] * w[k, c, o]``; ``w`` is ``[K, C, O]``.

    Consecutive programs share one tile of destination rows (their gathered input stays in L2); the
    grid is one-dimensional, so the row count is not bound by CUDA's 65535 limit on grid axes 1 and 2.
    ``SKIP_EMPTY_TAPS`` skips a tap whose table entries in this tile are all empty (the transposed
    table of a strided conv, where most are); otherwise taps x channel chunks are one flat loop
    the compiler can software-pipeline.
    """
    n_tiles = tl.cdiv(O, BLOCK_N)
    pid_n = tl.program_id(0) % n_tiles
    pid_m = tl.program_id(0) // n_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < n_dst
    n_ok = offs_n < O
    table_rows = table_ptr + offs_m.to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SKIP_EMPTY_TAPS:
        for tap in range(0, K):
            rows = tl.load(table_rows + tap, mask=m_ok, other=n_src)
            valid = rows < n_src
            if tl.max(valid.to(tl.int32), axis=0) > 0:
                src_rows = src_ptr + rows.to(tl.int64) * C
                for c0 in range(0, C, BLOCK_K):
                    cs = c0 + offs_k
                    c_ok = cs < C
                    a = tl.load(src_rows[:, None] + cs[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0)
                    b = tl.load(w_ptr + (tap * C + cs).to(tl.int64)[:, None] * O + offs_n[None, :],
                                mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                    if DOT_IN_FP32:
                        a, b = a.to(tl.float32), b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        chunks = tl.cdiv(C, BLOCK_K)
        for step in range(0, K * chunks):
            tap = step // chunks
            cs = (step % chunks) * BLOCK_K + offs_k
            c_ok = cs < C
            rows = tl.load(table_rows + tap, mask=m_ok, other=n_src)
            valid = rows < n_src
            a = tl.load(src_ptr + rows.to(tl.int64)[:, None] * C + cs[None, :],
                        mask=valid[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_ptr + (tap * C + cs).to(tl.int64)[:, None] * O + offs_n[None, :],
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * O + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["n_dst", "n_src", "K", "rows_per_split"])
def _gather_gemm_weight_grad_kernel(src_ptr, table_ptr, grad_ptr, part_ptr, n_dst, n_src, C, O, K, rows_per_split,
                                    BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
                                    PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """``part[s, k, c, o] = sum_{m in split s} src[table[m, k], c] * grad[m, o]`` (fp32).

    Axis 0: output-channel tiles (they share the gathered input tile), axis 1: (tap, channel tile),
    axis 2: splits of the row reduction, summed afterwards (deterministic, no atomics).
    """
    pid_o = tl.program_id(0)
    pid_kc = tl.program_id(1)
    pid_s = tl.program_id(2)
    c_tiles = tl.cdiv(C, BLOCK_C)
    tap = pid_kc // c_tiles
    offs_c = (pid_kc % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    c_ok = offs_c < C
    o_ok = offs_o < O
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, n_dst)
    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < end
        rows = tl.load(table_ptr + offs_r.to(tl.int64) * K + tap, mask=r_ok, other=n_src)
        valid = rows < n_src
        a = tl.load(src_ptr + rows.to(tl.int64)[None, :] * C + offs_c[:, None],
                    mask=valid[None, :] & c_ok[:, None], other=0.0)                   # [BLOCK_C, BLOCK_R]
        g = tl.load(grad_ptr + offs_r.to(tl.int64)[:, None] * O + offs_o[None, :],
                    mask=r_ok[:, None] & o_ok[None, :], other=0.0)                   # [BLOCK_R, BLOCK_O]
        if DOT_IN_FP32:
            a, g = a.to(tl.float32), g.to(tl.float32)
        acc = tl.dot(a, g, acc, input_precision=PRECISION)
    part = part_ptr + ((pid_s * K + tap) * C + offs_c).to(tl.int64)[:, None] * O + offs_o[None, :]
    tl.store(part, acc, mask=c_ok[:, None] & o_ok[None, :])


@triton.jit(do_not_specialize=["n_dst", "n_src", "K"])
def _depthwise_kernel(src_ptr, table_ptr, w_ptr, out_ptr, n_dst, n_src, C, K,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out[m, c] = sum_k src[table[m, k], c] * w[k, c]``; ``w`` is ``[K, C]`` (1-D grid, channel tiles fastest)."""
    c_tiles = tl.cdiv(C, BLOCK_C)
    pid_c = tl.program_id(0) % c_tiles
    pid_m = tl.program_id(0) // c_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = offs_m < n_dst
    c_ok = offs_c < C
    table_rows = table_ptr + offs_m.to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for tap in range(0, K):
        rows = tl.load(table_rows + tap, mask=m_ok, other=n_src)
        valid = rows < n_src
        x = tl.load(src_ptr + rows.to(tl.int64)[:, None] * C + offs_c[None, :],
                    mask=valid[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(w_ptr + tap * C + offs_c, mask=c_ok, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["n_dst", "n_src", "K", "rows_per_split"])
def _depthwise_weight_grad_kernel(src_ptr, table_ptr, grad_ptr, part_ptr, n_dst, n_src, C, K, rows_per_split,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``part[s, k, c] = sum_{m in split s} src[table[m, k], c] * grad[m, c]`` (fp32).

    Axis 0: taps (programs of one row split read the same gradient tile, from L2), axis 1: channel
    tiles, axis 2: row splits. Products accumulate elementwise and are reduced over rows once.
    """
    tap = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, n_dst)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < end
        rows = tl.load(table_ptr + offs_r.to(tl.int64) * K + tap, mask=r_ok, other=n_src)
        valid = rows < n_src
        x = tl.load(src_ptr + rows.to(tl.int64)[:, None] * C + offs_c[None, :],
                    mask=valid[:, None] & c_ok[None, :], other=0.0)
        g = tl.load(grad_ptr + offs_r.to(tl.int64)[:, None] * C + offs_c[None, :],
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        acc += x.to(tl.float32) * g.to(tl.float32)
    tl.store(part_ptr + (pid_s * K + tap) * C + offs_c, tl.sum(acc, axis=0), mask=c_ok)


INTERPRETED = type(_gather_gemm_kernel).__name__ == "InterpretedFunction"

# ---------------------------------------------------------------------------------------- tuning
#: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): 128x128 for wide layers, narrower tiles for few
#: output channels or few rows; BLOCK_K 64 reads whole 128-byte lines of 64-channel bf16 rows, 32
#: keeps three to four stages of fp32 tiles in shared memory
_GEMM_CONFIGS = [(128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3)]
#: (BLOCK_C, BLOCK_O, BLOCK_R, warps, stages) for the weight gradient's row reduction
_WEIGHT_GRAD_CONFIGS = [(128, 128, 32, 8, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4)]
#: (BLOCK_M, BLOCK_C, warps) for depthwise: wide channel tiles keep each gathered row's read coalesced
_DEPTHWISE_CONFIGS = [(64, 128, 4), (128, 64, 4), (32, 128, 4), (128, 128, 8)]
_DEPTHWISE_WEIGHT_GRAD_CONFIGS = [(64, 128, 4), (128, 64, 4), (32, 128, 4)]
#: tiles under the CPU interpreter: small, so tiny test shapes span several tiles
_INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_C=16, BLOCK_O=16, BLOCK_R=16)


def _fitting(limits: dict[str, str]):
    """An ``early_config_prune``: drop configs whose tile in a dimension exceeds that dimension's size
    (rounded up to a power of two, at least 32), keeping the smallest if none fits."""
    def prune(configs, named_args, **kwargs):
        def size(arg):
            return max(32, triton.next_power_of_2(int(named_args[arg])))
        fitting = [c for c in configs if all(c.kwargs[block] <= size(arg) for block, arg in limits.items())]
        return fitting or [min(configs, key=lambda c: sum(c.kwargs[block] for block in limits))]
    return prune


#: milliseconds of warm-up and of timed calls per configuration when tuning (Triton's default: 25, 100)
TUNING_WARMUP_MS, TUNING_REP_MS = 5, 25


def _brief_benchmark(kernel_call, quantiles):
    """Triton's ``do_bench`` with shorter windows. Tuning runs on the first call of every layer shape
    key (forward, input and weight gradient programs), a few configurations each, and each timing
    costs about warm-up + window. ResNet-50's convs on these programs make 23 keys and up to 99
    timings per dtype: 12 s of windows alone at Triton's default 25 + 100 ms, 3 s at these (in a
    process that finds no cached choice, see :func:`_tuned`). ``do_bench`` repeats the call to fill
    the window (a 1 ms call: 25 times) and returns quantiles of those repeats."""
    return triton.testing.do_bench(kernel_call, warmup=TUNING_WARMUP_MS, rep=TUNING_REP_MS, quantiles=quantiles)


def _tuned(kernel, configs, key, limits):
    """The autotuned program; its choices are kept in Triton's cache folder (``cache_results``), so a
    resumed run, the next phase of a benchmark or another process on the same GPU skips the tuning."""
    if INTERPRETED:
        return None
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _fitting(limits)},
                           do_bench=_brief_benchmark, cache_results=True)(kernel)


_GEMM = _tuned(_gather_gemm_kernel, [
    triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s) for m, n, k, w, s in _GEMM_CONFIGS],
    key=["C", "O", "K", "SKIP_EMPTY_TAPS", "PRECISION"], limits={"BLOCK_N": "O", "BLOCK_K": "C"})
_GEMM_WEIGHT_GRAD = _tuned(_gather_gemm_weight_grad_kernel, [
    triton.Config(dict(BLOCK_C=c, BLOCK_O=o, BLOCK_R=r), num_warps=w, num_stages=s)
    for c, o, r, w, s in _WEIGHT_GRAD_CONFIGS], key=["C", "O", "K", "PRECISION"], limits={"BLOCK_C": "C", "BLOCK_O": "O"})
_DEPTHWISE = _tuned(_depthwise_kernel, [
    triton.Config(dict(BLOCK_M=m, BLOCK_C=c), num_warps=w) for m, c, w in _DEPTHWISE_CONFIGS], key=["C", "K"],
    limits={"BLOCK_C": "C"})
_DEPTHWISE_WEIGHT_GRAD = _tuned(_depthwise_weight_grad_kernel, [
    triton.Config(dict(BLOCK_R=r, BLOCK_C=c), num_warps=w) for r, c, w in _DEPTHWISE_WEIGHT_GRAD_CONFIGS],
    key=["C", "K"], limits={"BLOCK_C": "C"})


def _launch(tuned, raw, grid, *args, **constexprs):
    """Run the autotuned program, or the raw one with the interpreter's small tiles."""
    if tuned is None:
        blocks = {k: v for k, v in _INTERPRETER_BLOCKS.items() if k in raw.arg_names}
        raw[grid(blocks)](*args, **constexprs, **blocks)
    else:
        tuned[grid](*args, **constexprs)


def _row_splits(n_rows: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """``(splits, rows_per_split)`` of a row reduction: about four waves of programs over the SMs.

    Splits are whole multiples of 128 rows (the largest row tile), so no tile straddles two splits.
    No rows (every patch masked) is one empty split.
    """
    quantum = 16 if INTERPRETED else 128
    if n_rows == 0:
        return 1, quantum
    programs = 4 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2)
    splits = max(1, min(triton.cdiv(n_rows, quantum), triton.cdiv(programs, max(tiles, 1))))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), quantum) * quantum
    return triton.cdiv(n_rows, rows_per_split), rows_per_split


def _precision(tf32: bool) -> str:
    return "tf32" if tf32 else "ieee"


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """Widen bf16 tiles to fp32 (exactly) before ``tl.dot``: only under the interpreter.

    Triton's CPU interpreter keeps bf16 as raw ``uint16`` and its ``tl.dot`` multiplies those
    integers (checked with Triton 3.8: garbage results), so there the operands are widened first,
    which gives the same products and fp32 sums the tensor cores form from bf16 inputs.
    """
    return INTERPRETED and dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- launchers
def gather_gemm(src: torch.Tensor, table: torch.Tensor, weight_kco: torch.Tensor, skip_empty_taps: bool,
                tf32: bool) -> torch.Tensor:
    """``[N_src, C]`` rows through ``table [N_dst, K]`` times ``weight_kco [K, C, O]`` -> ``[N_dst, O]``."""
    n_dst, k = table.shape
    n_src, c = src.shape
    o = weight_kco.shape[2]
    out = src.new_empty(n_dst, o)
    if n_dst == 0:
        return out
    if n_src == 0:
        return out.zero_()

    def grid(meta):
        return (triton.cdiv(o, meta["BLOCK_N"]) * triton.cdiv(n_dst, meta["BLOCK_M"]),)
    _launch(_GEMM, _gather_gemm_kernel, grid, src, table, weight_kco, out, n_dst, n_src, c, o, k,
            SKIP_EMPTY_TAPS=skip_empty_taps, PRECISION=_precision(tf32), DOT_IN_FP32=_dot_in_fp32(src.dtype))
    return out


def gather_gemm_weight_grad(grad: torch.Tensor, src: torch.Tensor, table: torch.Tensor, tf32: bool) -> torch.Tensor:
    """``[K, C, O]`` fp32: per tap, ``src`` rows gathered through ``table`` transposed times ``grad [N_dst, O]``."""
    n_dst, k = table.shape
    n_src, c = src.shape
    o = grad.shape[1]
    splits, rows_per_split = _row_splits(n_dst, k * triton.cdiv(c, 64) * triton.cdiv(o, 64), src.device)
    part = torch.empty(splits, k, c, o, dtype=torch.float32, device=src.device)
    if n_dst == 0 or n_src == 0:
        return part.zero_().sum(0)

    def grid(meta):
        return triton.cdiv(o, meta["BLOCK_O"]), k * triton.cdiv(c, meta["BLOCK_C"]), splits
    _launch(_GEMM_WEIGHT_GRAD, _gather_gemm_weight_grad_kernel, grid, src, table, grad, part, n_dst, n_src, c, o, k,
            rows_per_split, PRECISION=_precision(tf32), DOT_IN_FP32=_dot_in_fp32(src.dtype))
    return part.sum(0)


def depthwise(src: torch.Tensor, table: torch.Tensor, weight_kc: torch.Tensor) -> torch.Tensor:
    """``out[m, c] = sum_k src[table[m, k], c] * weight_kc[k, c]`` -> ``[N_dst, C]``."""
    n_dst, k = table.shape
    n_src, c = src.shape
    out = src.new_empty(n_dst, c)
    if n_dst == 0:
        return out
    if n_src == 0:
        return out.zero_()

    def grid(meta):
        return (triton.cdiv(c, meta["BLOCK_C"]) * triton.cdiv(n_dst, meta["BLOCK_M"]),)
    _launch(_DEPTHWISE, _depthwise_kernel, grid, src, table, weight_kc, out, n_dst, n_src, c, k)
    return out


def depthwise_weight_grad(grad: torch.Tensor, src: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``[K, C]`` fp32: ``sum_m src[table[m, k], c] * grad[m, c]``."""
    n_dst, k = table.shape
    n_src, c = src.shape
    splits, rows_per_split = _row_splits(n_dst, k * triton.cdiv(c, 128), src.device)
    part = torch.empty(splits, k, c, dtype=torch.float32, device=src.device)
    if n_dst == 0 or n_src == 0:
        return part.zero_().sum(0)

    def grid(meta):
        return k, triton.cdiv(c, meta["BLOCK_C"]), splits
    _launch(_DEPTHWISE_WEIGHT_GRAD, _depthwise_weight_grad_kernel, grid, src, table, grad, part, n_dst, n_src, c, k,
            rows_per_split)
    return part.sum(0)
