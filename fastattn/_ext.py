"""The one place that loads the compiled extension fastattn._C.

Importing fastattn never fails because of the extension: when it is missing or cannot load,
`available()` is False, `why_unavailable()` says why, and every op falls back or raises an error
that quotes this reason. Set FASTATTN_NO_EXTENSION=1 to run without it (pure PyTorch paths).
"""
from __future__ import annotations

import importlib
import importlib.util

_module = None
_reason: str | None = None
_loaded = False


def _load() -> None:
    global _module, _reason, _loaded
    _loaded = True
    import os

    import torch  # noqa: F401  (libc10 and friends must be loaded before the extension)

    if os.environ.get("FASTATTN_NO_EXTENSION", "") not in ("", "0"):
        _reason = "disabled by FASTATTN_NO_EXTENSION"
        return
    if importlib.util.find_spec("fastattn._C") is None:
        _reason = (
            "fastattn._C is not built: install with `pip install --no-build-isolation -e .` "
            "(needs a C++ compiler and ninja)"
        )
        return
    try:
        _module = importlib.import_module("fastattn._C")
    except (ImportError, OSError) as e:
        msg = str(e)
        hint = (
            " (built against another torch version: rebuild with `pip install --no-build-isolation -e .`)"
            if "undefined symbol" in msg
            else ""
        )
        _reason = f"fastattn._C failed to load: {msg}{hint}"
        return
    built = _module.build_info().get("torch", "")
    runtime = torch.__version__.split("+")[0]
    if built and not runtime.startswith(built):
        _reason = f"fastattn._C was built for torch {built} but torch {runtime} is running: rebuild it"
        _module = None


def available() -> bool:
    """True when fastattn._C loaded."""
    if not _loaded:
        _load()
    return _module is not None


def why_unavailable() -> str | None:
    """None when the extension is loaded, else the reason it is not."""
    available()
    return _reason


def build_info() -> dict:
    """How the extension was built ({'openmp': ..., 'cuda': ..., 'torch': ..., 'compiler': ...}), or {}."""
    return dict(_module.build_info()) if available() else {}


def has_cuda_kernels() -> bool:
    return bool(build_info().get("cuda", False))
