"""The equivalence contract on CUDA: every backend and kernel that runs there against ``masked``.

All tests here carry the ``gpu`` marker and skip without a CUDA device (``conftest.py``); they run
in the GPU check (``benchmarks/gpu_check.sh``). They repeat the CPU suite's checks on the device the
speed claims are about: per layer type, per kernel, whole small encoders in fp32 (gradients and BN
statistics included) and fp64, bf16 loss agreement, the fused BatchNorm+ReLU bit for bit, the
compiled decoder with the memory probe, and spconv's own CUDA backward.

fp32 comparisons switch TF32 off: cuDNN convolutions use it by default (10 mantissa bits), which
would hide a real error under rounding and is not what the fp32 contract means.
"""
import copy

import pytest
import torch
import torch.nn as nn

import spark_sparse as ss
from spark_sparse import ActiveMask, SparseRows
from spark_sparse.backends.common import Elementwise, FeatureBatchNorm
from spark_sparse.backends.fused import FusedBatchNormReLU
from spark_sparse.kernels import ConvCall, ConvSpec, get_kernel, list_kernels
from spark_sparse.speed import apply_speed_plan, estimate_max_batch, plan_speed
from spark_sparse.testing import switch_branches_on

from equivalence import max_errors, run_layer_pair, sparse_backend_params
from test_equivalence_layers import LAYERS, MASKS, masks_for
from test_kernels import SHAPES, TOLERANCE as KERNEL_TOLERANCE

pytestmark = pytest.mark.gpu
CUDA = "cuda"

#: per-layer tolerance on unit-scale inputs (bf16 only for layers whose maths is the same sum in
#: both backends: convolutions and pools; scaled by the largest reference magnitude)
LAYER_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
BF16_LAYERS = [name for name in LAYERS if name.startswith(("conv", "stem", "depthwise", "grouped", "relu_maxpool",
                                                             "maxpool", "avgpool"))]


@pytest.fixture(autouse=True)
def _fp32_without_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_bn_relu_on_cuda_equals_bn_then_relu_bit_for_bit(momentum):
    """As tests/test_fused.py, on CUDA: 2-D rows take the native batch-norm kernel there too, so no bit may move."""
    mask = ActiveMask.random(2, (3, 2), 0.5, generator=torch.Generator().manual_seed(0)).to(CUDA)
    bn = FeatureBatchNorm(16, momentum=momentum)
    with torch.no_grad():
        bn.weight.normal_(generator=torch.Generator().manual_seed(2))
        bn.bias.normal_(generator=torch.Generator().manual_seed(3))
    bn = bn.to(CUDA)
    fused_state = copy.deepcopy(bn)
    fused = FusedBatchNormReLU.from_dense(ss.create_backend("sparse"), fused_state)
    unfused = lambda x: Elementwise(nn.ReLU())(bn(x))   # noqa: E731
    results = []
    for layer, state in ((unfused, bn), (fused, fused_state)):
        x = (torch.randn(mask.num_active(4), 16, generator=torch.Generator().manual_seed(1)) * 2 + 0.3).to(CUDA)
        x.requires_grad_(True)
        out = None
        for _ in range(2):                                     # two steps: running statistics accumulate
            out = layer(SparseRows(x, mask, 4))
        grad = torch.randn(out.data.shape, generator=torch.Generator().manual_seed(4)).to(CUDA)
        (out.data * grad).sum().backward()
        results.append((out.data.detach(), x.grad, state.weight.grad, state.bias.grad, state.running_mean,
                        state.running_var, state.num_batches_tracked))
    for want, got in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layer_name", ["conv3x3", "conv1x1", "conv3x3_stride2", "conv1x1_stride2", "conv3x3_dilated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_spconv_cuda_backward_matches_masked(layer_name, dtype):
    """spconv's own CUDA ``indice_conv_backward`` (the CPU runs our stand-in) against masked."""
    spconv = list_kernels()["spconv"]
    available, why = spconv.availability()
    if not available:
        pytest.skip(f"spconv unavailable: {why}")
    factory, stride, channels = LAYERS[layer_name]
    layer = factory()
    reasons = spconv.not_supported_reasons(ConvSpec.of(layer, CUDA, dtype))
    assert not reasons, f"spconv should run {layer_name} in {dtype} on CUDA: {reasons}"
    res = run_layer_pair(layer, "spconv", MASKS["random_b4"](), stride, channels, dtype, device=CUDA)
    ref, got = res["masked"], res["spconv"]
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for what in ("out_rows", "grad_in"):
        abs_err, _ = max_errors(got[what].float(), ref[what].float())
        assert abs_err <= tol * max(1.0, float(ref[what].float().abs().max())), f"{what}: {abs_err:.3g}"
    for name, grad in ref["params"].items():
        abs_err, _ = max_errors(got["params"][name].float(), grad.float())
        assert abs_err <= tol * max(1.0, float(grad.float().abs().max())), f"grad {name}: {abs_err:.3g}"


