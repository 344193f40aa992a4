"""specdec's C kernels for the CPU (``cpu_linear.c``, ``cpu_attention.c``, ``cpu_layers.c``), built once per
machine and loaded with ctypes.

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
SOURCES = [HERE / "cpu_linear.c", HERE / "cpu_attention.c", HERE / "cpu_layers.c"]
HEADERS = [HERE / "cpu_common.h"]
# -ffp-contract=off: a product and a sum that torch rounds separately must not become one FMA here
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", f"-I{HERE}"]
P, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
SIGNATURES = {  # name: argument types (each returns 0; -1: no memory for its scratch; -2: bad input)
    "specdec_linear": [P, P, P, P, L, L, L, I, P, F, I, P],
    "specdec_attention": [P, P, P, P, L, L, L, L, L, P, P, L, L, L, P, L, L, L, F, I, P],
    "specdec_layers": [P, L, L, P, L, F, P, P, P, L, P, P, P, L, L, L, L, L, P, P, L, L, L, P, L, L, L, F, I],
}


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
    for name, argtypes in SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
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
