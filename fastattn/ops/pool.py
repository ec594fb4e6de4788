"""Channel pooling ops: per (b, c) statistics over the H x W plane."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ..reference._checks import check_feature_map


def channel_mean_reference(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C) mean over H x W, fp32 accumulation for 16-bit inputs (pure PyTorch)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.mean(dim=(2, 3), dtype=acc).to(x.dtype)


def channel_mean_backend(x: Tensor) -> str:
    """Which implementation `fastattn::channel_mean` runs for x: 'cpu' (C++), 'cuda' (CUDA C++) or 'torch'."""
    if x.device.type == "cpu" and _ext.available():
        return "cpu"
    if x.device.type == "cuda" and _ext.has_cuda_kernels():
        return "cuda"
    return "torch"


@torch.library.custom_op("fastattn::channel_mean", mutates_args=())
def _channel_mean(x: Tensor) -> Tensor:
    if channel_mean_backend(x) != "torch":
        return torch.ops.fastattn_C.channel_mean(x)
    return channel_mean_reference(x)


@_channel_mean.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:2])


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    # Only the shape is needed: nothing of x is saved.
    ctx.x_shape = x.shape


def _backward(ctx, grad):
    # dx[b, c, h, w] = dy[b, c] / (H * W): a broadcast view, as torch's own mean backward returns.
    B, C, H, W = ctx.x_shape
    return (grad / (H * W)).reshape(B, C, 1, 1).expand(B, C, H, W)


_channel_mean.register_autograd(_backward, setup_context=_setup_context)


def channel_mean(x: Tensor) -> Tensor:
    """Global average pool: (B, C, H, W) -> (B, C), in x's dtype, accumulated in fp32.

    Runs the OpenMP C++ kernel on CPU tensors and the CUDA C++ kernel on CUDA tensors when
    fastattn._C has them (NCHW and channels_last read in place), else PyTorch. Differentiable; torch.compile sees one opaque op.
    """
    check_feature_map("channel_mean", x)
    return _channel_mean(x)
