"""`python -m fastattn info`: what is built, what can run here, and why not."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import _ext, reference
from .modules import FAST_MODULES


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """Everything `info` prints, as a dict (also used by the benchmarks to tag their rows)."""
    triton = _version("triton")
    cuda = torch.cuda.is_available()
    return {
        "fastattn": _version("fastattn") or "not installed (running from source)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "triton": triton or "not installed",
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "extension": "loaded" if _ext.available() else "missing",
        "extension_reason": _ext.why_unavailable(),
        "extension_build": _ext.build_info(),
        "backends": {
            "cpu (C++ kernels)": (True, None) if _ext.available() else (False, _ext.why_unavailable()),
            "cuda (CUDA C++ kernels)": (
                (True, None) if cuda and _ext.has_cuda_kernels()
                else (False, "no CUDA device" if not cuda else "fastattn._C built without CUDA kernels")
            ),
            "triton": (
                (False, "triton is not installed") if triton is None
                else (False, "no CUDA device (Triton kernels run on GPU; tests use TRITON_INTERPRET=1)") if not cuda
                else (True, None)
            ),
            "torch (reference math)": (True, None),
        },
        "reference_modules": len(reference.__all__),
        "fast_modules": list(FAST_MODULES),
    }


def main() -> None:
    d = collect()
    print("fastattn", d["fastattn"])
    for k in ("python", "torch", "torch_cuda", "triton", "device", "cpu_threads"):
        print(f"  {k:<14} {d[k]}")
    ext = d["extension"]
    print(f"  {'fastattn._C':<14} {ext}" + (f": {d['extension_reason']}" if d["extension_reason"] else ""))
    if d["extension_build"]:
        print("  " + " " * 15 + ", ".join(f"{k}={v}" for k, v in d["extension_build"].items()))
    print("backends")
    for name, (ok, why) in d["backends"].items():
        print(f"  {name:<26} {'yes' if ok else 'no'}" + (f"  ({why})" if why else ""))
    print(f"reference modules: {d['reference_modules']} in fastattn.reference")
    print(f"fast modules: {len(d['fast_modules'])} ({', '.join(d['fast_modules'])})")
