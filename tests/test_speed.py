"""Speed options keep the maths: same loss (fp32: 1e-5 relative), same gradients, same BN statistics."""
import copy
import gc
import re

import pytest
import torch

import spark_sparse as ss
from spark_sparse.speed import apply_speed_plan, estimate_max_batch, plan_speed


def _step(spark, images, mask):
    loss = spark(images, mask)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in spark.named_parameters() if p.grad is not None}
    return loss.item(), grads, {k: v.clone() for k, v in spark.named_buffers()}


@pytest.mark.parametrize("model", ["resnet18", "convnext_tiny"])
@pytest.mark.parametrize("option", ["channels_last", "grad_ckpt"])
def test_option_leaves_loss_gradients_and_statistics_unchanged(model, option):
    base = ss.create_spark(model, input_size=64, drop_path_rate=0.0)
    fast = copy.deepcopy(base)
    fast.to_channels_last() if option == "channels_last" else fast.set_grad_checkpointing(True)
    images = torch.randn(4, 3, 64, 64)
    mask = base.mask(4, generator=torch.Generator().manual_seed(0))
    loss_a, grads_a, bufs_a = _step(base, images, mask)
    loss_b, grads_b, bufs_b = _step(fast, images, mask)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)
    for name in bufs_a:
        torch.testing.assert_close(bufs_b[name], bufs_a[name], atol=1e-6, rtol=1e-5)


def test_spark_recipe_is_sparks_own():
    plan = plan_speed("spark", "cpu")
    assert (plan.backend, plan.channels_last, plan.compile_decoder, plan.foreach_optimizer) == ("masked", False, False, False)


def test_fast_recipe_explains_every_choice_and_flags_override_it():
    plan = plan_speed("fast", "cpu", channels_last=False)
    assert plan.channels_last is False and plan.why["channels_last"] == "set explicitly"
    assert all(plan.why[k] for k in ("backend", "compile_decoder", "grad_ckpt", "foreach_optimizer"))
    assert "backend" in plan.describe()
    assert plan.backend == "auto" and plan_speed("fast", "cuda").backend == "auto"
    assert plan.foreach_optimizer is False and plan_speed("fast", "cuda").foreach_optimizer is True
    assert plan_speed("fast", "cpu", foreach_optimizer=True).why["foreach_optimizer"] == "set explicitly"
    with pytest.raises(ValueError, match="unknown recipe"):
        plan_speed("turbo", "cpu")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_no_reason_quotes_a_timing_that_was_not_measured_here(device):
    """Before autotuning nothing was measured in this run: no reason may carry a figure from elsewhere."""
    plan = plan_speed("fast", device)
    for key in ("backend", "channels_last", "compile_decoder", "foreach_optimizer"):
        assert "not measured" in plan.why[key], key
        assert not re.search(r"\d\s*(ms|s|x)\b", plan.why[key]), plan.why[key]


@pytest.mark.parametrize("guard,backend", [({"tuned": 1.0, "static": 2.0, "masked": 3.0}, "auto"),
                                           ({"tuned": 5.0, "static": 6.0, "masked": 2.0}, "masked")])
def test_after_autotuning_the_backend_reason_cites_this_machines_measurement(tmp_path, guard, backend):
    from spark_sparse.autotune import AutotuneOptions, autotune

    plan = plan_speed("fast", "cpu")
    spark = ss.create_spark("tiny_cnn", backend=plan.backend, input_size=64)
    options = AutotuneOptions(warmup=0, repeats=1, progress=False, cache_dir=tmp_path)
    result = autotune(spark, 2, "cpu", options=options, timer=lambda fn, what: guard[what.candidate] if
                      what.kind == "encoder" else 1.0, build_masked=lambda: ss.create_spark("tiny_cnn", input_size=64))
    tuned = plan.with_autotune(result)
    assert tuned.backend == backend == result.spark.backend.name
    assert "measured on this machine" in tuned.why["backend"] and f"masked {guard['masked']:g} ms" in tuned.why["backend"]
    apply_speed_plan(result.spark, tuned)                 # the plan now matches the model that runs


def test_plan_must_match_the_models_backend():
    spark = ss.create_spark("tiny_cnn", input_size=64)
    with pytest.raises(ValueError, match="wants backend"):
        apply_speed_plan(spark, plan_speed("spark", "cpu", backend="torch"))


