"""specdec's C kernels for the CPU (``cpu_linear.c``, ``cpu_attention.c``, ``cpu_layers.c``, ``cpu_head.c``),
built once per machine and loaded with ctypes.

They are compiled together with the system C compiler (``cc``, or ``$CC``) into the user cache
(``~/.cache/specdec/kernels``); where that is impossible — no compiler, no AVX-512, not x86 — or
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

from specdec.kernels.dispatch import _flag

HERE = Path(__file__).parent
SOURCES = [HERE / "cpu_linear.c", HERE / "cpu_attention.c", HERE / "cpu_layers.c", HERE / "cpu_head.c"]
# -ffp-contract=off: a product and a sum that torch rounds separately must not become one FMA here
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", f"-I{HERE}"]
HEADERS = [HERE / "cpu_common.h", HERE / "cpu_args.h"]
P, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float


class LinearArgs(ctypes.Structure):  # cpu_args.h: the same fields in the same order, shapes there
    _fields_ = [("x", P), ("weight", P), ("bias", P), ("norm", P), ("norm_parts", L), ("residual", P), ("y", P),
                ("rows", L), ("out", L), ("in_", L), ("eps", F), ("gated", I), ("bf16", I), ("bits", I),
                ("group_size", L), ("act8", I)]


class AttentionArgs(ctypes.Structure):
    _fields_ = [("qkv", P), ("cos", P), ("sin", P), ("positions", P), ("batch", L), ("T", L), ("heads", L),
                ("kv_heads", L), ("head_dim", L), ("keys", P), ("values", P), ("block_stride", L),
                ("slot_stride", L), ("head_stride", L), ("block_table", P), ("max_blocks", L), ("block_size", L),
                ("blocks", L), ("scale", F), ("bf16", I), ("out", P)]


class LayersArgs(ctypes.Structure):
    _fields_ = [("x", P), ("hidden", L), ("inner", L), ("layers", L), ("weights", P), ("eps", F), ("bits", I),
                ("group_size", L), ("act8", I), ("qkv", P), ("attn", P), ("h", P), ("layer_stride", L),
                ("attention", AttentionArgs)]


class HeadArgs(ctypes.Structure):
    _fields_ = [("positions", P), ("last", P), ("next", P), ("batch", L), ("T", L), ("steps", L), ("embedding", P),
                ("embedding_bf16", I), ("vocab_ids", P), ("cos_table", P), ("sin_table", P), ("rope_len", L),
                ("fc", LinearArgs), ("lm_head", LinearArgs), ("layers", LayersArgs), ("input", P), ("cos", P),
                ("sin", P), ("features", P), ("logits", P), ("step_positions", P), ("drafts", P)]


#: each kernel takes a pointer to its arguments and returns 0; -1: no memory for its scratch; -2: bad input
SIGNATURES = {"specdec_linear": LinearArgs, "specdec_attention": AttentionArgs, "specdec_layers": LayersArgs,
              "specdec_head_drafts": HeadArgs}


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
def library():
    """The loaded kernels, or None where they cannot run. Decided once per process: SPECDEC_REFERENCE_KERNELS
    is read at the first CPU forward, not at every call."""
    # x86-64 with a 64-bit C long (the kernels take torch's int64 positions and sizes as long): not Windows
    if platform.machine() not in ("x86_64", "AMD64") or os.name == "nt" or _flag("SPECDEC_REFERENCE_KERNELS"):
        return None
    if not {"avx512f", "avx512bw"} <= set(_cpu_key().split()):  # nothing to build for (and no warning to give)
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:  # no compiler, a read-only or full cache, ...
        detail = getattr(error, "stderr", None) or error
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        warnings.warn(f"specdec: the CPU kernels could not be built or loaded ({compiler}: {detail}); "
                      "using torch's path", stacklevel=4)
        return None
    if not lib.specdec_cpu_supported():
        return None
    for name, args in SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = [ctypes.POINTER(args)], ctypes.c_int
    sizes = (ctypes.c_long * len(SIGNATURES))()
    lib.specdec_args_sizes(sizes)
    if list(sizes) != [ctypes.sizeof(args) for args in SIGNATURES.values()]:  # cpu_args.h and the mirrors differ
        raise RuntimeError(f"specdec: the C kernels' argument structs ({list(sizes)} bytes) differ from "
                           f"kernels/cpu.py's ({[ctypes.sizeof(args) for args in SIGNATURES.values()]})")
    return lib


def _build(compiler: str) -> Path:
    """Compile the sources into the cache once per (sources, compiler, flags, CPU); returns the .so path."""
    text = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(text + " ".join([compiler, *FLAGS[:-1], _cpu_key()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"cpu-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # build aside, then rename: no half-written .so
            built = Path(tmp) / path.name
            subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)], check=True,
                           capture_output=True, text=True, timeout=180)
            os.replace(built, path)  # atomic: two processes building at once both end with a whole file
    return path


def available() -> bool:
    """Whether the CPU kernels run here (builds them on the first call)."""
    return library() is not None
