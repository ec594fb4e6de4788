"""The CUDA C++ kernels of the gate, spatial, coord, group, simam and branch families (csrc/cuda/*.cu
and their glue csrc/bind/*_cuda.cpp), run on the CPU under the emulator of tests/cuda_emu/,
against the C++ CPU kernels of the same `fastattn_C` op (same schema, same inputs). The CPU
kernels are the ones tested against float64 math elsewhere (tests/test_*_ops.py); here every
output of the CUDA path must match them: values (to rounding), dtypes, shapes and strides (the
layout the op promises), integer indices exactly. Inputs: the layouts of test_gate_ops (NCHW,
channels_last, channel slices of both, a transposed view, a view with an unaligned base), odd
shapes, all four float dtypes, zeros and exact ties (max(x a, x s) at x = 0 and at a = s), and a
1-SM and a 132-SM device (the launchers' plane splits). The pool family is in
tests/test_pool_cuda_emu.py.

Opt-in (it JIT-builds an extension, a few minutes): FASTATTN_CUDA_EMU=1 python -m pytest -q
tests/test_cuda_emu_ops.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import CUDA_EMU_MARKS
from test_gate_ops import _map


pytestmark = CUDA_EMU_MARKS

LAYOUTS = ["nchw", "channels_last", "slice", "slice_cl", "permuted", "offset"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(2, 5, 7, 9), (1, 37, 5, 3), (3, 64, 4, 8)]   # odd planes, C beyond a warp, vector widths


def every_map(shapes=SHAPES):
    """Parametrize a test over shapes x LAYOUTS x DTYPES."""
    def wrap(test):
        test = pytest.mark.parametrize("shape", shapes, ids=lambda s: "x".join(map(str, s)))(test)
        test = pytest.mark.parametrize("layout", LAYOUTS)(test)
        return pytest.mark.parametrize("dtype", DTYPES, ids=str)(test)
    return wrap


@pytest.fixture
def cuda(cuda_emu_ops):
    return cuda_emu_ops


@pytest.fixture(scope="module")
def cpu():
    import fastattn._C  # noqa: F401  (registers torch.ops.fastattn_C)

    return torch.ops.fastattn_C


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# An fp32 sum over a plane in another order differs in its last bits; a 16-bit output rounded from
# fp32 values that differ in their last bits may differ by one unit in its last place.
_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _same(got, want, what):
    """got (the CUDA path) equals want (the CPU kernel) in dtype, shape, strides and values."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        name = f"{what} output {i}"
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        if g.numel() > 1:
            assert g.stride() == w.stride(), f"{name}: strides {g.stride()} vs the CPU kernel's {w.stride()}"
        if not g.is_floating_point():
            assert torch.equal(g, w), name
            continue
        g64, w64 = g.double(), w.double()
        scale = w64.abs().max().item() if w64.numel() else 0.0
        rtol = _RTOL[g.dtype]
        torch.testing.assert_close(g64, w64, rtol=rtol, atol=rtol * max(scale, 1e-3), equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _both(cuda, cpu, name, *args):
    return getattr(cuda, name)(*args), getattr(cpu, name)(*args)


def _with_zeros(x):
    """x with every third column zero (a ReLU's zeros: ties of max(x a, x s))."""
    x = x.clone()
    x[..., ::3] = 0
    return x


# ------------------------------------------------------------------------------------------------
# gate: channel_scale, channel_spatial_gate, channel_affine_gate
# ------------------------------------------------------------------------------------------------


@every_map()
def test_gate(cuda, cpu, shape, layout, dtype):
    g = torch.Generator().manual_seed(1)
    B, C, H, W = shape
    acc = _acc(dtype)
    x = _with_zeros(_map(shape, dtype, layout, "cpu", g))
    dy = _map(shape, dtype, "nchw", "cpu", g)
    a = torch.randn(B, C, generator=g).to(acc)
    s = torch.randn(B, 1, H, W, generator=g).to(acc)
    s[:, 0, 0, :] = a[:, :1]                     # a = s at channel 0, row 0: ties whatever x is
    r = _map(shape, dtype, layout, "cpu", g)
    for res in (None, r):
        _same(*_both(cuda, cpu, "channel_scale", x, a, res), f"channel_scale res={res is not None}")
    _same(*_both(cuda, cpu, "channel_scale_backward", dy, x, a), "channel_scale_backward")
    for mode in ("max", "add", "bam", "bam_sum"):
        _same(*_both(cuda, cpu, "channel_spatial_gate", x, a, s, mode), f"channel_spatial_gate {mode}")
        _same(*_both(cuda, cpu, "channel_spatial_gate_backward", dy, x, a, s, mode),
              f"channel_spatial_gate_backward {mode}")
    beta = torch.randn(B, C, generator=g).to(acc)
    _same(*_both(cuda, cpu, "channel_affine_gate", x, a, beta), "channel_affine_gate")
    _same(*_both(cuda, cpu, "channel_affine_gate_backward", dy, x, a, beta), "channel_affine_gate_backward")


def test_gate_max_ties_split_as_torch_maximum(cuda):
    """The CUDA max mode against torch.maximum's own gradient: a tie gives each side half."""
    x = torch.tensor([0.0, 2.0, -1.0, 3.0]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    a = torch.tensor([[1.0, 0.5, 2.0]])
    s = torch.tensor([1.0, 0.5, 0.25, 2.0]).view(1, 1, 2, 2)
    x64, a64, s64 = (t.double().requires_grad_() for t in (x, a, s))
    y64 = torch.maximum(x64 * a64[:, :, None, None], x64 * s64)
    dy = torch.randn(1, 3, 2, 2)
    y64.backward(dy.double())
    torch.testing.assert_close(cuda.channel_spatial_gate(x, a, s, "max").double(), y64.detach())
    for got, want in zip(cuda.channel_spatial_gate_backward(dy, x, a, s, "max"), (x64.grad, a64.grad, s64.grad)):
        torch.testing.assert_close(got.double(), want)


# ------------------------------------------------------------------------------------------------
# spatial: spatial_pool (CBAM's channel pool, with a channel gate; Triplet's Z-pools), spatial_scale
# ------------------------------------------------------------------------------------------------


@every_map()
def test_spatial(cuda, cpu, shape, layout, dtype):
    g = torch.Generator().manual_seed(2)
    B, C, H, W = shape
    acc = _acc(dtype)
    x = _with_zeros(_map(shape, dtype, layout, "cpu", g))
    x[:, :, 1, :] = x[:, :1, 1, :]                   # equal maxima across channels: first-max ties
    a = torch.rand(B, C, generator=g).to(acc)
    s = torch.rand(B, 1, H, W, generator=g).to(acc)
    dy = _map(shape, dtype, "nchw", "cpu", g)
    for gate in (None, a):
        got, want = _both(cuda, cpu, "spatial_pool", x, gate, 1)
        _same(got, want, f"spatial_pool a={gate is not None}")
        dp = torch.empty_like(want[0]).copy_(torch.randn(want[0].shape, generator=g))   # in the pool's layout
        _same(*_both(cuda, cpu, "spatial_pool_backward", dp, x, gate, want[1], 1),
              f"spatial_pool_backward a={gate is not None}")
        _same(*_both(cuda, cpu, "spatial_scale", x, gate, s), f"spatial_scale a={gate is not None}")
        _same(*_both(cuda, cpu, "spatial_scale_backward", dy, x, gate, s), f"spatial_scale_backward a={gate is not None}")
    for dim in (2, 3):                               # the Z-pools of TripletAttention's other branches
        got, want = _both(cuda, cpu, "spatial_pool", x, None, dim)
        _same(got, want, f"zpool dim={dim}")
        dp = torch.empty_like(want[0]).copy_(torch.randn(want[0].shape, generator=g))
        _same(*_both(cuda, cpu, "spatial_pool_backward", dp, x, None, want[1], dim), f"zpool_backward dim={dim}")


# ------------------------------------------------------------------------------------------------
# coord: coord_pool, coord_pool_backward, coord_scale, coord_scale_backward
# ------------------------------------------------------------------------------------------------


@every_map()
def test_coord(cuda, cpu, shape, layout, dtype):
    g = torch.Generator().manual_seed(3)
    B, C, H, W = shape
    acc = _acc(dtype)
    x = _map(shape, dtype, layout, "cpu", g)
    _same(*_both(cuda, cpu, "coord_pool", x), "coord_pool")
    dxh = torch.randn(B, C, H, generator=g).to(dtype)
    dxw = torch.randn(B, C, W, generator=g).to(dtype)
    for cl in (False, True):
        _same(*_both(cuda, cpu, "coord_pool_backward", dxh, dxw, cl), f"coord_pool_backward channels_last={cl}")
    a_h = torch.rand(B, C, H, generator=g).to(acc)
    a_w = torch.rand(B, C, W, generator=g).to(acc)
    dy = _map(shape, dtype, "channels_last" if layout == "nchw" else "nchw", "cpu", g)
    _same(*_both(cuda, cpu, "coord_scale", x, a_h, a_w), "coord_scale")
    _same(*_both(cuda, cpu, "coord_scale_backward", dy, x, a_h, a_w), "coord_scale_backward")


# ------------------------------------------------------------------------------------------------
# group: sge_gate (SpatialGroupEnhance), simam
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,groups", [((2, 8, 7, 9), 4), ((1, 6, 5, 3), 3), ((3, 64, 4, 8), 8),
                                          ((2, 5, 3, 3), 5)], ids=["8c4g", "6c3g", "64c8g", "5c5g"])
