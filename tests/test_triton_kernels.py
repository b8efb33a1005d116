"""The Triton kernels against SparK's masked dense convolution: forward, input and weight gradients.

Reference: the rows scattered into a zero map (masked sites are zeros), ``F.conv2d`` in fp64,
gathered at the active output sites; gradients by autograd through that. Errors are bounded
relative to the same sums over absolute values (the standard bound of a rounded sum), per dtype.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which ``@triton.jit``
reads when the programs are defined. This process may already hold compiled (non-interpreted)
programs, or another test may have imported triton, so the interpreter runs in a worker process
of its own (this file run as a script), started once per session; each test sends it one job.
The ``gpu`` tests run the same checks in-process on CUDA at the real layer shapes of ResNet-50 and
ConvNeXt-B.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spark_sparse import ActiveMask
from spark_sparse.kernels import ConvCall, ConvSpec, get_kernel, list_kernels
from spark_sparse.kernels.gemm import transposed_table

# (name, in_ch, out_ch, kernel, stride, padding, dilation, groups, in_stride): tiny, so that the
# interpreter is quick, yet several 16-row / 16-channel tiles with ragged edges (20 input channels)
SHAPES = [
    ("1x1", 16, 24, 1, 1, 0, 1, 1, 8),
    ("3x3", 20, 24, 3, 1, 1, 1, 1, 8),
    ("3x3_s2", 20, 24, 3, 2, 1, 1, 1, 8),
    ("1x1_s2", 16, 24, 1, 2, 0, 1, 1, 8),
    ("2x2_s2", 16, 24, 2, 2, 0, 1, 1, 8),
    ("3x3_dilated", 16, 16, 3, 1, 2, 2, 1, 8),
    ("depthwise7x7", 16, 16, 7, 1, 3, 1, 16, 8),
    ("depthwise3x3_s2", 16, 16, 3, 2, 1, 1, 16, 8),
]
SHAPE_IDS = [s[0] for s in SHAPES]
#: bound on |error| relative to the absolute-value sums: fp32 accumulates exactly enough for 1e-5;
#: bf16 / fp16 outputs are rounded once to 8 / 11 mantissa bits
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
WORKER_TIMEOUT_S = 300


# ------------------------------------------------------------------------------ cases and reference
def _call(mask: ActiveMask, shape) -> ConvCall:
    _, _, _, k, s, p, d, g, in_stride = shape
    return ConvCall(mask, in_stride, in_stride * s, (k, k), (p, p), (d, d), g)


def make_case(shape, dtype: torch.dtype, mask: ActiveMask, seed: int = 0, bias: bool = False) -> dict:
    """Rows, weight, bias and an output-gradient probe for ``shape`` on ``mask``, in ``dtype``."""
    name, cin, cout, k, s, p, d, g, in_stride = shape
    gen = torch.Generator().manual_seed(seed)
    call = _call(mask, shape)
    x = torch.randn(call.num_in, cin, generator=gen)
    w = torch.randn(cout, cin // g, k, k, generator=gen) / (cin // g * k * k) ** 0.5
    b = torch.randn(cout, generator=gen) if bias else None
    probe = torch.randn(call.num_out, cout, generator=gen)
    to = dict(dtype=dtype, device=mask.device)
    return {"x": x.to(**to), "w": w.to(**to), "b": None if b is None else b.to(**to), "probe": probe.to(**to)}


def masked_reference(case: dict, shape, mask: ActiveMask, absolute: bool = False) -> dict:
    """SparK's masked dense conv in fp64 on the case's (dtype-rounded) values; with ``absolute`` the
    same sums over |values| (the scale every error is measured against)."""
    _, cin, cout, k, s, p, d, g, in_stride = shape
    prep = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
    x, w, probe = (prep(case[n]).requires_grad_(n != "probe") for n in ("x", "w", "probe"))
    b = None if case["b"] is None else prep(case["b"]).requires_grad_(True)
    site_in = mask.dense_at(in_stride)[:, 0]
    dense = x.new_zeros(*site_in.shape, cin).index_put((site_in,), x).permute(0, 3, 1, 2)
    out = F.conv2d(dense, w, b, stride=s, padding=p, dilation=d, groups=g)
    rows = out.permute(0, 2, 3, 1)[mask.dense_at(in_stride * s)[:, 0]]
    (rows * probe).sum().backward()
    return {"out": rows.detach(), "grad_x": x.grad, "grad_w": w.grad, "grad_b": None if b is None else b.grad}


def run_triton_op(case: dict, shape, mask: ActiveMask) -> dict:
    """The custom op (forward and both gradients) on the case, through the neighbour tables."""
    from spark_sparse.kernels.triton_conv import triton_depthwise_conv, triton_gather_gemm_conv

    call = _call(mask, shape)
    x, w = case["x"].clone().requires_grad_(True), case["w"].clone().requires_grad_(True)
    table, table_t = call.neighbours(), transposed_table(call)
    if call.groups > 1:
        out = triton_depthwise_conv(x, w, table, table_t)
    else:
        out = triton_gather_gemm_conv(x, w, table, table_t, False)
    out.backward(case["probe"])
    return {"out": out.detach(), "grad_x": x.grad, "grad_w": w.grad}


def run_triton_kernel(case: dict, shape, mask: ActiveMask) -> dict:
    """``TritonKernel.conv`` (the kernel as a backend calls it: bias, 1x1 routing, table reuse)."""
    call = _call(mask, shape)
    leaves = {n: case[n].clone().requires_grad_(True) for n in ("x", "w", "b") if case[n] is not None}
    out = get_kernel("triton").conv(leaves["x"], leaves["w"], leaves.get("b"), call)
    out.backward(case["probe"])
    return {"out": out.detach(), **{f"grad_{n}": t.grad for n, t in leaves.items()}}


def opcheck_triton_op(case: dict, shape, mask: ActiveMask) -> str:
    """``torch.library.opcheck`` of the op for ``shape``: "" when it passes, else the failure."""
    from spark_sparse.kernels.triton_conv import triton_depthwise_conv, triton_gather_gemm_conv

    call = _call(mask, shape)
    args = (case["x"].clone().requires_grad_(True), case["w"].clone().requires_grad_(True), call.neighbours(),
            transposed_table(call))
    op, args = (triton_depthwise_conv, args) if call.groups > 1 else (triton_gather_gemm_conv, args + (False,))
    try:
        torch.library.opcheck(op, args)
    except Exception as exc:       # reported to the test, which fails with it
        return f"{type(exc).__name__}: {exc}"
    return ""


def assert_matches(got: dict, want: dict, scale: dict, dtype: torch.dtype, what: str) -> None:
    for name, reference in want.items():
        if reference is None:
            continue
        error = (got[name].double().cpu() - reference.cpu()).abs()
        excess = error - TOLERANCE[dtype] * (scale[name].cpu() + 1e-30)
        assert float(excess.max()) <= 0, (f"{what}: {name} max error {float(error.max()):.3g} "
                                          f"(largest reference {float(reference.abs().max()):.3g})")


# ------------------------------------------------------------------------------ interpreter worker
def interpreter_problem() -> str:
    """Why this Triton's interpreter cannot run our programs here ("" when it can).

    Every program loops over taps or rows with bounds known only at run time. Triton 3.6's
    interpreter fails on such a loop under numpy 2.4 (it converts a 1-element array with ``int()``,
    which that numpy refuses); Triton 3.8, or Triton 3.6 with numpy 2.2, run it (checked).
    """
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count_to(out_ptr, n):
        total = 0
        for _ in range(0, n):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_to[(1,)](out, 3)
    except Exception as exc:
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop with run-time bounds under numpy "
                f"{numpy.__version__} ({type(exc).__name__}: {exc}); Triton 3.8, or numpy 2.2, can")
    return "" if int(out) == 3 else f"Triton {triton.__version__}'s interpreter counted {int(out)} iterations of 3"


def _worker_main() -> None:
    """Worker loop: each stdin line names a job file; run it, save the result, answer on stdout."""
    from spark_sparse.kernels.triton_conv import TRITON

    if not TRITON.get().INTERPRETED:
        raise SystemExit("worker: TRITON_INTERPRET=1 was not in effect when the Triton programs were defined")
    print(f"@@ready {interpreter_problem()}", flush=True)
    jobs = {"op": run_triton_op, "kernel": run_triton_kernel, "opcheck": opcheck_triton_op}
    for line in sys.stdin:
        path = line.strip()
        job = torch.load(path, weights_only=False)
        mask = ActiveMask(job["active"])
        torch.save(jobs[job["kind"]](job["case"], job["shape"], mask), path + ".out")
        print(f"@@done {path}", flush=True)


class InterpreterWorker:
    """A child process running the kernels under ``TRITON_INTERPRET=1`` (jobs in, results out)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.log = open(folder / "worker_stderr.txt", "w+")
        env = dict(os.environ, TRITON_INTERPRET="1")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     cwd=Path(__file__).resolve().parent.parent)
        self.jobs = 0
        #: why the interpreter cannot run the programs here ("" when it can), as the worker found
        self.problem = self._answer("@@ready ").strip()

    def _answer(self, prefix: str) -> str:
        for line in self.proc.stdout:      # the worker's answer (anything else it prints is skipped)
            if line.startswith(prefix):
                return line[len(prefix):]
        self.log.seek(0)
        raise RuntimeError(f"the interpreter worker exited (code {self.proc.wait()}):\n{self.log.read()[-4000:]}")

    def run(self, kind: str, case: dict, shape, mask: ActiveMask):
        self.jobs += 1
        path = str(self.folder / f"job{self.jobs}.pt")
        torch.save({"kind": kind, "case": case, "shape": shape, "active": mask.active}, path)
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        self._answer("@@done ")
        return torch.load(path + ".out", weights_only=False)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton): its CPU interpreter cannot run")
    with tempfile.TemporaryDirectory() as folder:
        worker = InterpreterWorker(Path(folder))
        try:
            if worker.problem:
                pytest.skip(worker.problem)
            yield worker
        finally:
            worker.close()


