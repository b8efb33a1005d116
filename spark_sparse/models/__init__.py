"""Encoders SparK can pre-train: timm ResNets/ConvNeXts and custom models (see :mod:`.registry`)."""
from .registry import (MODEL_ALIASES, HierarchicalEncoder, UnknownModelError, create_encoder, list_models,
                       model_default_drop_path, register_model, resolve_model_name)
from . import resnet  # noqa: F401  (registers resnet*)
from . import convnext  # noqa: F401  (registers convnext_*)
from . import example  # noqa: F401  (registers tiny_cnn)

__all__ = ["MODEL_ALIASES", "HierarchicalEncoder", "UnknownModelError", "create_encoder", "list_models",
           "model_default_drop_path", "register_model", "resolve_model_name"]
