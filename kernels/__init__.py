"""Triton kernels for the CUDA path, each beside its PyTorch reference (installed as ``specdec.kernels``)."""
