"""Which implementation runs an op: plain Python on static facts, so torch.compile traces it.

``resolve(op, backend, device, dtype, kernels)`` returns one of ``"reference"``, ``"cpu"``,
``"cuda"``, ``"triton"``, or raises an error that says why the request can't be served: a
``ValueError`` for a backend that can't run here, a ``TypeError`` for a dtype it doesn't take.
Every op lists its compiled backends and their dtypes (``kernels``); no caller re-implements
a fallback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Collection, Mapping

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# What the kernels compute, by backend (half inputs are computed in float32).
CPU_DTYPES = (torch.float32, torch.float64)
# The C++ kernels that also take half inputs, computed in float32: screened attention (per-thread
# float32 buffers), the CNN-F ops (csrc/cpu/half_inputs.h), RelRNN / RelLSTM (cast at entry).
CPU_HALF_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

EXTENSION_ENV = "SCREENING_ATTN_EXTENSION"


def _load_extension() -> types.ModuleType:
    """Import screening_attn._C: the in-place build, or the file that $SCREENING_ATTN_EXTENSION
    names (`make sanitize` points it at build/sanitize, leaving the optimized build alone)."""
    path = os.environ.get(EXTENSION_ENV)
    if not path:
        from screening_attn import _C  # type: ignore[attr-defined]

        return _C
    spec = importlib.util.spec_from_file_location("screening_attn._C", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise ImportError(f"{EXTENSION_ENV}={path!r} is not an extension module file")
    module = importlib.util.module_from_spec(spec)
    # registered first: a later `import screening_attn._C` must get this one, not load the
    # in-place library (both would register the same ops)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    # as the import statement would (ModuleType's stub declares no attributes to set)
    sys.modules["screening_attn"]._C = module  # type: ignore[attr-defined]
    return module


_C: types.ModuleType | None
C_ERROR: str | None
try:  # loading _C registers the C++ ops (TORCH_LIBRARY) as a side effect
    _C = _load_extension()
    C_ERROR = None
except ImportError as exc:  # the reference backend still works without the extension
    _C = None
    C_ERROR = f"the C++ extension screening_attn._C failed to load ({exc})"

HAS_TRITON = importlib.util.find_spec("triton") is not None


def build_info() -> dict:
    """Facts about the compiled extension: its file, build flags, threads (or the reason it is
    missing)."""
    if _C is None:
        return {"loaded": False, "error": C_ERROR}
    return {"loaded": True, "path": _C.__file__, **_C.build_info()}


def cuda_compiled() -> bool:
    return _C is not None and bool(_C.build_info()["cuda"])


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device`` in this process, else the reason."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend='cpu' needs CPU tensors, got tensors on {device}"
        return C_ERROR
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend='cuda' needs CUDA tensors, got tensors on {device}"
        if C_ERROR is not None:
            return C_ERROR
        if not cuda_compiled():
            return "screening_attn._C was built without CUDA sources (rebuild with FORCE_CUDA=1)"
        return None
    if backend == "triton":
        if not HAS_TRITON:
            return "backend='triton' needs the triton package, which is not installed"
        if device.type == "cpu" and not triton_interpret():
            return (
                "backend='triton' on CPU tensors runs only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton); use backend='cpu'"
            )
        if device.type not in ("cpu", "cuda"):
            return f"backend='triton' needs CUDA tensors, got tensors on {device}"
        return None
    raise AssertionError(backend)


def _dtype_names(dtypes: Collection[torch.dtype]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def check_backend(backend: object) -> str:
    """``backend`` is one of :data:`BACKENDS` (a ValueError naming the choices otherwise)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve(
    op: str,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    kernels: Mapping[str, Collection[torch.dtype]],
) -> str:
    """Pick the implementation of ``op`` for ``dtype`` tensors on ``device``.

    ``kernels`` maps each compiled backend of ``op`` (``"cpu"``, ``"cuda"``, ``"triton"``) to
    the dtypes it computes; ``"reference"`` always exists and takes every floating dtype.
    ``"auto"`` prefers the compiled kernel for the device and falls back to the reference only
    where the op has no kernel for this device and dtype or the extension did not load. A
    backend asked for by name runs or raises: ``ValueError`` if it can't run here,
    ``TypeError`` if it doesn't take ``dtype``.
    """
    check_backend(backend)
    if backend == "reference":
        return backend
    if backend == "auto":
        preferred = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        for cand in preferred:
            if cand in kernels and dtype in kernels[cand] and _why_not(cand, device) is None:
                return cand
        return "reference"
    if backend not in kernels:
        available = ("reference", *kernels)
        raise ValueError(f"{op} has no backend={backend!r}; available here: {available}")
    reason = _why_not(backend, device)
    if reason is not None:
        raise ValueError(f"{op}: {reason}")
    if dtype not in kernels[backend]:
        raise TypeError(
            f"{op}: backend={backend!r} takes {_dtype_names(kernels[backend])} inputs, got {dtype}"
        )
    return backend
