"""Softmax across branches and weighted sum (Selective Kernel's selection step), and the weighted
branches concatenated on channels (PyramidSplitAttention).

    branch_softmax_sum:   out[b, c, h, w] = sum_k a[b, k, c] * feats[b, k, c, h, w],  a = softmax_k(logits)
    branch_softmax_scale: out[b, j * C + c, h, w] = a[b, k, c] * feats[b, k, c, h, w],
                          j = K - 1 - k with reverse=True (PyramidSplitAttention's order), else j = k

feats is ONE (B, K, C, H, W) tensor, as the reference builds it with torch.stack (a list of K maps
would need K pointers in a kernel, or K launches each re-reading the output). Both stacks read in
place: torch.stack of NCHW maps (H x W contiguous) and torch.stack of channels_last maps (the
stride of dim 2, C, is 1); the output is channels_last in the second case, NCHW otherwise. Other
strides work as well (views whose H x W does not flatten are copied first).

Backward: dfeats = dy * a[..., None, None]; dlogits = a * (s - sum_k a * s) with
s[b, k, c] = sum_hw dy * feats[b, k] (for the scale op, dy restricted to branch k's channels).
Saved for backward: feats and logits (the (B, K, C) softmax is
recomputed); nothing of the size of feats is created for it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch
from ._common import acc_dtype

__all__ = ["branch_softmax_sum", "branch_softmax_scale"]

OP = "branch_softmax_sum"
CHECKS = {"triton": _dispatch.triton_reason,
          "cuda": _dispatch.cuda_kernel("branch_softmax_sum", "branch_softmax_sum_backward"),
          "cpu": _dispatch.cpu_kernel("branch_softmax_sum", "branch_softmax_sum_backward")}



def _new_out(feats: Tensor, channels: int | None = None) -> Tensor:
    """The (B, channels (default C), H, W) output: channels_last when the branches' channels are
    contiguous (torch.stack of channels_last maps: feats.stride(2) == 1), else NCHW."""
    B, _, C, H, W = feats.shape
    C = C if channels is None else channels
    cl = feats.stride(2) == 1 and C > 1 and H * W > 1
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty((B, C, H, W), device=feats.device, dtype=feats.dtype, memory_format=fmt)


def _weights(logits: Tensor, acc: torch.dtype) -> Tensor:
    """(B, K, C) softmax over the branches, contiguous, in the accumulation dtype."""
    return torch.softmax(logits.to(acc), dim=1).contiguous()


@_dispatch.custom_op("fastattn::branch_softmax_sum", mutates_args=())
def _branch_softmax_sum(feats: Tensor, logits: Tensor, backend: str) -> Tensor:
    acc = acc_dtype(feats)
    if backend in ("cpu", "cuda"):     # the C++ / CUDA kernels of fastattn._C (softmax included)
        return torch.ops.fastattn_C.branch_softmax_sum(feats, logits.to(acc).contiguous())
    a = _weights(logits, acc)
    if backend == "triton":
        from fastattn.kernels.branch import branch_sum_forward

        return branch_sum_forward(feats, a, _new_out(feats))
    out = _new_out(feats)
    out.copy_((feats.to(acc) * a[..., None, None]).sum(1))
    return out


@_branch_softmax_sum.register_fake
def _(feats, logits, backend):
    return _new_out(feats)


@torch.library.custom_op("fastattn::branch_softmax_sum_backward", mutates_args=())
def _branch_softmax_sum_backward(dy: Tensor, feats: Tensor, logits: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(feats)
    if backend in ("cpu", "cuda"):
        dfeats, dlogits = torch.ops.fastattn_C.branch_softmax_sum_backward(dy.to(feats.dtype), feats,
                                                                           logits.to(acc).contiguous())
        return dfeats, dlogits.to(logits.dtype)
    a = _weights(logits, acc)
    if backend == "triton":
        from fastattn.kernels.branch import branch_sum_backward

        dfeats, s = branch_sum_backward(dy, feats, a)
    else:
        dy32 = dy.to(acc)
        dfeats = torch.empty_like(feats)
        dfeats.copy_(dy32[:, None] * a[..., None, None])
        s = (dy32[:, None] * feats.to(acc)).sum((3, 4))
    dlogits = (a * (s - (a * s).sum(1, keepdim=True))).to(logits.dtype)
    return dfeats, dlogits.contiguous()


@_branch_softmax_sum_backward.register_fake
def _(dy, feats, logits, backend):
    return torch.empty_like(feats), logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    feats, logits, backend = inputs
    ctx.save_for_backward(feats, logits)
    ctx.backend = backend


def _backward(ctx, dy):
    feats, logits = ctx.saved_tensors
    dfeats, dlogits = torch.ops.fastattn.branch_softmax_sum_backward(dy, feats, logits, ctx.backend)
    return dfeats, dlogits, None


_branch_softmax_sum.register_autograd(_backward, setup_context=_setup_context)


def _check(op: str, feats, logits) -> None:
    from ..reference._checks import check_tensor

    check_tensor(op, "feats", feats, dim=5, shape_hint="(B, K, C, H, W)")
    check_tensor(op, "logits", logits, dim=3, shape_hint="(B, K, C)")
    B, K, C = feats.shape[:3]
    if K < 1:
        raise ValueError(f"{op}: argument 'feats' must have at least one branch (dim 1), got shape "
                         f"{tuple(feats.shape)}")
    if tuple(logits.shape) != (B, K, C):
        raise ValueError(f"{op}: argument 'logits' must have shape (B, K, C) = {(B, K, C)}, got {tuple(logits.shape)}")
    if logits.device != feats.device:
        raise ValueError(f"{op}: argument 'logits' must be on feats' device {feats.device}, got {logits.device}")


def branch_softmax_sum(feats: Tensor, logits: Tensor, *, backend: str | None = None) -> Tensor:
    """Softmax over K branches, then their weighted sum: SelectiveKernel's selection.

    feats: (B, K, C, H, W) float, the K branch maps stacked on dim 1 (torch.stack of NCHW or of
    channels_last (B, C, H, W) maps; both are read in place); logits: (B, K, C) float, the
    attention logits before the softmax over K.
    Returns (B, C, H, W) in feats' dtype: channels_last when feats.stride(2) == 1 (a stack of
    channels_last maps), else NCHW. Differentiable in feats and logits.
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cuda" (the CUDA C++
    kernels of fastattn._C), "cpu" (its OpenMP C++ kernels, CPU tensors), "torch".
    """
    _check(OP, feats, logits)
    return _dispatch.run(_branch_softmax_sum, feats, logits, _dispatch.resolve(OP, feats, backend, CHECKS))


# ---------------------------------------------------------------------------------------------
# The weighted branches, unsummed and concatenated on channels (PyramidSplitAttention)
# ---------------------------------------------------------------------------------------------

OP_SCALE = "branch_softmax_scale"
CHECKS_SCALE = {"triton": _dispatch.triton_reason,
                "cuda": _dispatch.cuda_kernel("branch_softmax_scale", "branch_softmax_scale_backward"),
                "cpu": _dispatch.cpu_kernel("branch_softmax_scale", "branch_softmax_scale_backward")}


def _branches_of(t: Tensor, K: int, reverse: bool) -> Tensor:
    """(B, K * C, H, W) -> (B, K, C, H, W) view (or copy) in branch order k."""
    B, KC, H, W = t.shape
    t = t.reshape(B, K, KC // K, H, W)
    return t.flip(1) if reverse else t


@_dispatch.custom_op("fastattn::branch_softmax_scale", mutates_args=())
def _branch_softmax_scale(feats: Tensor, logits: Tensor, reverse: bool, backend: str) -> Tensor:
    acc = acc_dtype(feats)
    if backend in ("cpu", "cuda"):
        return torch.ops.fastattn_C.branch_softmax_scale(feats, logits.to(acc).contiguous(), reverse)
    a = _weights(logits, acc)
    K, C = feats.shape[1:3]
    out = _new_out(feats, K * C)
    if backend == "triton":
        from fastattn.kernels.branch import branch_scale_forward

        return branch_scale_forward(feats, a, out, reverse)
    w = feats.to(acc) * a[..., None, None]
    out.copy_((w.flip(1) if reverse else w).flatten(1, 2))
    return out


@_branch_softmax_scale.register_fake
def _(feats, logits, reverse, backend):
    K, C = feats.shape[1:3]
    return _new_out(feats, K * C)


@torch.library.custom_op("fastattn::branch_softmax_scale_backward", mutates_args=())
def _branch_softmax_scale_backward(dy: Tensor, feats: Tensor, logits: Tensor, reverse: bool,
                                   backend: str) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(feats)
    if backend in ("cpu", "cuda"):
        dfeats, dlogits = torch.ops.fastattn_C.branch_softmax_scale_backward(dy.to(feats.dtype), feats,
                                                                             logits.to(acc).contiguous(), reverse)
        return dfeats, dlogits.to(logits.dtype)
    a = _weights(logits, acc)
    if backend == "triton":
        from fastattn.kernels.branch import branch_scale_backward

        dfeats, s = branch_scale_backward(dy, feats, a, reverse)
    else:
        dyk = _branches_of(dy.to(acc), feats.shape[1], reverse)
        dfeats = torch.empty_like(feats)
        dfeats.copy_(dyk * a[..., None, None])
        s = (dyk * feats.to(acc)).sum((3, 4))
    dlogits = (a * (s - (a * s).sum(1, keepdim=True))).to(logits.dtype)
    return dfeats, dlogits.contiguous()


@_branch_softmax_scale_backward.register_fake
def _(dy, feats, logits, reverse, backend):
    return torch.empty_like(feats), logits.new_empty(logits.shape)


def _setup_context_scale(ctx, inputs, output):
    feats, logits, reverse, backend = inputs
    ctx.save_for_backward(feats, logits)
    ctx.reverse, ctx.backend = reverse, backend


def _backward_scale(ctx, dy):
    feats, logits = ctx.saved_tensors
    dfeats, dlogits = torch.ops.fastattn.branch_softmax_scale_backward(dy, feats, logits, ctx.reverse, ctx.backend)
    return dfeats, dlogits, None, None


_branch_softmax_scale.register_autograd(_backward_scale, setup_context=_setup_context_scale)


def branch_softmax_scale(feats: Tensor, logits: Tensor, *, reverse: bool = False,
                         backend: str | None = None) -> Tensor:
    """Softmax over K branches, each branch scaled by its weights, concatenated on channels.

    feats: (B, K, C, H, W) float (as for branch_softmax_sum); logits: (B, K, C) float.
    Returns (B, K * C, H, W) in feats' dtype: channels j * C .. (j + 1) * C hold
    softmax_k(logits)[:, k, :, None, None] * feats[:, k] with j = K - 1 - k when reverse=True
    (PyramidSplitAttention's torch.cat(weighted[::-1], 1)), else j = k. channels_last when
    feats.stride(2) == 1, else NCHW. Differentiable in feats and logits.
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cuda" (the CUDA C++
    kernels of fastattn._C), "cpu" (its OpenMP C++ kernels, CPU tensors), "torch".
    """
    _check(OP_SCALE, feats, logits)
    if not isinstance(reverse, bool):
        raise TypeError(f"{OP_SCALE}: argument 'reverse' must be a bool, got {type(reverse).__name__}")
    backend = _dispatch.resolve(OP_SCALE, feats, backend, CHECKS_SCALE)
    return _dispatch.run(_branch_softmax_scale, feats, logits, reverse, backend)
