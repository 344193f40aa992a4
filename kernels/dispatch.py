"""Which implementation runs: Triton kernels for CUDA tensors (except while autograd records: the kernels
have no backward), PyTorch references everywhere else.

SPECDEC_REFERENCE_KERNELS=1 forces the references on CUDA too (for debugging a kernel against its oracle).
SPECDEC_TRITON_ON_CPU=1 sends CPU tensors to the kernels as well: with TRITON_INTERPRET=1 that is how the
tests run a whole model through the kernels on a machine without a GPU.
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


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s op runs the Triton kernel. Not while autograd records it: the kernels have no
    backward, so training (a draft head on a GPU) keeps the references, as the CPU path keeps its torch ops."""
    on_device = tensor.is_cuda or _flag("SPECDEC_TRITON_ON_CPU")
    training = tensor.requires_grad and torch.is_grad_enabled()
    return on_device and not training and not _flag("SPECDEC_REFERENCE_KERNELS") and triton_available()
