"""TiledSqueezeExcite's CPU path: the raw tile kernels (torch.ops.fastattn_C.tile_mean,
tile_scale, tile_dot, tile_scale_backward_dx) against float64 math, and
fastattn.TiledSqueezeExcite on them (forward, every gradient, the BatchNorm statistics) against
fastattn.reference.TiledSqueezeExcite."""
import sys

import pytest
import torch
import torch.nn.functional as F

from cases.paths import check_backward_twice, check_training_step, count_calls, random_pair
from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")

DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]
# (shape, k): whole tiles, clipped border tiles, one tile larger than the map, k = 1, rows of 1,
# the widest narrow rows (16) with clipped tiles both ways, wide rows
SHAPES = [((2, 3, 14, 14), 7), ((2, 5, 9, 11), 4), ((1, 3, 5, 3), 7), ((2, 2, 6, 5), 1), ((3, 2, 1, 17), 3),
          ((2, 3, 10, 16), 3), ((1, 2, 33, 40), 7)]
SHAPE_IDS = ["14x14k7", "9x11k4", "5x3k7", "6x5k1", "1x17k3", "10x16k3", "33x40k7"]


def widen64(t, k, h, w):
    """(B, C, nh, nw) -> (B, C, H, W): each tile's value over its positions."""
    return t.repeat_interleave(k, dim=2)[:, :, :h].repeat_interleave(k, dim=3)[:, :, :, :w]


def tile_sum64(t, k):
    """(B, C, H, W) -> (B, C, nh, nw) sums over the clipped tiles, in float64."""
    ones = torch.ones_like(t)
    return (F.avg_pool2d(t, k, k, ceil_mode=True) / F.avg_pool2d(ones, k, k, ceil_mode=True)
            * F.avg_pool2d(ones, k, k, ceil_mode=True, divisor_override=1))


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,k", SHAPES, ids=SHAPE_IDS)
def test_tile_kernels_match_float64(dtype, tol, shape, k):
    torch.manual_seed(sum(shape) + k)
    op = torch.ops.fastattn_C
    b, c, h, w = shape
    nh, nw = -(-h // k), -(-w // k)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, dy = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    g, a = torch.rand(b, c, nh, nw, dtype=acc), torch.randn(b, c, nh, nw, dtype=acc)
    x64, dy64, g64, a64 = x.double(), dy.double(), g.double(), a.double()

    mean = op.tile_mean(x, k)
    assert mean.dtype == dtype and mean.shape == (b, c, nh, nw)
    torch.testing.assert_close(mean.double(), F.avg_pool2d(x64, k, k, ceil_mode=True), rtol=tol, atol=tol)
    y = op.tile_scale(x, g, k)
    assert y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y.double(), x64 * widen64(g64, k, h, w), rtol=tol, atol=tol)
    dg = op.tile_dot(dy, x, k)
    assert dg.dtype == acc
    sum_tol = max(tol, 1e-5) * k                  # fp32 sums of up to k * k products
    torch.testing.assert_close(dg.double(), tile_sum64(dy64 * x64, k), rtol=sum_tol, atol=sum_tol)
    dx = op.tile_scale_backward_dx(dy, g, a, k)
    assert dx.dtype == dtype and dx.is_contiguous()
    torch.testing.assert_close(dx.double(), dy64 * widen64(g64, k, h, w) + widen64(a64, k, h, w), rtol=tol,
                               atol=tol)


def test_tile_kernel_errors():
    op = torch.ops.fastattn_C
    x = torch.randn(2, 3, 5, 6)
    g = torch.rand(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"tile_scale: argument 'k' must be a positive int, got 0"):
        op.tile_scale(x, g, 0)
    with pytest.raises(ValueError, match=r"tile_scale: argument 'g' must have shape \(B, C, ceil\(H / k\), "
                                         r"ceil\(W / k\)\) = \[2, 3, 2, 2\], got \[2, 3, 1, 2\]"):
        op.tile_scale(x, g[:, :, :1], 3)
    with pytest.raises(TypeError, match=r"tile_scale: argument 'g' must be Float for 'x' of dtype Float, got Double"):
        op.tile_scale(x, g.double(), 3)
    with pytest.raises(ValueError, match=r"tile_mean: argument 'x' must be NCHW-contiguous"):
        op.tile_mean(x.to(memory_format=torch.channels_last), 3)
    with pytest.raises(ValueError, match=r"tile_dot: argument 'dy' must have the shape of 'x'"):
        op.tile_dot(x[:1], x, 3)
    with pytest.raises(ValueError, match=r"tile_dot: argument 'dy' must be NCHW-contiguous"):
        op.tile_dot(x.transpose(2, 3).contiguous().transpose(2, 3), x, 3)
    with pytest.raises(ValueError, match=r"tile_scale_backward_dx: argument 'a' must have shape"):
        op.tile_scale_backward_dx(x, g, g[:1], 3)
    with pytest.raises(ValueError, match=r"tile_scale_backward_dx: argument 'dy' must be NCHW-contiguous"):
        op.tile_scale_backward_dx(x.to(memory_format=torch.channels_last), g, g, 3)
    with pytest.raises(ValueError, match=r"tile_mean: argument 'x' must be 4-D \(B, C, H, W\), got 3-D"):
        op.tile_mean(x[0], 3)