def test_batch_estimate_shrinks_activations_with_grad_checkpointing():
    spark = ss.create_spark("resnet18", input_size=64)
    state = copy.deepcopy(spark.state_dict())
    plain = estimate_max_batch(spark, (64, 64), "cpu")
    assert all(torch.equal(v, spark.state_dict()[k]) for k, v in state.items())   # the probe changed nothing
    spark.set_grad_checkpointing(True)
    ckpt = estimate_max_batch(spark, (64, 64), "cpu")
    assert 0 < ckpt.activation_mb_per_image < plain.activation_mb_per_image
    assert ckpt.max_batch > plain.max_batch > 0


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_the_batch_estimate_measures_under_the_runs_autocast(backend):
    """--amp bf16 keeps about half of fp32's activations: the estimate was the fp32 one whatever --amp said."""
    spark = ss.create_spark("resnet18", backend=backend, input_size=64)
    fp32 = estimate_max_batch(spark, (64, 64), "cpu")
    bf16 = estimate_max_batch(spark, (64, 64), "cpu", amp_dtype=torch.bfloat16)
    assert 0.3 * fp32.activation_mb_per_image < bf16.activation_mb_per_image < 0.8 * fp32.activation_mb_per_image


def _train(spark, steps=6, amp=None, foreach=False, seed=0, device="cpu"):
    """A few LAMB steps on fixed data and masks; returns the loss curve."""
    from spark_sparse.train.optim import build_optimizer, param_groups
    opt = build_optimizer("lamb", param_groups(spark), 1e-3, 0.95, 5.0, foreach=foreach)
    scaler = torch.amp.GradScaler(device, enabled=amp == torch.float16)
    data = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(steps):
        images = torch.randn(4, 3, 64, 64, generator=data).to(device)
        mask = spark.mask(4, generator=torch.Generator().manual_seed(100 + step), device=device)
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            loss = spark(images, mask)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        curve.append(loss.item())
    return curve


def test_foreach_optimizer_updates_leave_the_loss_curve_unchanged():
    """One foreach update differs from the per-tensor loop by rounding only (step 2: ~1e-7); like any change
    of summation order, later steps amplify it (~1e-4 by step 6 on this tiny model), so compare 3 steps."""
    torch.manual_seed(0)
    base = ss.create_spark("tiny_cnn", input_size=64)
    fused = copy.deepcopy(base)
    for a, b in zip(_train(base, steps=3), _train(fused, steps=3, foreach=True)):
        assert b == pytest.approx(a, rel=1e-5)


def test_a_timm_lamb_without_foreach_updates_per_tensor_and_says_so(monkeypatch):
    """timm releases before Lamb's ``foreach`` argument: building it with foreach=True failed with a TypeError
    (the GPU check's benchmarks and ``--recipe fast`` on CUDA ask for it)."""
    import warnings

    from timm.optim import Lamb
    from spark_sparse.train import optim

    class OlderLamb(Lamb):
        def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                     grad_averaging=True, max_grad_norm=1.0, trust_clip=False, always_adapt=False):
            super().__init__(params, lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                             weight_decay=weight_decay, grad_averaging=grad_averaging, max_grad_norm=max_grad_norm,
                             trust_clip=trust_clip, always_adapt=always_adapt)

    monkeypatch.setattr(optim, "Lamb", OlderLamb)
    groups = optim.param_groups(torch.nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="Lamb has no foreach .* the same maths"):
        assert isinstance(optim.build_optimizer("lamb", groups, 1e-3, 0.95, 5.0, foreach=True), OlderLamb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optim.build_optimizer("lamb", groups, 1e-3, 0.95, 5.0, foreach=False)


def test_compiled_decoder_leaves_the_loss_unchanged():
    torch.manual_seed(0)
    base = ss.create_spark("tiny_cnn", input_size=64, decoder_width=64)
    compiled = copy.deepcopy(base)
    compiled.decoder.compile()
    images = torch.randn(2, 3, 64, 64)
    mask = base.mask(2, generator=torch.Generator().manual_seed(0))
    assert compiled(images, mask).item() == pytest.approx(base(images, mask).item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["masked", "sparse"])
@pytest.mark.parametrize("amp,tolerance,device", [
    pytest.param(torch.bfloat16, 3e-2, "cpu", id="bf16-cpu"),
    pytest.param(torch.float16, 5e-3, "cuda", id="fp16-cuda", marks=pytest.mark.gpu)])
def test_mixed_precision_follows_the_fp32_loss_curve(backend, amp, tolerance, device):
    """bf16 keeps 8 mantissa bits (fp16: 11): per-step losses stay within 3% (0.5%) of fp32's.

    fp16 runs on CUDA only: on many CPUs oneDNN has no optimised fp16 convolution backward and its
    reference kernels take minutes here; on a CPU the trainer warns to use bf16 instead
    (tests/test_train.py::test_fp16_autocast_on_a_cpu_warns_to_use_bf16).
    """
    torch.manual_seed(0)
    base = ss.create_spark("resnet18", backend=backend, input_size=64, drop_path_rate=0.0).to(device)
    low = copy.deepcopy(base)
    for a, b in zip(_train(base, device=device), _train(low, amp=amp, device=device)):
        assert b == pytest.approx(a, rel=tolerance)


def test_speed_options_are_recorded_in_the_log(tmp_path):
    import json

    from spark_sparse.train.engine import pretrain

    from apptools import make_image_folder, tiny_config
    data = make_image_folder(tmp_path / "data", count=4)
    pretrain(tiny_config(data, tmp_path / "out", ep=1, recipe="fast", amp="bf16", grad_ckpt=True))
    header = json.loads((tmp_path / "out" / "pretrain_log.txt").read_text().splitlines()[0])
    plan = header["speed_plan"]
    # the guard may keep masked on a small input: either way the reason is this run's measurement
    assert plan["recipe"] == "fast" and plan["backend"] in ("auto", "masked") and plan["channels_last"]
    assert plan["grad_ckpt"] and header["args"]["amp"] == "bf16"
    assert "measured on this machine" in plan["why"]["backend"] and header["autotune"]["backend"] == plan["backend"]


def _dense_kernel_weights(spark):
    """Weights of the decoder's convs with a spatial kernel (1x1 weights are both NCHW- and NHWC-contiguous)."""
    return [m.weight for m in spark.decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]


@pytest.mark.parametrize("fast", [True, False], ids=["channels_last+grad_ckpt", "neither"])
def test_speed_options_reach_the_model_that_trains(tmp_path, monkeypatch, fast):
    """--channels_last and --grad_ckpt change the trained model itself: NHWC decoder weights, and decoder
    blocks recomputed in backward (counted at torch's checkpoint), not only what the log says."""
    from spark_sparse import decoder as decoder_module
    from spark_sparse.train.engine import Trainer

    from apptools import make_image_folder, tiny_config
    recomputed, real_checkpoint = [], decoder_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        recomputed.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(decoder_module, "checkpoint", counting_checkpoint)
    data = make_image_folder(tmp_path / "data", count=4)
    trainer = Trainer(tiny_config(data, tmp_path / "out", ep=1, recipe="fast", backend="sparse", channels_last=fast,
                                  grad_ckpt=fast), "")
    weights = _dense_kernel_weights(trainer.spark)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) == fast for w in weights)
    trainer.step(torch.randn(4, 3, 64, 64), 0)
    assert bool(recomputed) == fast


