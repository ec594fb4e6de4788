"""Small helpers shared by the op files."""
from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(t: Tensor | torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp32 for 16/32-bit inputs, fp64 for fp64 (gradcheck)."""
    dtype = t.dtype if isinstance(t, Tensor) else t
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat(t: Tensor) -> Tensor:
    """t itself when its H x W flattens into one strided axis (NCHW, channels_last), else a copy."""
    from fastattn.kernels._layout import flattenable

    return flattenable(t)


def like(t: Tensor, ref: Tensor) -> Tensor:
    """t in ref's dtype with the strides of torch.empty_like(ref), which the fake implementations
    promise. Elementwise torch results follow whichever operand PyTorch picks (dy NCHW, x
    channels_last), and a kernel run on a copied view writes a contiguous result: copy once then."""
    t = t.to(ref.dtype)
    if t.stride() == torch.empty_like(ref, device="meta").stride():
        return t
    return torch.empty_like(ref).copy_(t)