def tiny_mask() -> ActiveMask:
    """Two images of 2x3 patches (64x96 px), three visible each: at stride 8, 96 active rows."""
    return ActiveMask.random(2, (2, 3), 0.5, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_interpreted_op_matches_masked_dense_conv(interpreter, shape, dtype):
    mask = tiny_mask()
    case = make_case(shape, dtype, mask)
    got = interpreter.run("op", case, shape, mask)
    want, scale = masked_reference(case, shape, mask), masked_reference(case, shape, mask, absolute=True)
    assert_matches(got, {k: want[k] for k in got}, scale, dtype, f"{shape[0]} {DTYPE_IDS[dtype]}")


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[7]], ids=["1x1", "3x3_s2", "depthwise3x3_s2"])
def test_interpreted_kernel_conv_matches_masked_dense_conv_with_bias(interpreter, shape):
    mask = tiny_mask()
    case = make_case(shape, torch.float32, mask, seed=1, bias=True)
    got = interpreter.run("kernel", case, shape, mask)
    want, scale = masked_reference(case, shape, mask), masked_reference(case, shape, mask, absolute=True)
    assert_matches(got, want, scale, torch.float32, shape[0])


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[7]], ids=["3x3_s2", "depthwise3x3_s2"])
def test_interpreted_op_passes_opcheck(interpreter, shape):
    mask = tiny_mask()
    failure = interpreter.run("opcheck", make_case(shape, torch.float32, mask), shape, mask)
    assert failure == "", failure


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[6]], ids=["3x3_s2", "depthwise7x7"])
def test_interpreted_op_runs_on_a_batch_without_active_rows(interpreter, shape):
    """Every patch masked: empty outputs and input gradients, a zero weight gradient (no crash)."""
    mask = ActiveMask(torch.zeros(2, 1, 2, 3, dtype=torch.bool))
    got = interpreter.run("op", make_case(shape, torch.float32, mask), shape, mask)
    assert got["out"].shape == (0, shape[2]) and got["grad_x"].shape == (0, shape[1])
    assert got["grad_w"].shape == (shape[2], shape[1] // shape[7], shape[3], shape[3])
    assert not got["grad_w"].any()


# ------------------------------------------------------------------------------ compiled for the GPU
#: (program, tensor dtype, constexprs beyond the tile): each program once, every dtype at least once,
#: both loop structures of the gather-GEMM, and TF32
HOPPER_BUILDS = [
    ("_gather_gemm_kernel", "fp32", dict(SKIP_EMPTY_TAPS=False, PRECISION="ieee", DOT_IN_FP32=False)),
    ("_gather_gemm_kernel", "bf16", dict(SKIP_EMPTY_TAPS=True, PRECISION="ieee", DOT_IN_FP32=False)),
    ("_gather_gemm_kernel", "fp32", dict(SKIP_EMPTY_TAPS=True, PRECISION="tf32", DOT_IN_FP32=False)),
    ("_gather_gemm_weight_grad_kernel", "fp16", dict(PRECISION="ieee", DOT_IN_FP32=False)),
    ("_depthwise_kernel", "bf16", {}),
    ("_depthwise_weight_grad_kernel", "fp32", {}),
]
TILES = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, BLOCK_C=64, BLOCK_O=128, BLOCK_R=64)


