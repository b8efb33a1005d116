"""Whole encoders and short training runs on every sparse backend equal ``masked``."""
import functools

import pytest
import torch
from timm.optim import Lamb

import spark_sparse as ss
from spark_sparse.testing import switch_branches_on

from equivalence import assert_encoder_matches_timm, draw_learnable_affines, max_errors, sparse_backend_params

# model -> (input size, batch, timm kwargs). The timm families of issue 14 run at 64 px, batch 2, with
# one block per stage where timm's constructor allows it (every layer type stays; the suite stays
# fast); the export tests below use the full models.
ENCODERS = {
    "resnet18": (128, 2, {}),
    "resnet50": (96, 2, {}),
    "convnext_tiny": (96, 2, {}),
    "resnet50d": (64, 2, dict(layers=(1, 1, 1, 1))),
    "seresnet50": (64, 2, dict(layers=(1, 1, 1, 1))),
    # anti-aliased: blur pools (reflect padding) after the stem's stride-1 max-pool and in strided blocks
    "resnetblur50": (64, 2, dict(layers=(1, 1, 1, 1))),
    "resnext50_32x4d": (64, 2, dict(layers=(1, 1, 1, 1))),
    "regnety_016": (64, 2, {}),
    "efficientnet_b0": (64, 2, {}),
    "mobilenetv3_large_100": (64, 2, {}),
    "convnextv2_tiny": (64, 2, dict(depths=(1, 1, 1, 1))),
    "resnetv2_50x1_bit": (64, 2, {}),
    # channel split / concatenation / slicing, ByobNet's and MobileNet-V4's blocks: full timm models at 64 px
    **{name: (64, 2, {}) for name in ("cspresnet50", "cspdarknet53", "gernet_m", "repvgg_a2", "regnetz_c16",
                                      "resnet33ts", "densenet121", "ese_vovnet39b", "res2net50_26w_4s",
                                      "ghostnet_100", "mobilenetv4_conv_small")},
    # MixedConv2d's channel groups and TensorFlow-"SAME" padded strided convs; EfficientNet-V2-S at half
    # depth (its full depth at 64 px normalises ~3 active sites per channel: 1e-10 conditioning, not error)
    "mixnet_s": (64, 2, {}),
    "tf_efficientnet_b0": (64, 2, {}),
    "tf_efficientnetv2_s": (64, 2, dict(depth_multiplier=0.5)),
    # ReXNet's partial shortcut (cat of a slice plus the shortcut and the rest); half depth, as its SE
    # BatchNorm normalises over the batch of 2 squeezed vectors (badly conditioned at full depth)
    "rexnet_100": (64, 2, dict(depth_mult=0.5)),
    "selecsls42b": (64, 2, {}),                 # [features, skip] lists between blocks, concatenations
    "dla34": (64, 2, {}),                       # trees joined by concatenation at one resolution
    "hrnet_w18_small": (64, 2, {}),             # branches at strides 4..32 fused by sums (nearest upsampling)
    # normalisation-free: scalar gains, weight-standardised convs (and TF "SAME" padding in dm_nfnet_*)
    "nf_resnet50": (64, 2, {}),
    "eca_nfnet_l0": (64, 2, {}),
    # separable-conv blocks, dual paths as channel slices, re-parameterisable ghost modules, plain VGG
    **{name: (64, 2, {}) for name in ("xception41", "dpn68", "repghostnet_100", "vgg11_bn", "hgnet_tiny",
                                      "legacy_seresnet18")},
    # HGNet-V2: a stem padded on one side (SAME 2x2 convs, a zero-padded 2x2 pool), learnable affines
    "hgnetv2_b0": (64, 2, {}),
    # CSPNeXt (SPP max-pools, eSE), FasterNet (partial conv: split, conv, cat), RDNet (dense concatenation,
    # LayerNorm), RepViT and LCNet-V2 (re-parameterisable branches summed), StarNet (product of two maps)
    **{name: (64, 2, {}) for name in ("cspnext_tiny", "fasternet_t0", "rdnet_tiny", "repvit_m0_9", "lcnetv2_small",
                                      "starnet_s1")},
    # GCNet's global context (softmax attention pooling over each image's active sites)
    "gcresnet33ts": (64, 2, {}),
    # MetaFormers: LayerNorm, separable convs with StarReLU (nonzero at 0), per-channel residual scales
    # (ConvFormer); pooling minus input and one-group GroupNorm (PoolFormer-V2)
    "convformer_s18": (64, 2, {}),
    "poolformerv2_s12": (64, 2, {}),
    # FastViT: MobileOne branches summed from 0, RepMixer's mixer(x) - norm(x), layer scales
    "fastvit_t8": (64, 2, {}),
    # MambaOut: channels-last blocks (NHWC LayerNorm, Linear, split/cat along dim=-1, a gate product),
    # permuted to NCHW around each conv
    "mambaout_tiny": (64, 2, {}),
    # FocalNet: a channel split into query, context and one-channel gates broadcast over the context,
    # depthwise focal levels, a global context averaged over each image's active sites (timm's
    # constructor takes no depths for its named sizes: the full tiny net)
    "focalnet_tiny_srf": (64, 2, {}),
    # EfficientViT (MIT): ReLU linear attention over each image's active sites with multi-scale q, k, v in
    # stages 3-4, MobileNet-style convs before
    "efficientvit_b0": (64, 2, {}),
    # EdgeNeXt: ConvNeXt-like blocks between permutes, split-transpose blocks (channel groups, positional
    # encoding at active sites, cross-covariance attention over each image's active tokens)
    "edgenext_small": (64, 2, {}),
    # SwiftFormer: conv encoders, and per stage one block with additive attention (a global query vector per
    # image over its active tokens)
    "swiftformer_xs": (64, 2, {}),
    # TResNet: a space-to-depth stem, leaky-ReLU blocks with SE and blur-pool downsampling, one block per stage
    "tresnet_m": (64, 2, dict(layers=(1, 1, 1, 1))),
    # softmax self-attention among each image's active tokens: CAFormer's last two stages (tokens channels last,
    # LayerNorm, Linear MLP), FastViT-SA's last stage (BatchNorm, conditional positional encoding, ConvMlp)
    "caformer_s18": (64, 2, {}),
    "fastvit_sa12": (64, 2, {}),
    # MobileNet-V4-Hybrid: multi-query attention blocks, keys and values from a stride-2 depthwise conv at stride 16
    "mobilenetv4_hybrid_medium": (64, 2, {}),
    # MobileViT: maps unfolded into 2x2 patch positions, a transformer per position among its active tokens
    "mobilevit_xs": (64, 2, {}),
    # MobileViT-V2: separable self-attention per patch position (softmax context over its active tokens; at 64 px
    # most positions of the stride-32 map have none), GroupNorm1 over each image's active sites
    "mobilevitv2_050": (64, 2, {}),
    # DaViT: window attention among each 7x7 window's active tokens, channel attention over each image's active
    # tokens; at 224 px (the windows tile only multiples of 224), one block per stage, narrow
    "davit_tiny": (224, 2, dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))),
    # EfficientFormer: PoolFormer-like blocks, then (at stride 32, 224 px only) attention among each image's active
    # tokens with the learnt bias of each pair's grid positions; narrow, one block per stage and one attention block
    "efficientformer_l1": (224, 2, dict(depths=(1, 1, 1, 2), embed_dims=(16, 32, 64, 128))),
    # PVT-v2: overlapping patch embeddings, attention of each active token over the keys of its image's active
    # patches (a conv of kernel = stride = 8, 4, 2 onto the patch grid), MLPs with a depthwise 3x3 conv
    "pvt_v2_b0": (64, 2, {}),
    # Twins: non-overlapping patch embeddings, PVT's attention over the keys of each image's active patches, a
    # depthwise positional conv after each stage's first block; SVT alternates it with attention among each 7x7
    # window's active tokens (224 px: the windows tile multiples of 224 only); narrow, SVT two blocks per stage
    "twins_pcpvt_small": (64, 2, dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))),
    "twins_svt_small": (224, 2, dict(depths=(2, 2, 2, 2), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))),
    # Swin: patch merging of 2x2 neighbourhoods, attention among each 7x7 window's active tokens with relative
    # position biases, every other block in windows of the map rolled by -3 with timm's -100 between regions (224 px:
    # the windows tile multiples of 224 only, and timm's model is built for one size); narrow, two blocks per stage
    "swin_tiny_patch4_window7_224": (224, 2, dict(depths=(2, 2, 2, 2), embed_dim=16, num_heads=(1, 2, 4, 8))),
    # Swin-V2: the same windows (8x8, 256 px: maps 64, 32, 16, 8) with cosine attention, continuous position biases,
    # residual post-norms and patch merging Linear then LayerNorm; narrow, two blocks per stage
    "swinv2_tiny_window8_256": (256, 2, dict(depths=(2, 2, 2, 2), embed_dim=16, num_heads=(1, 2, 4, 8))),
    # CondConv EfficientNet: per-image routing over active sites, expert-mixed convs on the dense masked map
    "efficientnet_cc_b0_4e": (64, 2, {}),
    # split into square and band (1 x k, k x 1) depthwise convs; per-channel layer scale, drawn at 1 (timm:
    # 1e-6, which would leave the residual branches out of the comparison)
    "inception_next_tiny": (64, 2, dict(depths=(1, 1, 1, 1), ls_init_value=1.0)),
    # split attention and selective kernels (radix groups as channel slices, squeeze over active sites); the
    # 50-layer nets at one block per stage (full-depth SKNeXt at batch 2: its attention BatchNorm over two
    # squeezed vectors amplifies rounding to 2e-9 on every backend, masked in channels-last included)
    "resnest14d": (64, 2, {}),
    "skresnet18": (64, 2, {}),
    "resnest50d": (64, 2, dict(layers=(1, 1, 1, 1))),
    "skresnext50_32x4d": (64, 2, dict(layers=(1, 1, 1, 1))),
}
#: drop path on, so the per-image DropPath draws are checked too (seeded alike on both backends),
#: except for the nets that have none
DROP_PATH = 0.1
WITHOUT_DROP_PATH = {"densenet121", "ghostnet_100", "selecsls42b", "dla34", "hrnet_w18_small", "dpn68",
                     "repghostnet_100", "vgg11_bn", "legacy_seresnet18", "repvit_m0_9", "lcnetv2_small",
                     "efficientvit_b0"}