def _count(monkeypatch):
    from fastattn.modules import channel

    return count_calls(monkeypatch, channel._BinGateCPU, "apply")


def _pair(dtype, channels, k):
    return random_pair("TiledSqueezeExcite", dtype, channels, reduction=4, pool_kernel=k)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
@pytest.mark.parametrize("shape,k", [((3, 16, 14, 14), 7), ((2, 8, 9, 11), 4), ((2, 8, 5, 3), 7)],
                         ids=["14x14k7", "9x11k4", "one_tile"])
def test_tiled_se_module_training_matches_reference(monkeypatch, dtype, tol, x_grad, shape, k):
    calls = _count(monkeypatch)
    torch.manual_seed(sum(shape))
    r, f = _pair(dtype, shape[1], k)
    check_training_step(r, f, torch.randn(shape, dtype=dtype), tol, x_grad)     # BatchNorm statistics too
    assert calls == [1]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)],
                         ids=["fp32", "bf16", "fp16"])
def test_tiled_se_module_inference_matches_reference(monkeypatch, dtype, tol):
    calls = _count(monkeypatch)
    torch.manual_seed(0)
    r, f = _pair(torch.float32, 32, 7)
    r.eval(), f.eval()
    x = torch.randn(3, 32, 15, 13).to(dtype)
    with torch.no_grad():
        want = r.to(dtype)(x)
        got = f.to(dtype)(x)
    with torch.inference_mode():
        got_inference = f(x)
    assert not calls                                                # inference needs no autograd function
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(got_inference, got)


def test_tiled_se_module_backward_twice_and_path_conditions(monkeypatch):
    calls = _count(monkeypatch)
    torch.manual_seed(0)
    _, f = _pair(torch.float32, 16, 4)
    x = torch.randn(2, 16, 9, 10)
    check_backward_twice(f, x)
    assert calls == [1]
    f.eval()
    with torch.no_grad():
        want = f(x)
        got = f(x.to(memory_format=torch.channels_last))            # channels_last: the op path
        f.backend = "torch"
        torch.testing.assert_close(f(x), want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want)
    assert calls == [1]
    f.backend = None
    assert f.cpu_fused(x) and not f.cpu_fused(x.to(memory_format=torch.channels_last))


def _at_end_of_mapping(shape):
    """A float32 tensor of `shape` whose last element is the last one before an inaccessible page
    (Linux): a kernel reading past the tensor's end faults instead of passing unnoticed."""
    import ctypes
    import mmap

    import numpy as np

    page = mmap.PAGESIZE
    nbytes = 4 * int(np.prod(shape))
    data_pages = -(-nbytes // page)
    buf = mmap.mmap(-1, (data_pages + 1) * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mprotect(ctypes.c_void_p(base + data_pages * page), page, 0) != 0:     # PROT_NONE
        pytest.skip("mprotect failed")
    arr = np.frombuffer(buf, dtype=np.float32, count=nbytes // 4, offset=data_pages * page - nbytes).reshape(shape)
    return torch.from_numpy(arr), buf


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard page via mprotect")
@pytest.mark.parametrize("shape,k", [((2, 3, 4, 3), 2), ((1, 2, 7, 5), 7), ((2, 2, 14, 14), 7), ((1, 1, 2, 7), 3)],
                         ids=["w3", "w5", "w14", "w7"])
def test_tile_sums_read_nothing_past_the_tensor(shape, k):
    """The narrow-row sums read 16 lanes from each row start: rows near the tensor's end must go
    through the padded copy (x and dy end right before a PROT_NONE page here)."""
    x, keep_x = _at_end_of_mapping(shape)
    dy, keep_dy = _at_end_of_mapping(shape)
    x.copy_(torch.randn(shape))
    dy.copy_(torch.randn(shape))
    x64, dy64 = x.double(), dy.double()
    torch.testing.assert_close(torch.ops.fastattn_C.tile_mean(x, k).double(), F.avg_pool2d(x64, k, k, ceil_mode=True),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.ops.fastattn_C.tile_dot(dy, x, k).double(), tile_sum64(dy64 * x64, k),
                               rtol=1e-4, atol=1e-4)
    del x, dy, keep_x, keep_dy