H100_SHARED_BYTES = 227 * 1024


def _compile_for_hopper(program: str, dtype: str, constants: dict, num_warps: int = 4, num_stages: int = 3,
                        tiles: dict | None = None):
    """Compile one program to an sm_90 binary with Triton's bundled ptxas (no GPU needed) and check
    that it fits an H100's shared memory (what a launch on the GPU would refuse). ``tiles``: block
    sizes offered to every program, each taking those it has."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: the programs are interpreted functions, not compilable")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spark_sparse.kernels import _triton_kernels

    fn = getattr(_triton_kernels, program)
    pointer = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}[dtype]
    signature, aligned = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = {"table_ptr": "*i64", "part_ptr": "*fp32"}.get(name, pointer)
            aligned[(i,)] = [["tt.divisibility", 16]]        # as torch's allocations are, so loads vectorise
        else:
            signature[name] = "i32"
            if name in ("C", "O"):
                aligned[(i,)] = [["tt.divisibility", 16]]
    constants = {**{k: v for k, v in (tiles or {}).items() if k in fn.arg_names}, **constants}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    assert compiled.asm.get("cubin"), "no sm_90 binary produced"
    assert compiled.metadata.shared <= H100_SHARED_BYTES, \
        f"{compiled.metadata.shared} bytes of shared memory > H100's {H100_SHARED_BYTES}"



@pytest.mark.parametrize("program,dtype,constexprs", HOPPER_BUILDS,
                         ids=[f"{p.strip('_')}-{d}" + ("-skip" if c.get("SKIP_EMPTY_TAPS") else "") +
                              ("-tf32" if c.get("PRECISION") == "tf32" else "") for p, d, c in HOPPER_BUILDS])
def test_program_compiles_for_hopper_without_a_gpu(program, dtype, constexprs):
    """A program the interpreter accepts but the GPU compiler would refuse fails here, not on the lent GPU."""
    _compile_for_hopper(program, dtype, constexprs, tiles=TILES)


def _autotune_builds() -> list:
    """Every configuration the autotuner may pick, per program: (program, dtype, constants, warps, stages).
    fp32 holds the largest tiles in shared memory; the two tl.dot programs also in bf16 (other MMA path)."""
    if importlib.util.find_spec("triton") is None:
        return [pytest.param(None, id="no-triton", marks=pytest.mark.skip(reason="triton is not installed"))]
    from spark_sparse.kernels import _triton_kernels as k
    builds = []
    for m, n, kk, warps, stages in k._GEMM_CONFIGS:
        for dtype in ("fp32", "bf16"):
            builds.append(("_gather_gemm_kernel", dtype, dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=kk, SKIP_EMPTY_TAPS=True,
                                                            PRECISION="ieee", DOT_IN_FP32=False), warps, stages))
    for c, o, r, warps, stages in k._WEIGHT_GRAD_CONFIGS:
        for dtype in ("fp32", "bf16"):
            builds.append(("_gather_gemm_weight_grad_kernel", dtype, dict(BLOCK_C=c, BLOCK_O=o, BLOCK_R=r,
                                                                        PRECISION="ieee", DOT_IN_FP32=False), warps, stages))
    for m, c, warps in k._DEPTHWISE_CONFIGS:
        builds.append(("_depthwise_kernel", "fp32", dict(BLOCK_M=m, BLOCK_C=c), warps, 3))
    for r, c, warps in k._DEPTHWISE_WEIGHT_GRAD_CONFIGS:
        builds.append(("_depthwise_weight_grad_kernel", "fp32", dict(BLOCK_R=r, BLOCK_C=c), warps, 3))
    return [pytest.param(b, id=f"{b[0].strip('_')}-{b[1]}-" + "x".join(str(v) for n, v in b[2].items()
                                                                    if n.startswith("BLOCK")) + f"-w{b[3]}s{b[4]}")
            for b in builds]


@pytest.mark.parametrize("build", _autotune_builds())
def test_every_autotune_config_compiles_for_hopper_and_fits_its_shared_memory(build):
    """The autotuner tries each of these on the GPU; one that cannot compile or launch would fail there."""
    program, dtype, constants, warps, stages = build
    _compile_for_hopper(program, dtype, constants, warps, stages)


def test_autotuners_time_briefly_and_keep_their_choices_on_disk():
    """Every tuned program uses the short benchmark windows and Triton's on-disk result cache (what keeps
    the GPU check's later phases and a resumed run from tuning again); on the GPU the benchmark itself
    runs in tests/test_gpu.py."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: the programs run untuned")
    from spark_sparse.kernels import _triton_kernels as k

    tuners = [k._GEMM, k._GEMM_WEIGHT_GRAD, k._DEPTHWISE, k._DEPTHWISE_WEIGHT_GRAD]
    assert all(t.cache_results and t.do_bench is k._brief_benchmark for t in tuners)