#: nets whose learnable affine blocks start as the identity (drawn at random: draw_learnable_affines)
IDENTITY_INIT_AFFINES = {"hgnetv2_b0"}
DECODER_WIDTH = 64
ATOL = 1e-10


def _spark(model: str, backend: str) -> ss.SparK:
    size, _, kwargs = ENCODERS[model]
    drop_path = 0.0 if model in WITHOUT_DROP_PATH else DROP_PATH
    return ss.create_spark(model, backend=backend, input_size=size, drop_path_rate=drop_path,
                           decoder_width=DECODER_WIDTH, **kwargs).double()


def _run(spark: ss.SparK, model: str) -> dict:
    """Features, loss, input and parameter gradients and buffers after one training forward/backward."""
    size, batch, _ = ENCODERS[model]
    images = torch.randn(batch, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = spark.mask(batch, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    features = [f.to_dense().detach() for f in spark.encode(images, mask)]
    x = images.clone().requires_grad_(True)
    torch.manual_seed(4)
    loss = spark(x, mask)
    loss.backward()
    return dict(mask=mask, features=features, loss=loss.item(), grad_input=x.grad,
                grads={name: p.grad for name, p in spark.named_parameters()},
                buffers={name: b.clone() for name, b in spark.named_buffers()})


@functools.lru_cache(maxsize=1)
def _reference(model: str) -> tuple[dict, dict]:
    """(masked run, its initial state), computed once per model for every backend's test."""
    torch.manual_seed(0)
    spark = _spark(model, "masked")
    switch_branches_on(spark.encoder)        # timm's zero-initialised last BNs, gains, layer scales
    if model in IDENTITY_INIT_AFFINES:
        draw_learnable_affines(spark)
    state = {k: v.clone() for k, v in spark.state_dict().items()}
    return _run(spark, model), state


def test_every_model_listed_as_tested_is_checked_here():
    assert set(ss.list_models(tested_only=True)) == set(ENCODERS)


@pytest.mark.parametrize("backend", sparse_backend_params())
@pytest.mark.parametrize("model", list(ENCODERS))
def test_encoder_features_loss_and_every_gradient_match(backend, model):
    ref, state = _reference(model)
    other = _spark(model, backend)
    other.load_state_dict(state)
    got = _run(other, model)
    for level, (a, b) in enumerate(zip(got["features"], ref["features"])):
        site = ref["mask"].dense_like(b).expand_as(b)
        assert torch.all(a[~site] == 0), f"feature {level}: non-zero at masked sites"
        assert max_errors(a, b)[0] < ATOL * max(1.0, float(b.abs().max())), f"feature {level}"
    assert abs(got["loss"] - ref["loss"]) < 1e-12
    assert max_errors(got["grad_input"], ref["grad_input"])[0] < ATOL
    for name, grad in ref["grads"].items():
        if grad is None:
            assert got["grads"][name] is None, name
            continue
        assert max_errors(got["grads"][name], grad)[0] < ATOL * max(1.0, float(grad.abs().max())), name
    for name, buf in ref["buffers"].items():
        assert torch.allclose(got["buffers"][name], buf, atol=1e-12), name


@functools.lru_cache(maxsize=None)
def _ten_step_loss_curve(backend: str) -> tuple[float, ...]:
    """Ten Lamb steps of resnet18 with drop path on ``backend`` (``masked``'s is computed once for all)."""
    torch.manual_seed(0)
    spark = ss.create_spark("resnet18", backend=backend, input_size=64, drop_path_rate=0.1)
    opt = Lamb(spark.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    data = torch.Generator().manual_seed(1)
    curve = []
    for step in range(10):
        images = torch.randn(4, 3, 64, 64, generator=data)
        mask = spark.mask(4, generator=torch.Generator().manual_seed(100 + step))
        torch.manual_seed(1000 + step)                     # the same drop-path draws on both backends
        loss = spark(images, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return tuple(curve)


@pytest.mark.parametrize("backend", sparse_backend_params())
def test_ten_training_steps_give_the_same_loss_curve(backend):
    got, want = _ten_step_loss_curve(backend), _ten_step_loss_curve("masked")
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-4 * abs(b), (got, want)


@pytest.mark.parametrize("backend", sparse_backend_params())
def test_a_model_trained_on_the_backend_exports_to_timm(backend):
    spark = ss.create_spark("resnet18", backend=backend, input_size=64)
    opt = torch.optim.SGD(spark.parameters(), lr=0.1)
    spark(torch.randn(2, 3, 64, 64)).backward()
    opt.step()
    assert_encoder_matches_timm(spark, "resnet18", spark.encoder_state_dict(), atol=1e-4)
