"""spark-sparse: SparK masked image modelling with pluggable (truly) sparse convolution backends."""
from .backends import (Backend, UnknownBackendError, UnsupportedModuleError, create_backend, list_backends,
                       register_backend, register_container, register_converter, register_same_maths)
from .features import FeatureMap, FeatureMapMismatch, MaskedDense, SparseRows, UnsupportedFeatureOperation
from .mask import ActiveMask
from .models import EncoderContractError, ModelNameTakenError, UnknownModelError, create_encoder, list_models, register_model
from .spark import SparK, create_spark

__version__ = "0.1.0"

__all__ = ["ActiveMask", "Backend", "EncoderContractError", "FeatureMap", "FeatureMapMismatch", "MaskedDense", "SparK",
           "SparseRows", "UnknownBackendError", "ModelNameTakenError", "UnknownModelError", "UnsupportedFeatureOperation", "UnsupportedModuleError", "create_backend",
           "create_encoder", "create_spark", "list_backends", "list_models", "register_backend",
           "register_container", "register_converter", "register_model", "register_same_maths"]