def _spark_pair(model: str, backend: str, size: int, dtype: torch.dtype):
    torch.manual_seed(0)
    ref = ss.create_spark(model, input_size=size, drop_path_rate=0.0)
    switch_branches_on(ref.encoder)          # timm's zero-initialised last BNs and 1e-6 layer scales
    ref = ref.to(CUDA, dtype)
    other = ss.create_spark(model, backend=backend, input_size=size, drop_path_rate=0.0).to(CUDA, dtype)
    other.load_state_dict(ref.state_dict())
    return ref, other


def _encoder_results(spark, images, mask, autocast_dtype=None):
    """Features (dense, fp32 view), loss, input gradient, parameter gradients and buffers after one step."""
    x = images.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        feats = [f.to_dense().float() for f in spark.encode(x, mask)]
        loss = spark(x, mask)
    loss.backward()
    return dict(feats=[f.detach() for f in feats], loss=loss.detach().double(), grad_in=x.grad,
                grads={k: p.grad for k, p in spark.named_parameters()},
                buffers={k: b.clone() for k, b in spark.named_buffers()})


#: bottlenecks with fused BN+ReLU pairs, and ConvNeXt's depthwise 7x7 with LayerNorm (resnet18 runs in fp64 below)
ENCODERS = [("resnet50", 96, 4), ("convnext_tiny", 96, 4)]


@pytest.mark.parametrize("backend", sparse_backend_params())
@pytest.mark.parametrize("model,size,batch", ENCODERS, ids=[m[0] for m in ENCODERS])
def test_encoder_fp32_on_cuda_matches_masked(backend, model, size, batch):
    """Features at active sites, exact zeros elsewhere, loss, every gradient and BN statistics (fp32, no TF32).

    Bounds as in tests/test_benchmark_quick.py: features and loss agree to fp32 rounding; gradients
    in absolute terms, because the decoder's BatchNorms over near-constant mask-token regions
    amplify rounding of tiny gradients.
    """
    ref, other = _spark_pair(model, backend, size, torch.float32)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(CUDA)
    mask = ref.mask(batch, generator=torch.Generator().manual_seed(2)).to(CUDA)
    want, got = _encoder_results(ref, images, mask), _encoder_results(other, images, mask)
    for a, b in zip(got["feats"], want["feats"]):
        site = mask.dense_like(b).expand_as(b)
        assert torch.all(a[~site] == 0)
        assert max_errors(a, b)[1] < 1e-4
    assert max_errors(got["loss"], want["loss"])[1] < 1e-5
    assert max_errors(got["grad_in"], want["grad_in"])[0] < 1e-3
    for name, grad in want["grads"].items():
        if grad is None:
            assert got["grads"][name] is None, name
            continue
        assert max_errors(got["grads"][name], grad)[0] < 1e-3, name
    for name, buf in want["buffers"].items():
        assert max_errors(got["buffers"][name].double(), buf.double())[0] < 1e-4, name


@pytest.mark.parametrize("backend", sparse_backend_params())
def test_encoder_fp64_on_cuda_matches_masked_to_rounding(backend):
    """In fp64 every kernel (or the fallback a backend declares for fp64) agrees with masked to 1e-10."""
    ref, other = _spark_pair("resnet18", backend, 96, torch.float64)
    images = torch.randn(2, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(CUDA)
    mask = ref.mask(2, generator=torch.Generator().manual_seed(2)).to(CUDA)
    want, got = _encoder_results(ref, images, mask), _encoder_results(other, images, mask)
    assert abs(float(got["loss"] - want["loss"])) < 1e-12
    assert max_errors(got["grad_in"], want["grad_in"])[0] < 1e-10
    for name, grad in want["grads"].items():
        if grad is not None:
            assert max_errors(got["grads"][name], grad)[0] < 1e-10, name


@pytest.mark.parametrize("backend", sparse_backend_params())
@pytest.mark.parametrize("model", ["resnet50", "convnext_tiny"])
def test_encoder_bf16_autocast_loss_agrees_with_masked(backend, model):
    """Under bf16 autocast (what GPU training runs) features and loss stay within bf16 rounding of masked."""
    ref, other = _spark_pair(model, backend, 96, torch.float32)
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(1)).to(CUDA)
    mask = ref.mask(4, generator=torch.Generator().manual_seed(2)).to(CUDA)
    want = _encoder_results(ref, images, mask, torch.bfloat16)
    got = _encoder_results(other, images, mask, torch.bfloat16)
    for a, b in zip(got["feats"], want["feats"]):
        assert torch.all(a[~mask.dense_like(b).expand_as(b)] == 0)
        assert max_errors(a, b)[1] < 5e-2
    assert max_errors(got["loss"], want["loss"])[1] < 2e-2
    assert torch.isfinite(got["grad_in"]).all()


