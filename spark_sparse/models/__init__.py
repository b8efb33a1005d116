"""Encoders SparK can pre-train: timm CNN families, any suitable timm CNN, custom models (see :mod:`.registry`)."""
from .registry import (MODEL_ALIASES, HierarchicalEncoder, UnknownModelError, create_encoder, list_models,
                       model_default_drop_path, register_model, resolve_model_name)
from . import resnet  # noqa: F401  (registers resnet*, resnet50d, seresnet50, resnext50_32x4d)
from . import convnext  # noqa: F401  (registers convnext_*, convnextv2_tiny)
from . import efficientnet  # noqa: F401  (registers efficientnet_b0, mixnet_s, tf_efficientnet*, mobilenetv3/4)
from . import regnet  # noqa: F401  (registers regnety_016)
from . import resnetv2  # noqa: F401  (registers resnetv2_50x1_bit)
from . import cspnet  # noqa: F401  (registers cspresnet50, cspdarknet53, cspnext_tiny)
from . import byobnet  # noqa: F401  (registers gernet_m, repvgg_a2, regnetz_c16, resnet33ts)
from . import concatenating  # noqa: F401  (registers densenet121, ese_vovnet39b, dpn68, ghostnet_100, ...)
from . import split_attention  # noqa: F401  (registers resnest14d, resnest50d, skresnet18, skresnext50_32x4d)
from . import dla  # noqa: F401  (registers dla34)
from . import hrnet  # noqa: F401  (registers hrnet_w18_small)
from . import nfnet  # noqa: F401  (registers nf_resnet50, eca_nfnet_l0)
from . import xception  # noqa: F401  (registers xception41)
from . import vgg  # noqa: F401  (registers vgg11_bn)
from . import hgnet  # noqa: F401  (registers hgnet_tiny, hgnetv2_b0)
from . import inception_next  # noqa: F401  (registers inception_next_tiny)
from . import senet  # noqa: F401  (registers legacy_seresnet18)
from . import reparameterised  # noqa: F401  (registers repvit_m0_9, lcnetv2_small)
from . import starnet  # noqa: F401  (registers starnet_s1)
from . import metaformer  # noqa: F401  (registers convformer_s18, poolformerv2_s12)
from . import fastvit  # noqa: F401  (registers fastvit_t8)
from . import mambaout  # noqa: F401  (registers mambaout_tiny)
from . import example  # noqa: F401  (registers tiny_cnn)

__all__ = ["MODEL_ALIASES", "HierarchicalEncoder", "UnknownModelError", "create_encoder", "list_models",
           "model_default_drop_path", "register_model", "resolve_model_name"]
