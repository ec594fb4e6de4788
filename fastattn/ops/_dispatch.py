"""Backend selection for the fastattn ops, with reasons.

Backends: "triton" (Triton kernels, CUDA tensors; CPU tensors only under TRITON_INTERPRET=1),
"cuda" (CUDA C++ kernels of fastattn._C), "cpu" (C++ kernels of fastattn._C), "torch" (the
reference math in PyTorch, always available). "auto" walks a priority list per device and falls
back with a one-time log line saying why; an explicit backend that cannot run raises an error
that says why.

Each op declares which backends it implements and a check per backend returning None (can run)
or the reason it cannot; `resolve` does the rest.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from typing import Callable, Iterator

import torch

from .. import _ext

log = logging.getLogger("fastattn")

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

_default_backend = "auto"
_logged: set = set()


def check_backend_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"fastattn: argument 'backend' must be one of {BACKENDS}, got {backend!r}")
    return backend


def set_backend(backend: str) -> None:
    """Set the process-wide default backend used when an op is called with backend=None."""
    global _default_backend
    _default_backend = check_backend_name(backend)


def get_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """`with fastattn.use_backend("torch"): ...` runs the ops of the block on that backend."""
    global _default_backend
    old, _default_backend = _default_backend, check_backend_name(backend)
    try:
        yield
    finally:
        _default_backend = old


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def triton_reason(t: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on t's device, or None."""
    missing = _triton_missing()
    if missing:
        return missing
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu" and triton_interpreting():
        return None
    return f"Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a {t.device.type} tensor"


@torch.compiler.assume_constant_result     # loads fastattn._C once: constant while a graph is traced
def _ext_missing() -> str:
    """Why fastattn._C cannot be used ("" when it can)."""
    return "" if _ext.available() else (_ext.why_unavailable() or "fastattn._C is not available")


@torch.compiler.assume_constant_result
def _ext_has_cuda() -> bool:
    return _ext.has_cuda_kernels()


def cpu_ext_reason(t: torch.Tensor) -> str | None:
    if t.device.type != "cpu":
        return f"the C++ CPU kernels take CPU tensors, got a {t.device.type} tensor"
    return _ext_missing() or None


def cuda_ext_reason(t: torch.Tensor) -> str | None:
    if t.device.type != "cuda":
        return f"the CUDA C++ kernels take CUDA tensors, got a {t.device.type} tensor"
    missing = _ext_missing()
    if missing:
        return missing
    if not _ext_has_cuda():
        return "fastattn._C was built without CUDA kernels (rebuild with FASTATTN_BUILD_CUDA=1)"
    return None


_REGISTERED: set = set()     # (raw_op, key) seen registered: a registration is never taken back


@torch.compiler.assume_constant_result     # a registry lookup: constant while a graph is traced
def _registered(raw_op: str, key: str) -> bool:
    # Cached: the dispatcher query costs ~2 us, paid twice per op call otherwise.
    if (raw_op, key) in _REGISTERED:
        return True
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn_C::{raw_op}", key)
    except RuntimeError:        # no schema: an extension built before the op existed
        return False
    if found:
        _REGISTERED.add((raw_op, key))
    return found


def cpu_kernel(*raw_ops: str) -> Callable[[torch.Tensor], str | None]:
    """The "cpu" check of an op whose C++ kernels are `torch.ops.fastattn_C.<raw_ops>`."""

    def reason(t: torch.Tensor) -> str | None:
        why = cpu_ext_reason(t)
        missing = [r for r in raw_ops if not _registered(r, "CPU")]
        if why is None and missing:
            why = (f"fastattn._C has no CPU kernel {missing[0]!r} (built from older sources? "
                   "rebuild: pip install --no-build-isolation -e .)")
        return why

    return reason


def cuda_kernel(*raw_ops: str) -> Callable[[torch.Tensor], str | None]:
    """The "cuda" check of an op whose CUDA C++ kernels are `torch.ops.fastattn_C.<raw_ops>`."""

    def reason(t: torch.Tensor) -> str | None:
        why = cuda_ext_reason(t)
        missing = [r for r in raw_ops if not _registered(r, "CUDA")]
        if why is None and missing:
            why = (f"fastattn._C has no CUDA kernel {missing[0]!r} (built from older sources? "
                   "rebuild: FASTATTN_BUILD_CUDA=1 pip install --no-build-isolation -e .)")
        return why

    return reason


def not_implemented(backend: str) -> Callable[[torch.Tensor], str]:
    return lambda t: f"this op has no {backend} implementation yet"


def resolve(op: str, t: torch.Tensor, backend: str | None,
            checks: dict[str, Callable[[torch.Tensor], str | None]]) -> str:
    """The concrete backend for op on tensor t. `checks` maps each implemented backend to its
    reason function; "torch" is always implemented."""
    backend = check_backend_name(backend or _default_backend)
    if backend == "torch":
        return "torch"
    if backend != "auto":
        check = checks.get(backend, not_implemented(backend))
        why = check(t)
        if why:
            raise RuntimeError(f"fastattn::{op}: backend={backend!r} cannot run here: {why}")
        return backend
    reasons = []
    for name in AUTO_ORDER.get(t.device.type, ("torch",)):
        if name == "torch":
            break
        why = checks.get(name, not_implemented(name))(t)
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    key = (op, t.device.type, tuple(reasons))
    # Not while torch.compile traces: a logging call would break the graph (it logs in eager).
    if reasons and key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        log.info("fastattn::%s on %s runs the PyTorch reference math (%s)", op, t.device.type, "; ".join(reasons))
    return "torch"


def _no_modes() -> bool:
    """No torch function mode and no dispatch mode is active (False if this torch cannot tell)."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        return not torch._C._is_torch_function_mode_enabled() and _get_current_dispatch_mode() is None
    except (ImportError, AttributeError):
        return False


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct(backend: str, *tensors: torch.Tensor | None) -> bool:
    """Whether an op may run its C++ implementation (backend "cpu" or "cuda") as a plain function
    call instead of through its registered custom op: eager mode, plain tensors, no autograd
    graph to record, no torch function / dispatch mode. The custom op is what autograd,
    torch.compile, torch.export, FakeTensor and the modes need; in inference it only adds the
    dispatcher's Python round trips (about 7 us per call on the 2-core dev machine, more than
    some of the kernels at MobileNet shapes). Both paths run the same implementation function.
    """
    if backend not in ("cpu", "cuda") or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    return _no_modes()


def custom_op(name: str, **kwargs) -> Callable:
    """`torch.library.custom_op(name, **kwargs)` that also keeps the undecorated implementation
    as the op's `.plain`, for `run`."""

    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(name, **kwargs)(fn)
        op.plain = fn
        return op

    return wrap


def run(op, *args):
    """`op(*args)` for an op made by `custom_op` whose last argument is the resolved backend:
    through the registered custom op, or as the plain function when `direct` allows it."""
    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)]
    return (op.plain if direct(args[-1], *tensors) else op)(*args)