def test_compiled_decoder_with_the_memory_probe_on_cuda():
    """The fast recipe's CUDA options (channels_last, compiled decoder) train like eager, and the probe
    that estimates the largest batch runs through the compiled decoder."""
    torch.manual_seed(0)
    eager = ss.create_spark("resnet18", backend="sparse", input_size=64, drop_path_rate=0.0).to(CUDA)
    fast = copy.deepcopy(eager)
    apply_speed_plan(fast, plan_speed("fast", CUDA, backend="sparse"))
    estimate = estimate_max_batch(fast, (64, 64), CUDA, probe_batch=4)      # the training batch: no recompile
    assert estimate.activation_mb_per_image > 0 and estimate.max_batch > 0, estimate
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(CUDA)
    mask = eager.mask(4, generator=torch.Generator().manual_seed(2)).to(CUDA)
    losses = []
    for spark in (eager, fast):
        loss = spark(images, mask)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) <= 1e-4 * abs(losses[0]), losses
    for (name, p_eager), (_, p_fast) in zip(eager.decoder.named_parameters(), fast.decoder.named_parameters()):
        assert max_errors(p_fast.grad, p_eager.grad)[0] < 1e-3, name


def _kernel_case(shape, dtype, seed=0):
    """As tests/test_kernels.py's case, with the mask (hence the neighbour tables) on CUDA."""
    name, cin, cout, k, s, p, d, g, in_stride = shape
    mask = ActiveMask.random(2, (3, 4), 0.5, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(mask.num_active(in_stride), cin, generator=gen, dtype=torch.float64)
    w = torch.randn(cout, cin // g, k, k, generator=gen, dtype=torch.float64) / (cin // g * k * k) ** 0.5
    b = torch.randn(cout, generator=gen, dtype=torch.float64)
    spec = ConvSpec(cin, cout, (k, k), (s, s), (p, p), (d, d), g, True, CUDA, dtype)
    return x, w, b, (mask, in_stride, in_stride * s, (k, k), (p, p), (d, d), g), spec


def _kernel_run(kernel, x, w, b, call_args, device, dtype, absolute=False):
    """Output and gradients (fp64, CPU); with ``absolute`` the same sums over |inputs| and |probe|."""
    call = ConvCall(call_args[0].to(device), *call_args[1:])
    x, w, b = (t.abs() if absolute else t for t in (x, w, b))
    x, w, b = (t.detach().to(device=device, dtype=dtype).clone().requires_grad_(True) for t in (x, w, b))
    out = get_kernel(kernel).conv(x, w, b, call)
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out).to(device, out.dtype)
    (out * (probe.abs() if absolute else probe)).sum().backward()
    return [t.detach().double().cpu() for t in (out, x.grad, w.grad, b.grad)]


@pytest.mark.parametrize("kernel", [name for name in list_kernels() if name != "gather"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", list(KERNEL_TOLERANCE), ids=lambda d: str(d).replace("torch.", ""))
def test_kernel_on_cuda_matches_the_fp64_reference(kernel, shape, dtype):
    """Each kernel on CUDA vs the ``gather`` reference in fp64 on the CPU (error bound as in test_kernels.py)."""
    x, w, b, call_args, spec = _kernel_case(shape, dtype)
    available, why = list_kernels()[kernel].availability()
    reasons = [why] if not available else list_kernels()[kernel].not_supported_reasons(spec)
    if reasons:
        pytest.skip(f"{kernel} declares it cannot run this on CUDA: {'; '.join(reasons)}")
    reference = _kernel_run("gather", x, w, b, call_args, "cpu", torch.float64)
    scales = _kernel_run("gather", x, w, b, call_args, "cpu", torch.float64, absolute=True)
    got = _kernel_run(kernel, x, w, b, call_args, CUDA, dtype)
    for what, r, scale, g in zip(("output", "grad input", "grad weight", "grad bias"), reference, scales, got):
        excess = (g - r).abs() - KERNEL_TOLERANCE[dtype] * (scale + 1e-30)
        assert float(excess.max()) <= 0, f"{what}: max error {float((g - r).abs().max()):.3g}"


def _layer_cases():
    for name in LAYERS:
        for mask in ("random_b4", "random_b1_nonsquare"):
            if mask not in masks_for(name):
                continue
            yield pytest.param(name, mask, torch.float32, id=f"{name}-{mask}-fp32")
    for name in BF16_LAYERS:
        yield pytest.param(name, "random_b4", torch.bfloat16, id=f"{name}-random_b4-bf16")


@pytest.mark.parametrize("backend", sparse_backend_params())
@pytest.mark.parametrize("layer_name,mask_name,dtype", list(_layer_cases()))
def test_layer_matches_masked_on_cuda(backend, layer_name, mask_name, dtype):
    factory, stride, channels = LAYERS[layer_name]
    mask = MASKS[mask_name]()
    res = run_layer_pair(factory(), backend, mask, stride, channels, dtype, device=CUDA)
    ref, got = res["masked"], res[backend]
    assert got["out_rows"].is_cuda and got["out_stride"] == ref["out_stride"]
    site = mask.to(CUDA).dense_at(ref["out_stride"]).expand_as(ref["out_dense"])
    assert torch.all(got["out_dense"][~site] == 0)
    tol = LAYER_TOLERANCE[dtype]
    for what in ("out_rows", "grad_in"):
        abs_err, _ = max_errors(got[what].float(), ref[what].float())
        assert abs_err <= tol * max(1.0, float(ref[what].float().abs().max())), f"{what}: max abs error {abs_err:.3g}"
    for name, grad in ref["params"].items():
        abs_err, rel_err = max_errors(got["params"][name].float(), grad.float())
        assert abs_err <= tol * max(1.0, float(grad.float().abs().max())), f"grad {name}: {abs_err:.3g} (rel {rel_err:.3g})"
    for name, buf in ref["buffers"].items():
        abs_err, _ = max_errors(got["buffers"][name].to(buf.dtype).float(), buf.float())
        assert abs_err <= tol, f"buffer {name}: {abs_err:.3g}"


def test_the_triton_autotuners_brief_benchmark_times_a_cuda_call():
    from spark_sparse.kernels import _triton_kernels as k

    a = torch.randn(1024, 1024, device=CUDA)
    p50, p20, p80 = k._brief_benchmark(lambda: a @ a, quantiles=(0.5, 0.2, 0.8))
    assert 0 < p20 <= p50 <= p80 < k.TUNING_REP_MS


def test_image_normalizer_on_cuda_gives_the_cpus_bits():
    from spark_sparse.train.data import ImageNormalizer

    images = torch.randint(0, 256, (4, 3, 32, 40), dtype=torch.uint8)
    normalize = ImageNormalizer()
    assert torch.equal(normalize(images.to(CUDA)).cpu(), normalize(images))


def test_the_step_peak_on_cuda_is_the_allocators_and_sees_what_the_live_tensor_count_sees():
    """On CUDA the memory check reads the caching allocator's peak: every block, so at least the bytes of
    the live tensors the CPU-side count takes op by op (block rounding and library workspaces on top)."""
    from spark_sparse.autotune.memory import LiveTensorPeak, peak_bytes

    spark = ss.create_spark("resnet18", backend="sparse", input_size=64, decoder_width=32).to(CUDA)
    images = torch.randn(4, 3, 64, 64, device=CUDA)
    mask = spark.mask(4, generator=torch.Generator().manual_seed(0)).to(CUDA)

    def step():
        spark(images, mask).backward()
        spark.zero_grad(set_to_none=True)

    step()                                          # warm-up: cuDNN and the allocator's first blocks
    allocator = peak_bytes(step, torch.device(CUDA))
    with LiveTensorPeak() as tracker:
        step()
    assert 0 < tracker.peak_bytes <= allocator < 2 * tracker.peak_bytes + 64 * 2**20
