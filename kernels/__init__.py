"""Pluggable sparse-convolution kernels behind one registry (filled by the sparse backends)."""
