"""Backends: how the encoder computes on the visible patches (see :mod:`.base`)."""
from .base import Backend, UnsupportedModuleError, register_container, register_converter, register_same_maths
from .registry import (BackendInfo, UnknownBackendError, create_backend, get_backend_class, list_backends,
                       recommended_sparse_backend, register_backend)
from . import norms, attention  # noqa: F401  (register GroupNorm, norm+act, GRN, SE/ECA on every backend)
from . import masked  # noqa: F401  (registers "masked")
from . import torch_gather  # noqa: F401  (registers "torch")
from . import libraries  # noqa: F401  (registers "spconv" and "minkowski")
from . import sparse  # noqa: F401  (registers "sparse")
from . import triton  # noqa: F401  (registers "triton"; available on CUDA)
from . import auto  # noqa: F401  (registers "auto": sparse + measured per-layer kernels)

__all__ = ["Backend", "BackendInfo", "UnknownBackendError", "UnsupportedModuleError", "create_backend",
           "get_backend_class", "list_backends", "recommended_sparse_backend", "register_backend",
           "register_container", "register_converter", "register_same_maths"]
