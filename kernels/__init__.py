"""Pluggable sparse-convolution kernels behind one registry.

Each kernel module registers itself on import; :func:`list_kernels` shows what is registered and
:meth:`SparseConvKernel.availability` whether it can run here (third-party libraries are imported
only then). Third-party kernels register through the ``spark_sparse.kernels`` entry-point group; a
plugin that fails to load is skipped with a warning naming it.
"""
from .base import ConvCall, ConvSpec, SparseConvKernel
from .registry import (NoKernelError, UnknownKernelError, check_kernel_names, get_kernel, list_kernels,
                       load_kernel_plugins, register_kernel, select_kernel)
from . import gather  # noqa: F401  (registers "gather")
from . import gemm  # noqa: F401  (registers "gemm")
from . import dense  # noqa: F401  (registers "dense")
from . import spconv_kernel  # noqa: F401  (registers "spconv"; available when spconv imports)
from . import minkowski_kernel  # noqa: F401  (registers "minkowski"; available when MinkowskiEngine imports)
from . import triton_conv  # noqa: F401  (registers "triton"; available on CUDA when triton imports)

load_kernel_plugins()

__all__ = ["ConvCall", "ConvSpec", "NoKernelError", "SparseConvKernel", "UnknownKernelError", "check_kernel_names",
           "get_kernel", "list_kernels", "register_kernel", "select_kernel"]
