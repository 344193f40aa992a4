"""Which implementation runs: Triton kernels for CUDA tensors, PyTorch references everywhere else.

SPECDEC_REFERENCE_KERNELS=1 forces the references on CUDA too (for debugging a kernel against its oracle).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    return (tensor.is_cuda and os.environ.get("SPECDEC_REFERENCE_KERNELS", "") in ("", "0")
            and triton_available())
