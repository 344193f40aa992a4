"""bfloat16 linear for decode and verification on AVX512-BF16 CPUs (``cpu_linear.c``), and its reference.

The C file is compiled once per machine with the system C compiler (``cc``, or ``$CC``) into the user cache
(``~/.cache/specdec/kernels``); where that is impossible — no compiler, no AVX512-BF16, not x86 — or
``SPECDEC_REFERENCE_KERNELS=1`` is set, ``available()`` is False and callers keep torch's path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from specdec.kernels.dispatch import _flag

SOURCE = Path(__file__).with_name("cpu_linear.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
#: up to this many rows the kernel is at least as fast as oneDNN's prepacked path; past it oneDNN's blocked
#: GEMM wins, because from ~8 rows the pass stops being memory-bound on a 2-core CPU without AMX. All of
#: SmolLM2-135M's linear layers, medians of 5, same run (kernel vs oneDNN): 1 row 15.4 vs 21.0 ms,
#: 2 rows 16.9 vs 22.3, 4 rows 21.4 vs 23.3, 8 rows 31.6 vs 31.4, 16 rows 50.0 vs 44.1.
#: So verification of up to k = 7 drafts at batch 1 runs through the same kernel as a plain step.
#: (2-core Intel Xeon VM with AVX512-BF16 and no AMX exposed, torch 2.13.0+cpu, 2 threads.)
MAX_ROWS = 8


def _cache_dir() -> Path:
    from specdec.models.loading import cache_dir

    return cache_dir() / "kernels"


def _cpu_key() -> str:
    """The build is -march=native: key it by the CPU's flags so a copied cache never runs on another CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


@functools.cache
def _library():
    """The loaded kernel, or None where it cannot run. Decided once per process: SPECDEC_REFERENCE_KERNELS
    is read at the first bfloat16 decode step, not at every call."""
    if platform.machine() not in ("x86_64", "AMD64") or _flag("SPECDEC_REFERENCE_KERNELS"):
        return None
    if "avx512_bf16" not in _cpu_key().split():  # nothing to build for (and no warning to give)
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:  # no compiler, a read-only or full cache, ...
        detail = getattr(error, "stderr", None) or error
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        warnings.warn(f"specdec: the bfloat16 CPU kernel could not be built or loaded ({compiler}: {detail}); "
                      "using torch's bfloat16 path", stacklevel=4)
        return None
    if not lib.specdec_cpu_supported():
        return None
    lib.specdec_linear_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    lib.specdec_linear_bf16.restype = None
    return lib


def _build(compiler: str) -> Path:
    """Compile cpu_linear.c into the cache once per (source, compiler, flags, CPU); returns the .so path."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"cpu_linear-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # build aside, then rename: no half-written .so
            built = Path(tmp) / path.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                           text=True, timeout=120)
            os.replace(built, path)  # atomic: two processes building at once both end with a whole file
    return path


def available() -> bool:
    """Whether ``linear_bf16`` runs here (builds the kernel on the first call)."""
    return _library() is not None


def linear_bf16(x, weight, bias=None):
    """x [..., in] bfloat16, weight [out, in] bfloat16 (contiguous), bias [out] or None -> [..., out] bfloat16.

    Each output row depends only on its input row (accumulation order fixed per element): the same token
    gives the same bits in a 1-row decode step and in a (k + 1)-row verification pass.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the bfloat16 CPU kernel is not available here; check kernels.cpu_linear.available()")
    # called once per linear layer per decode step (121 times for SmolLM2): plain attribute checks and no
    # reshapes keep the Python side at ~8 us of the call, where a generator and two views took ~12
    bf16 = torch.bfloat16
    if (x.dtype != bf16 or weight.dtype != bf16 or x.device.type != "cpu" or weight.device.type != "cpu"
            or (bias is not None and (bias.dtype != bf16 or bias.device.type != "cpu"))):
        raise ValueError(f"linear_bf16 takes bfloat16 CPU tensors, got x {x.dtype} on {x.device}, "
                         f"weight {weight.dtype} on {weight.device}"
                         + ("" if bias is None else f", bias {bias.dtype} on {bias.device}"))
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features or not weight.is_contiguous():
        raise ValueError(f"linear_bf16: x [..., {x.shape[-1]}] does not fit a contiguous weight "
                         f"[{out_features}, {in_features}]")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"linear_bf16: bias of shape {tuple(bias.shape)} does not fit {out_features} outputs")
    x = x.contiguous()  # rows of in_features each; held until the call returns (as bias below)
    out = torch.empty(*x.shape[:-1], out_features, dtype=bf16)  # [..., out]
    bias_ptr = 0
    if bias is not None:
        bias = bias.contiguous()
        bias_ptr = bias.data_ptr()
    lib.specdec_linear_bf16(x.data_ptr(), weight.data_ptr(), bias_ptr, out.data_ptr(),
                            x.numel() // in_features, out_features, in_features)
    return out


def linear_bf16_reference(x, weight, bias=None):
    """The oracle: float32 products and sums, one rounding to bfloat16 at the end."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16)
