"""The CUDA C++ kernels of the pool family (csrc/cuda/pool.cu, bins.cu) and their torch glue
(csrc/bind/pool_cuda.cpp, bins_cuda.cpp), run on the CPU under the emulator of tests/cuda_emu/
(each block's threads as real threads, __syncthreads / __shfl_down_sync through barriers), against
float64 math. This checks what a GPU-less machine can check of the CUDA code: indexing, plane
splits and their merge kernels, the 16-byte vector paths with their scalar heads and tails, shared
memory tables, fallbacks, argument checks. Not races or speed: the gpu-marked tests do that on a GPU.

Opt-in (it JIT-builds an extension, a few minutes): FASTATTN_CUDA_EMU=1 python -m pytest -q
tests/test_pool_cuda_emu.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import CUDA_EMU_MARKS
from test_bins_kernels import CASES, SPP, _bins64, _grad64, _n_bins
from test_pool_kernels import _close, _make, _pool64, _pool_grad64

pytestmark = CUDA_EMU_MARKS

LAYOUTS = ["nchw", "channels_last", "slice", "slice_cl", "permuted"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture
def ops(cuda_emu_ops):
    return cuda_emu_ops


def _torch_pool(x, kinds, eps):
    return torch.ops.fastattn.channel_pool.default(x, list(kinds), eps, "torch")


# ------------------------------------------------------------------------------------------------
# channel_pool
# ------------------------------------------------------------------------------------------------


def _check_pool(ops, shape, dtype, layout, kinds=("mean", "max", "std"), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, layout, "cpu", gen)
    got = ops.channel_pool(x, list(kinds), 1e-5)
    ref = _torch_pool(x, kinds, 1e-5)
    want = _pool64(x, kinds, 1e-5)
    for k, g, r in zip(kinds, got, ref):
        assert g.dtype == dtype and g.shape == shape[:2]
        if k == "max":
            assert torch.equal(g.double(), want["max"]), f"{layout} max"
        else:
            _close(g, want[k], r, dtype, f"{layout} {k}")
    n = len(kinds)
    if "max" in kinds:
        assert torch.equal(got[n], want["argmax"]), f"{layout} argmax"
    if "std" in kinds:                      # the accumulation-dtype copies for the backward
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert got[-2].dtype == acc and got[-1].dtype == acc
        _close(got[-1], want["std"], ref[-1], torch.float32 if acc == torch.float32 else acc, f"{layout} std_acc")
    # backward from these statistics, every subset of gradients
    d = [torch.randn(shape[:2], generator=gen, dtype=torch.float64).to(dtype) for _ in kinds]
    g = dict(zip(kinds, d))
    argmax = got[n] if "max" in kinds else None
    mean, std = (got[-2], got[-1]) if "std" in kinds else (None, None)
    for cl in (False, True):
        dx = ops.channel_pool_backward(g.get("mean"), g.get("max"), g.get("std"), argmax,
                                       x if "std" in kinds else None, mean, std, list(shape), cl)
        assert dx.dtype == dtype and dx.is_contiguous(memory_format=torch.channels_last if cl else
                                                      torch.contiguous_format)
        ref_dx = torch.ops.fastattn.channel_pool_backward.default(
            g.get("mean"), g.get("max"), g.get("std"), argmax, x if "std" in kinds else None, mean, std,
            list(shape), cl, "torch")
        _close(dx, _pool_grad64(x, want, d, kinds), ref_dx, dtype, f"{layout} dx cl={cl}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_pool(ops, dtype, layout):
    _check_pool(ops, (2, 70, 13, 17), dtype, layout)


@pytest.mark.parametrize("shape", [(3, 5, 1, 1), (2, 3, 1, 9), (1, 3, 71, 67), (2, 40, 3, 2), (1, 2, 190, 181)],
                         ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
def test_channel_pool_shapes(ops, shape, layout):
    kinds = ("mean", "max", "std") if shape[2] * shape[3] >= 2 else ("mean", "max")
    _check_pool(ops, shape, torch.float32, layout, kinds)


@pytest.mark.parametrize("kinds", [("mean",), ("max",), ("std",), ("std", "mean"), ("max", "mean")], ids=str)
def test_channel_pool_kinds(ops, kinds):
    _check_pool(ops, (2, 6, 9, 10), torch.float32, "nchw", kinds)
    _check_pool(ops, (2, 6, 9, 10), torch.float32, "channels_last", kinds)


def test_channel_pool_ties_nan_inf_and_offsets(ops):
    B, C, H, W = 2, 3, 60, 70
    x = torch.randn(B, C, H, W, dtype=torch.float64) - 10
    flat = x.view(B, C, H * W)
    for p in (3000, 700, 1700):
        flat[0, 0, p] = 7.0
    flat[0, 1, 4100] = float("nan")
    flat[0, 1, 2000] = float("nan")
    flat[0, 2] = float("-inf")
    x = x.float()
    for xx in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        vmax, argmax = ops.channel_pool(xx, ["max"], 1e-5)
        assert argmax[0].tolist() == [700, 2000, 0]
        assert vmax[0, 0].item() == 7.0 and vmax[0, 1].isnan() and vmax[0, 2].item() == float("-inf")
    off = (torch.randn(2, 3, 50, 60, dtype=torch.float64) + 1e5).float()
    want = _pool64(off, ["std"], 1e-5)
    for xx in (off, off.contiguous(memory_format=torch.channels_last)):
        (std,) = ops.channel_pool(xx, ["std"], 1e-5)[:1]
        torch.testing.assert_close(std.double(), want["std"], rtol=1e-6, atol=0)


def test_channel_mean(ops):
    for layout in ("nchw", "channels_last", "permuted"):
        x = _make((3, 37, 13, 17), torch.float32, layout, "cpu")
        torch.testing.assert_close(ops.channel_mean(x).double(), x.double().mean((2, 3)), rtol=1e-6, atol=1e-7)
    assert torch.isnan(ops.channel_mean(torch.empty(2, 3, 0, 4))).all()


# ------------------------------------------------------------------------------------------------
# dct_pool
# ------------------------------------------------------------------------------------------------


def _check_dct(ops, shape, dtype, layout, wkind="chw", wdtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, layout, "cpu", gen)
    C, H, W = shape[1:]
    wd = wdtype or dtype
    w = torch.randn(C, H, W, generator=gen, dtype=torch.float64).to(wd)
    if wkind == "hwc":
        w = w.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    elif wkind == "strided":
        w = torch.randn(C, H, 2 * W, generator=gen, dtype=torch.float64).to(wd)[:, :, ::2]
    dy = torch.randn(shape[:2], generator=gen, dtype=torch.float64).to(dtype)
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    y = ops.dct_pool(x, w)
    _close(y, torch.einsum("bchw,chw->bc", x64, w64), torch.ops.fastattn.dct_pool.default(x, w, "torch"), dtype,
           f"{layout} y")
    for cl in (False, True):
        for need_dx, with_x in ((True, True), (True, False), (False, True)):
            outs = ops.dct_pool_backward(dy, w, x if with_x else None, list(shape), cl, need_dx)
            ref = torch.ops.fastattn.dct_pool_backward.default(dy, w, x if with_x else None, list(shape), cl, need_dx,
                                                               "torch")
            assert len(outs) == need_dx + with_x
            if need_dx:
                assert outs[0].dtype == dtype
                _close(outs[0], dy64[:, :, None, None] * w64, ref[0], dtype, f"{layout} dx")
            if with_x:
                assert outs[-1].dtype == w.dtype and outs[-1].stride() == torch.empty_like(w).stride()
                _close(outs[-1], torch.einsum("bc,bchw->chw", dy64, x64), ref[-1], w.dtype, f"{layout} dw")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dct_pool(ops, dtype, layout):
    _check_dct(ops, (3, 70, 13, 17), dtype, layout)


@pytest.mark.parametrize("shape", [(3, 6, 1, 1), (40, 2, 5, 5), (2, 3, 50, 47), (2, 24, 7, 7)], ids=str)
@pytest.mark.parametrize("layout,wkind", [("nchw", "chw"), ("channels_last", "hwc"), ("nchw", "strided"),
                                          ("slice_cl", "chw")])
def test_dct_pool_shapes(ops, shape, layout, wkind):
    _check_dct(ops, shape, torch.float32, layout, wkind)


def test_dct_pool_mixed_dtypes(ops):
    _check_dct(ops, (2, 8, 7, 7), torch.bfloat16, "nchw", wdtype=torch.float32)
    _check_dct(ops, (2, 8, 7, 7), torch.float16, "channels_last", wdtype=torch.float32)


def test_dct_pool_empty(ops):
    w = torch.randn(3, 4, 4)
    outs = ops.dct_pool_backward(torch.randn(0, 3), w, torch.randn(0, 3, 4, 4), [0, 3, 4, 4], False, True)
    assert outs[0].shape == (0, 3, 4, 4) and torch.equal(outs[1], torch.zeros_like(w))
    assert ops.dct_pool(torch.randn(2, 3, 0, 4), torch.randn(3, 0, 4)).eq(0).all()


# ------------------------------------------------------------------------------------------------
# bin_mean
# ------------------------------------------------------------------------------------------------


def _check_bins(ops, shape, levels, mode, dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, layout, "cpu", gen)
    y = ops.bin_mean(x, list(levels), mode)
    N = _n_bins(shape, levels, mode)
    assert y.shape == (*shape[:2], N) and y.dtype == dtype and y.is_contiguous()
    _close(y, _bins64(x, levels, mode), torch.ops.fastattn.bin_mean.default(x, list(levels), mode, "torch"), dtype,
           f"{layout} y")
    dy = torch.randn(*shape[:2], N, generator=gen, dtype=torch.float64).to(dtype)
    for cl in (False, True):
        dx = ops.bin_mean_backward(dy, list(shape), list(levels), mode, cl)
        ref = torch.ops.fastattn.bin_mean_backward.default(dy, list(shape), list(levels), mode, cl, "torch")
        assert dx.dtype == dtype and dx.stride() == ref.stride()
        _close(dx, _grad64(dy, shape, levels, mode), ref, dtype, f"{layout} dx cl={cl}")


@pytest.mark.parametrize("shape,levels,mode", CASES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bin_mean_cases(ops, shape, levels, mode, layout):
    _check_bins(ops, shape, levels, mode, torch.float32, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bin_mean_dtypes(ops, dtype, layout):
    _check_bins(ops, (2, 19, 14, 15), SPP, "adaptive", dtype, layout)


# many cells: tiles of 2 (beyond the channels_last shared-memory table: the direct kernels), a
# long plane (row groups taken in batches), wide rows
@pytest.mark.parametrize("shape,levels,mode", [((2, 40, 40, 41), (2,), "tiles"), ((2, 4, 56, 56), (1, 3, 5, 7),
                                                                                     "adaptive"),
                                               ((1, 3, 300, 3), (1, 2, 7), "adaptive"), ((1, 2, 3, 5000), (3,),
                                                                                          "tiles")], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bin_mean_big(ops, shape, levels, mode, layout):
    _check_bins(ops, shape, levels, mode, torch.float32, layout)


def test_raw_op_checks(cuda_emu_build):
    emu = cuda_emu_build
    with pytest.raises(ValueError, match=r"argument 'kinds' .*'min'"):
        emu.channel_pool(torch.randn(2, 3, 4, 4), ["min"], 1e-5)
    with pytest.raises(ValueError, match=r"argument 'weight' must have shape"):
        emu.dct_pool(torch.randn(2, 3, 4, 5), torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match=r"argument 'dy' must have shape \(B, C, N\)"):
        emu.bin_mean_backward(torch.randn(2, 3, 20), [2, 3, 6, 5], [1, 2, 4], "adaptive", False)