def test_the_batch_estimate_keeps_no_tensor_of_its_probe_forward():
    """The probe forward is never run backward: nothing it saved may stay alive (its saved-tensor hook
    once kept each saved output tied to its own graph node, out of the garbage collector's reach)."""
    spark = ss.create_spark("tiny_cnn", backend="sparse", input_size=64)

    def live() -> set[int]:
        gc.collect()
        # issubclass(type(o)): isinstance reads __class__, which warns on torch's deprecated reduce_op object
        return {id(o) for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}

    before = live()
    estimate_max_batch(spark, (64, 64), "cpu")
    assert live() - before == set()


def test_the_sparse_linear_keeps_the_autocast_dtype_as_nn_linear_does():
    """Under bf16 autocast nn.Linear returns bf16; the sparse backend's row Linear added its fp32 bias after the
    product and returned fp32 (ConvNeXt's MLP then ran and kept its widest activation in fp32)."""
    from spark_sparse.backends.sparse import RowLinear

    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 384)
    rows = RowLinear.from_linear(dense)
    x = torch.randn(256, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = dense(x), rows(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype,autocast_gives", [(torch.float32, torch.bfloat16), (torch.float64, torch.float64)],
                         ids=["fp32", "fp64"])
def test_the_sparse_conv_casts_under_autocast_as_nn_conv2d_does(dtype, autocast_gives):
    """bf16 autocast runs an fp32 conv in bf16 and leaves an fp64 one in fp64 (it casts only lower-precision
    eligible floats); the sparse conv ran fp64 rows in bf16."""
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).to(dtype)
    mask = ss.ActiveMask.random(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 8, 8, 8, dtype=dtype) * mask.dense_at(8)
    rows = ss.SparseRows(x.permute(0, 2, 3, 1)[mask.dense_at(8)[:, 0]], mask, 8)
    sparse = ss.create_backend("sparse").convert(torch.nn.Sequential(conv))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = conv(x), sparse(rows).data
    assert got.dtype == want.dtype == autocast_gives
    want_rows = want.permute(0, 2, 3, 1)[mask.dense_at(8)[:, 0]]
    tolerance = 2e-2 if autocast_gives == torch.bfloat16 else 1e-12
    torch.testing.assert_close(got.double(), want_rows.double(), rtol=tolerance, atol=tolerance)
