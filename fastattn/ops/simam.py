"""SimAM, the whole module as one op: per (b, c) plane of n = H * W positions,

    mu = mean(x),  d = (x - mu)^2,  v = sum(d) / (n - 1),  y = x * sigmoid(d / (4 (v + e_lambda)) + 0.5).

Forward reads x twice at most (statistics, then the gate; once for a plane that fits in one
tile) and writes y. Backward recomputes mu, v and the gate from x: saved for backward is x only,
nothing else of its size. The gradient formula is derived in `kernels/simam.py` (_simam_bwd).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch
from ._common import acc_dtype, flat, like

OP = "simam"
CHECKS = {"triton": _dispatch.triton_reason,
          "cuda": _dispatch.cuda_kernel("simam", "simam_backward"),
          "cpu": _dispatch.cpu_kernel("simam", "simam_backward")}


def _gate_terms(x: Tensor, e_lambda: float):
    """(x, xc, d, r, s) in the accumulation type: the forward's intermediates, recomputed."""
    x = x.to(acc_dtype(x.dtype))
    n = x.shape[2] * x.shape[3]
    xc = x - x.mean(dim=(2, 3), keepdim=True)
    d = xc * xc
    r = 1.0 / (4.0 * (d.sum(dim=(2, 3), keepdim=True) / (n - 1) + e_lambda))
    return x, xc, d, r, torch.sigmoid(d * r + 0.5)


@_dispatch.custom_op("fastattn::simam", mutates_args=())
def _simam(x: Tensor, e_lambda: float, backend: str) -> Tensor:
    if backend == "triton":
        from fastattn.kernels.simam import simam_forward

        return like(simam_forward(flat(x), e_lambda), x)      # a copy only for a copied exotic view
    if backend in ("cpu", "cuda"):           # the C++ kernels: any strides, y like torch.empty_like(x)
        return torch.ops.fastattn_C.simam(x, e_lambda)
    x32, _, _, _, s = _gate_terms(x, e_lambda)
    return like(x32 * s, x)


@_simam.register_fake
def _(x, e_lambda, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastattn::simam_backward", mutates_args=())
def _simam_backward(dy: Tensor, x: Tensor, e_lambda: float, backend: str) -> Tensor:
    if backend == "triton":
        from fastattn.kernels.simam import simam_backward

        return like(simam_backward(flat(dy), flat(x), e_lambda), x)
    if backend in ("cpu", "cuda"):           # statistics recomputed from x; dx like torch.empty_like(x)
        return torch.ops.fastattn_C.simam_backward(dy.to(x.dtype), x, e_lambda)
    # dx = g s + 2 xc (e r + dS) - 2 r A / n,  e = g x s (1 - s),  A = sum(e xc),
    # dS = -4 r^2 sum(e d) / (n - 1)   (derivation: kernels/simam.py, _simam_bwd)
    x32, xc, d, r, s = _gate_terms(x, e_lambda)
    n = x.shape[2] * x.shape[3]
    g = dy.to(x32.dtype)
    e = g * x32 * s * (1.0 - s)
    A = (e * xc).sum(dim=(2, 3), keepdim=True)
    dS = -4.0 * r * r * (e * d).sum(dim=(2, 3), keepdim=True) / (n - 1)
    dx = g * s + 2.0 * xc * (e * r + dS) - 2.0 * r * A / n
    return like(dx, x)


@_simam_backward.register_fake
def _(dy, x, e_lambda, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, e_lambda, backend = inputs
    ctx.save_for_backward(x)
    ctx.e_lambda = e_lambda
    ctx.backend = backend


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.fastattn.simam_backward(dy, x, ctx.e_lambda, ctx.backend), None, None


_simam.register_autograd(_backward, setup_context=_setup_context)


def simam(x: Tensor, e_lambda: float = 1e-4, *, backend: str | None = None) -> Tensor:
    """SimAM (parameter-free attention), fused: (B, C, H, W) -> (B, C, H, W).

    Per (b, c) plane with n = H * W >= 2: mu = mean(x), d = (x - mu)^2, v = sum(d) / (n - 1),
    y = x * sigmoid(d / (4 (v + e_lambda)) + 0.5). x: float, NCHW or channels_last (other
    views: the Triton backend copies them, the C++ kernels walk them with their strides); the
    result has x's dtype and memory format, computed in fp32 (fp64 for fp64 x). e_lambda > 0.
    Backward recomputes the statistics from x (the only tensor saved).
    backend: None (the process default, see fastattn.set_backend), "auto", "triton", "cuda"
    (the CUDA C++ kernels), "cpu" (the OpenMP C++ kernels, CPU tensors), "torch".
    """
    check_args(x, e_lambda)
    return _dispatch.run(_simam, x, float(e_lambda), _dispatch.resolve(OP, x, backend, CHECKS))


def check_args(x: Tensor, e_lambda: float) -> None:
    """simam's argument checks (also those of `fastattn.SimAM`'s CPU training path)."""
    from ..reference._checks import check_feature_map

    check_feature_map(OP, x)
    H, W = x.shape[-2:]
    if H * W < 2:
        raise ValueError(f"{OP}: argument 'x' must have at least 2 spatial positions (H*W >= 2, n = H*W - 1), "
                         f"got H={H}, W={W}")
    if isinstance(e_lambda, bool) or not isinstance(e_lambda, (int, float)) or not 0 < e_lambda < float("inf"):
        raise ValueError(f"{OP}: argument 'e_lambda' must be a positive float, got {e_lambda!r}")