# ------------------------------------------------------------------------------ declared capabilities
def _spec(device: str, dtype: torch.dtype = torch.float32, groups: int = 1, channels: int = 16) -> ConvSpec:
    return ConvSpec(channels, channels, (3, 3), (1, 1), (1, 1), (1, 1), groups, False, device, dtype)


def test_kernel_declares_cuda_only_with_reasons_in_words():
    reasons = list_kernels()["triton"].not_supported_reasons(_spec("cpu"))
    assert any("device cpu" in r for r in reasons)
    if not torch.cuda.is_available():
        assert any("no CUDA device" in r for r in reasons)


@pytest.mark.parametrize("groups,refused", [(1, False), (16, False), (4, True)], ids=["dense", "depthwise", "grouped"])
def test_kernel_refuses_grouped_but_not_depthwise_convs(groups, refused):
    reasons = list_kernels()["triton"].not_supported_reasons(_spec("cuda", groups=groups))
    assert any("groups=4" in r for r in reasons) == refused


def test_kernel_refuses_float64():
    reasons = list_kernels()["triton"].not_supported_reasons(_spec("cuda", torch.float64))
    assert any("dtype float64" in r for r in reasons)


def test_triton_backend_is_unavailable_without_cuda_and_says_why():
    from spark_sparse.backends import get_backend_class

    available, reason = get_backend_class("triton").availability()
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: availability then depends on triton, tested on the GPU")
    assert not available and "CUDA" in reason


