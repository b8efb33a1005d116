"""Encoders SparK can pre-train: timm CNN families, any suitable timm CNN, custom models (see :mod:`.registry`)."""
import importlib

from ..timm_compat import describe_missing_timm_part, is_missing_timm_part
from .registry import (MODEL_ALIASES, EncoderContractError, HierarchicalEncoder, ModelNameTakenError, UnknownModelError,
                       create_encoder, list_models, mark_family_unavailable, model_default_drop_path, register_model,
                       resolve_model_name, unavailable_families)

#: the family modules of this package, each with the models it registers (tests/test_models_timm.py checks the
#: lists). A family built from timm parts that this timm lacks (an older release than the one tested) is left out,
#: and asking for one of its models says so, so that the package and the other families still load.
FAMILIES = (
    ("resnet", "resnet18 resnet34 resnet50 resnet101 resnet152 resnet200 resnet50d seresnet50 resnext50_32x4d "
               "resnetblur50"),
    ("convnext", "convnext_tiny convnext_small convnext_base convnext_large convnextv2_tiny"),
    ("efficientnet", "efficientnet_b0 mobilenetv3_large_100 mobilenetv4_conv_small mixnet_s tf_efficientnet_b0 "
                     "tf_efficientnetv2_s mobilenetv4_hybrid_medium efficientnet_cc_b0_4e"),
    ("regnet", "regnety_016"),
    ("resnetv2", "resnetv2_50x1_bit"),
    ("cspnet", "cspresnet50 cspdarknet53"),
    ("cspnext", "cspnext_tiny"),
    ("byobnet", "gernet_m repvgg_a2 regnetz_c16 resnet33ts gcresnet33ts"),
    ("concatenating", "densenet121 ese_vovnet39b res2net50_26w_4s ghostnet_100 rexnet_100 selecsls42b "
                      "repghostnet_100"),
    ("dpn", "dpn68"),
    ("fasternet", "fasternet_t0"),
    ("rdnet", "rdnet_tiny"),
    ("split_attention", "resnest14d resnest50d skresnet18 skresnext50_32x4d"),
    ("dla", "dla34"),
    ("hrnet", "hrnet_w18_small"),
    ("nfnet", "nf_resnet50 eca_nfnet_l0"),
    ("xception", "xception41"),
    ("vgg", "vgg11_bn"),
    ("hgnet", "hgnet_tiny hgnetv2_b0"),
    ("inception_next", "inception_next_tiny"),
    ("senet", "legacy_seresnet18"),
    ("reparameterised", "repvit_m0_9"),
    ("lcnetv2", "lcnetv2_small"),
    ("starnet", "starnet_s1"),
    ("metaformer", "convformer_s18 poolformerv2_s12 caformer_s18"),
    ("fastvit", "fastvit_t8 fastvit_sa12"),
    ("mambaout", "mambaout_tiny"),
    ("focalnet", "focalnet_tiny_srf"),
    ("efficientvit", "efficientvit_b0"),
    ("edgenext", "edgenext_small"),
    ("swiftformer", "swiftformer_xs"),
    ("tresnet", "tresnet_m"),
    ("mobilevit", "mobilevit_xs mobilevitv2_050"),
    ("davit", "davit_tiny"),
    ("efficientformer", "efficientformer_l1"),
    ("pvt_v2", "pvt_v2_b0"),
    ("twins", "twins_pcpvt_small twins_svt_small"),
    ("swin", "swin_tiny_patch4_window7_224"),
    ("swin_v2", "swinv2_tiny_window8_256"),
    ("example", "tiny_cnn"),
)


def _load_families() -> None:
    for family, models in FAMILIES:
        try:
            importlib.import_module(f".{family}", __name__)
        except ImportError as error:
            if not is_missing_timm_part(error):
                raise
            mark_family_unavailable(family, tuple(models.split()), describe_missing_timm_part(error))


_load_families()

__all__ = ["FAMILIES", "MODEL_ALIASES", "EncoderContractError", "HierarchicalEncoder", "ModelNameTakenError",
           "UnknownModelError", "create_encoder", "list_models", "model_default_drop_path", "register_model",
           "resolve_model_name", "unavailable_families"]