def test_sge(cuda, cpu, shape, groups, layout, dtype):
    g = torch.Generator().manual_seed(4)
    acc = _acc(dtype)
    x = _map(shape, dtype, layout, "cpu", g)
    x[0, :shape[1] // groups] = 0.5                  # a constant group: zero variance
    w = torch.randn(groups, generator=g).to(acc)
    b = torch.randn(groups, generator=g).to(acc)
    fwd_cuda, fwd_cpu = _both(cuda, cpu, "sge_gate", x, w, b, groups, 1e-5)
    _same(fwd_cuda, fwd_cpu, "sge_gate")
    dy = _map(shape, dtype, "nchw", "cpu", g)
    _same(*_both(cuda, cpu, "sge_gate_backward", dy, x, w, b, *fwd_cpu[1:], groups, 1e-5), "sge_gate_backward")


@every_map(SHAPES + [(2, 3, 1, 2)])
def test_simam(cuda, cpu, shape, layout, dtype):
    g = torch.Generator().manual_seed(5)
    x = _map(shape, dtype, layout, "cpu", g)
    dy = _map(shape, dtype, "nchw", "cpu", g)
    _same(*_both(cuda, cpu, "simam", x, 1e-4), "simam")
    _same(*_both(cuda, cpu, "simam_backward", dy, x, 1e-4), "simam_backward")


# ------------------------------------------------------------------------------------------------
# branch: branch_softmax_sum (Selective Kernel), branch_softmax_scale (PyramidSplitAttention)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stack", ["nchw", "channels_last", "slice"])
@pytest.mark.parametrize("shape,branches", [((2, 5, 7, 9), 2), ((1, 37, 5, 3), 3), ((3, 64, 4, 8), 4)],
                         ids=["5c2k", "37c3k", "64c4k"])
def test_branch(cuda, cpu, shape, branches, stack, dtype):
    g = torch.Generator().manual_seed(6)
    B, C, H, W = shape
    maps = [_map(shape, dtype, "channels_last" if stack == "channels_last" else "nchw", "cpu", g)
            for _ in range(branches)]
    feats = torch.stack(maps, 1)                     # (B, K, C, H, W) as the modules build it
    if stack == "slice":                             # branches 1.. of a wider stack: not dense
        feats = torch.stack([maps[0]] + maps, 1)[:, 1:]
    logits = torch.randn(B, branches, C, generator=g).to(_acc(dtype))
    _same(*_both(cuda, cpu, "branch_softmax_sum", feats, logits), "branch_softmax_sum")
    dy = torch.randn(B, C, H, W, generator=g).to(dtype)
    _same(*_both(cuda, cpu, "branch_softmax_sum_backward", dy, feats, logits), "branch_softmax_sum_backward")
    for reverse in (False, True):
        _same(*_both(cuda, cpu, "branch_softmax_scale", feats, logits, reverse), f"branch_softmax_scale {reverse}")
        dy = torch.randn(B, branches * C, H, W, generator=g).to(dtype)
        _same(*_both(cuda, cpu, "branch_softmax_scale_backward", dy, feats, logits, reverse),
              f"branch_softmax_scale_backward {reverse}")