def test_triton_backend_plans_triton_for_convs_and_dense_for_the_stem():
    from spark_sparse.backends import get_backend_class

    backend = get_backend_class("triton")()
    assert backend.kernels_for(_spec("cuda"))[0] == "triton"
    assert backend.kernels_for(_spec("cuda", groups=16))[0] == "triton"
    assert backend.kernels_for(ConvSpec(3, 64, (7, 7), (2, 2), (3, 3), (1, 1), 1, False, "cuda",
                                        torch.float32))[0] == "dense"


# ------------------------------------------------------------------------------ CUDA, real layer shapes
def model_conv_shapes(model: str) -> list[tuple]:
    """Every distinct conv of a timm model as a ``SHAPES`` entry, with the stride of its input map."""
    import timm

    net = timm.create_model(model, pretrained=False, num_classes=0).eval()
    seen: dict[tuple, None] = {}

    def record(module, inputs, output):
        k, s, p, d = module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0]
        in_stride = 224 // inputs[0].shape[-1]
        seen[(f"{module.in_channels}->{module.out_channels} {k}x{k} s{s} g{module.groups} @{in_stride}",
              module.in_channels, module.out_channels, k, s, p, d, module.groups, in_stride)] = None
    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    return list(seen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("model", ["resnet50", "convnext_base"])
def test_cuda_kernel_matches_masked_dense_conv_on_every_layer_shape(model, dtype):
    """Batch 4 at 224 px, mask 0.6; every distinct conv of the model (stems included), as the backend
    calls the kernel (1x1 stride-1 convs go to cuBLAS there; the ops' 1x1 path is checked by opcheck)."""
    mask = ActiveMask.random(4, (7, 7), 0.6, generator=torch.Generator().manual_seed(0), device="cuda")
    failures = []
    for shape in model_conv_shapes(model):
        case = make_case(shape, dtype, mask, bias=True)
        want, scale = masked_reference(case, shape, mask), masked_reference(case, shape, mask, absolute=True)
        try:
            assert_matches(run_triton_kernel(case, shape, mask), want, scale, dtype, shape[0])
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cuda_op_passes_opcheck(shape):
    mask = tiny_mask().to("cuda")
    failure = opcheck_triton_op(make_case(shape, torch.float32, mask), shape, mask)
    assert failure == "", failure


def _encoder_run(model: str, backend: str, dtype: torch.dtype, state: dict | None) -> dict:
    """One encoder forward+backward on CUDA (64 px, batch 2, fixed mask), cuDNN without TF32."""
    import spark_sparse as ss

    torch.manual_seed(0)
    spark = ss.create_spark(model, backend=backend, input_size=64, drop_path_rate=0.0, decoder_width=64)
    if state is not None:
        spark.load_state_dict(state)
    state = {k: v.clone() for k, v in spark.state_dict().items()}
    spark.to("cuda", dtype)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to("cuda", dtype).requires_grad_(True)
    mask = spark.mask(2, generator=torch.Generator().manual_seed(2)).to("cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        features = [f.to_dense() for f in spark.encode(images, mask)]
        sum(f.square().mean() for f in features).backward()
    return {"state": state, "spark": spark, "tensors": {
        **{f"feature {i}": f.detach().double() for i, f in enumerate(features)}, "grad input": images.grad.double(),
        **{f"grad {k}": p.grad.double() for k, p in spark.encoder.named_parameters() if p.grad is not None}}}


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["resnet50", "convnext_tiny"])
def test_cuda_triton_backend_encoder_matches_masked_within_fp32_noise(model):
    """Features and every encoder gradient of the ``triton`` backend in fp32 are as close to ``masked``
    in fp64 as ``masked`` itself in fp32 is (within 10x, or 1e-5 of the largest value); its convs
    (all but the image stem) really ran on the triton kernel."""
    from spark_sparse.backends.rows import SparseConv2d

    reference = _encoder_run(model, "masked", torch.float64, None)
    masked32 = _encoder_run(model, "masked", torch.float32, reference["state"])
    ours = _encoder_run(model, "triton", torch.float32, reference["state"])
    convs = [m for m in ours["spark"].encoder.modules() if isinstance(m, SparseConv2d) and m.in_channels > 4]
    assert convs and all(m.kernel_for(torch.device("cuda"), torch.float32).NAME == "triton" for m in convs)
    failures = []
    for name, want in reference["tensors"].items():
        largest = max(float(want.abs().max()), 1e-30)
        noise = float((masked32["tensors"][name] - want).abs().max()) / largest
        error = float((ours["tensors"][name] - want).abs().max()) / largest
        if error > max(10 * noise, 1e-5):
            failures.append(f"{name}: relative error {error:.2e}, masked fp32 {noise:.2e}")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
def test_cuda_kernel_is_available_and_chosen_by_the_triton_backend():
    available, reason = list_kernels()["triton"].availability()
    assert available, reason
    backend = __import__("spark_sparse").create_backend("triton")
    assert backend.kernels_for(_spec("cuda"))[0] == "triton"


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
