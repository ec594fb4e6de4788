"""fastattn::bin_mean: the Triton kernels (under TRITON_INTERPRET=1, on CPU tensors) against the
torch backend, the PyTorch pools and the float64 math, forward and gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastattn.ops.bins import bin_grid, bin_mean

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "channel_slice"]
SPP = (1, 2, 4)                      # SpatialPyramidAttention's pyramid: 21 bins
# (shape, levels, mode, layouts): odd sizes with overlapping adaptive bins (6 x 5, 13 x 17), batch 1,
# C = 70 across BLOCK_C = 64 in channels_last, HW = 1200 across BLOCK_HW in NCHW, clipped border
# tiles (10 x 9 with k = 4), one whole-plane tile (7 x 7 with k = 7), H = 1 and 1 x 1 planes.
CASES = [
    ((2, 5, 6, 5), SPP, "adaptive", LAYOUTS),
    ((1, 3, 13, 17), SPP, "adaptive", LAYOUTS),
    ((2, 70, 3, 5), SPP, "adaptive", LAYOUTS),
    ((1, 2, 40, 30), (1, 3, 6), "adaptive", ["nchw"]),
    ((2, 5, 10, 9), (4,), "tiles", LAYOUTS),
    ((2, 5, 7, 7), (7,), "tiles", LAYOUTS),
    ((2, 70, 7, 7), (3,), "tiles", ["channels_last"]),
    ((2, 3, 1, 6), SPP, "adaptive", LAYOUTS),
    ((2, 3, 1, 6), (4,), "tiles", LAYOUTS),
    ((3, 6, 1, 1), SPP, "adaptive", LAYOUTS),
    ((3, 6, 1, 1), (4,), "tiles", LAYOUTS),
]


def _ids(v):
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    if isinstance(v, list):
        return ""
    return str(v).replace("torch.", "")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":
        # every other channel of a wider tensor: x's values, channel stride 2
        return torch.stack([x, x], 2).flatten(1, 2)[:, ::2]
    return x


def _input(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)


def _close(got, want64, torch_res, name):
    """At most 2x as far from the float64 math as the torch backend's own result in that dtype,
    plus a small atol: one rounding to the dtype (half an ulp of the largest value; a whole ulp
    for bf16, which the interpreter truncates instead of rounding) and 1e-5."""
    if got.numel() == 0:
        return
    half_ulp = (1.0 if got.dtype == torch.bfloat16 else 0.5) * torch.finfo(got.dtype).eps
    got, torch_res = got.double(), torch_res.double()
    err = (got - want64).abs().max().item()
    scale = want64.abs().max().item()
    ref_err = (torch_res - want64).abs().max().item()
    atol = half_ulp * scale + 1e-5 * (1 + scale)
    assert err <= 2 * ref_err + atol, f"{name}: error {err:.3g}, torch backend's {ref_err:.3g}, atol {atol:.3g}"


def _pools64(x64, levels, mode):
    """The PyTorch pools, float64, concatenated: the definition bin_mean must match."""
    B, C = x64.shape[:2]
    if mode == "adaptive":
        return torch.cat([F.adaptive_avg_pool2d(x64, n).reshape(B, C, -1) for n in levels], 2)
    (k,) = levels
    return F.avg_pool2d(x64, k, k, ceil_mode=True).reshape(B, C, -1)


def _run(x, levels, mode, dy, backend):
    x = x.detach().requires_grad_(True)
    y = bin_mean(x, levels, mode=mode, backend=backend)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


def _check(x, levels, mode):
    B, C, H, W = x.shape
    N = sum(nh * nw for nh, nw in bin_grid(H, W, levels, mode))
    dy = torch.randn(B, C, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(x.dtype)
    y, dx = _run(x, levels, mode, dy, "triton")
    y_t, dx_t = _run(x, levels, mode, dy, "torch")
    x64 = x.detach().double().requires_grad_(True)
    y64 = _pools64(x64, levels, mode)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert y.dtype == x.dtype and y.shape == (B, C, N) and y.is_contiguous()
    assert dx.dtype == x.dtype and dx.shape == x.shape
    _close(y, y64, y_t, "y")
    _close(dx, dx64, dx_t, "dx")
    return dx


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape,levels,mode,layouts", CASES, ids=_ids)
def test_bin_mean(shape, levels, mode, layouts, dtype):
    for layout in layouts:
        dx = _check(_input(shape, dtype, layout), levels, mode)
        if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
            assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bin_mean_many_bins(layout):
    """221 bins (k = 1 tiles of 13 x 17): the tiles shrink to keep the masked product in budget;
    overlapping adaptive grids larger than the plane (n = 5, 9 on 3 x 7)."""
    _check(_input((1, 3, 13, 17), torch.float32, layout), (1,), "tiles")
    _check(_input((2, 5, 3, 7), torch.float32, layout), (5, 9, 1), "adaptive")


def test_bin_mean_is_deterministic():
    """Planes split over several programs (batch 1, few channels): bitwise the same on every run."""
    x = _input((1, 2, 40, 30), torch.float32, "nchw")
    runs = [bin_mean(x, SPP, mode="adaptive", backend="triton") for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_bin_mean_gradcheck_fp64():
    for levels, mode in [(SPP, "adaptive"), ((2,), "tiles")]:
        x = torch.randn(1, 3, 3, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: bin_mean(t, levels, mode=mode, backend="triton"), (x,))


def test_bin_mean_empty_batch():
    for layout in ["nchw", "channels_last"]:
        for shape in [(0, 4, 5, 5), (2, 0, 5, 5)]:
            x = _layout(torch.randn(shape), layout).requires_grad_(True)
            y = bin_mean(x, SPP, mode="adaptive", backend="triton")
            assert y.shape == (*shape[:2], 21)
            y.sum().backward()
            assert x.grad.shape == x.shape


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_triton(layout):
    x = _input((2, 3, 6, 5), torch.float32, layout).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastattn.bin_mean.default, (x, list(SPP), "adaptive", "triton"))
    torch.library.opcheck(torch.ops.fastattn.bin_mean.default, (x, [4], "tiles", "triton"))
    cl = layout == "channels_last"
    torch.library.opcheck(torch.ops.fastattn.bin_mean_backward.default,
                          (torch.randn(2, 3, 21), [2, 3, 6, 5], list(SPP), "adaptive", cl, "triton"))
    torch.library.opcheck(torch.ops.fastattn.bin_mean_backward.default,
                          (torch.randn(2, 3, 4), [2, 3, 6, 5], [4], "tiles", cl, "triton"))
