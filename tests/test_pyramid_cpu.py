"""SpatialPyramidAttention's CPU path: the raw kernels torch.ops.fastattn_C.pyramid_mean (the pooled
vector in one read) and pyramid_scale_backward_dx (dx = dy * g + the pooled vector's gradient)
against float64 math, the narrow-row kernels reading nothing past the tensor, and
fastattn.SpatialPyramidAttention on them (forward, every gradient) against
fastattn.reference.SpatialPyramidAttention."""
import sys

import pytest
import torch
import torch.nn.functional as F

from cases.paths import (check_backward_twice, check_same_step_channels_last, check_training_step,
                         check_training_step_16bit, count_calls, op_names, random_pair)
from fastattn import _ext
from test_bins_kernels import _grad64
from test_pool_kernels import LAYOUTS, _make
from test_tiles_cpu import _at_end_of_mapping

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")

SPP = (1, 2, 4)
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]
# narrow rows (W <= 16: one 16-lane step per row) of 14, 15, 16, 3 and 1, the last rows of a plane
# shorter than 16 lanes, a narrow plane of more than 4096 elements (the double-folded path); wide
# rows of 17 and 56; other pyramids (overlapping bins, one level)
SHAPES = [((2, 5, 14, 14), SPP), ((3, 4, 14, 15), SPP), ((2, 3, 3, 16), SPP), ((2, 3, 5, 3), SPP), ((2, 2, 9, 1), SPP),
          ((1, 3, 1, 7), SPP), ((1, 2, 300, 16), SPP), ((2, 3, 6, 17), SPP), ((1, 2, 56, 56), SPP),
          ((2, 3, 13, 11), (1, 3, 6)), ((2, 3, 10, 9), (3,))]
SHAPE_IDS = ["14x14", "14x15", "3x16", "5x3", "9x1", "1x7", "300x16", "6x17", "56x56", "13x11L136", "10x9L3"]


def pooled64(x, levels):
    """The reference's pooled vector in float64: each level's adaptive means flattened, concatenated."""
    return torch.cat([F.adaptive_avg_pool2d(x.double(), n).flatten(1) for n in levels], 1)


def pooled_to_bins(dp, channels, levels):
    """(B, C * sum n^2) pooled layout -> (B, C, N) bins (level after level, each row-major)."""
    parts, at = [], 0
    for n in levels:
        parts.append(dp[:, at:at + channels * n * n].reshape(dp.shape[0], channels, n * n))
        at += channels * n * n
    return torch.cat(parts, 2)


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,levels", SHAPES, ids=SHAPE_IDS)
def test_pyramid_kernels_match_float64(dtype, tol, shape, levels):
    torch.manual_seed(sum(shape))
    b, c, h, w = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, dy = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    pooled = torch.ops.fastattn_C.pyramid_mean(x, list(levels))
    assert pooled.dtype == dtype and pooled.shape == (b, c * sum(n * n for n in levels))
    torch.testing.assert_close(pooled.double(), pooled64(x, levels), rtol=tol, atol=tol)
    g, dp = torch.rand(b, c, dtype=acc), torch.randn(pooled.shape, dtype=acc)
    dx = torch.ops.fastattn_C.pyramid_scale_backward_dx(dy, g, dp, list(levels))
    assert dx.dtype == dtype and dx.shape == shape and dx.is_contiguous()
    want = dy.double() * g.double()[:, :, None, None] + _grad64(pooled_to_bins(dp, c, levels), shape, levels,
                                                                "adaptive")
    torch.testing.assert_close(dx.double(), want, rtol=tol, atol=tol)
    # the gradient alone (bin_mean_backward) takes the same narrow / wide paths
    dbins = pooled_to_bins(dp, c, levels).contiguous()
    alone = torch.ops.fastattn_C.bin_mean_backward(dbins, list(shape), list(levels), "adaptive", False)
    torch.testing.assert_close(alone.double(), _grad64(dbins, shape, levels, "adaptive"), rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 19, 14, 15), (2, 3, 20, 23)], ids=["14x15", "20x23"])
def test_pyramid_mean_layouts(layout, shape):
    """Every forward path (narrow and wide NCHW planes, channels_last, any strides) writes the pooled layout."""
    x = _make(shape, torch.float32, layout, "cpu", torch.Generator().manual_seed(1))
    got = torch.ops.fastattn_C.pyramid_mean(x, list(SPP))
    torch.testing.assert_close(got.double(), pooled64(x, SPP), rtol=1e-5, atol=1e-5)


def test_pyramid_scale_backward_dx_keeps_infinities_in_their_bins():
    """A bin's infinite gradient reaches its own positions only (no 0 * inf elsewhere)."""
    dp = torch.zeros(1, 21)
    dp[0, 20] = float("inf")             # the last 4 x 4 bin: rows and columns 10..13 of 14
    dx = torch.ops.fastattn_C.pyramid_scale_backward_dx(torch.ones(1, 1, 14, 14), torch.ones(1, 1), dp, list(SPP))
    inf = torch.zeros(14, 14, dtype=torch.bool)
    inf[10:, 10:] = True
    assert torch.equal(torch.isinf(dx[0, 0]), inf) and torch.isfinite(dx[0, 0][~inf]).all()


def test_pyramid_kernel_errors():
    op = torch.ops.fastattn_C
    dy = torch.randn(2, 3, 5, 6)
    g, dp = torch.rand(2, 3), torch.randn(2, 63)
    with pytest.raises(ValueError,
                       match=r"pyramid_scale_backward_dx: argument 'dy' must be 4-D \(B, C, H, W\), got 3-D"):
        op.pyramid_scale_backward_dx(dy[0], g, dp, [1, 2, 4])
    with pytest.raises(ValueError, match=r"pyramid_scale_backward_dx: argument 'dy' must be NCHW-contiguous"):
        op.pyramid_scale_backward_dx(dy.to(memory_format=torch.channels_last), g, dp, [1, 2, 4])
    with pytest.raises(ValueError, match=r"argument 'g' must have shape \[2, 3\], got \[2, 2\]"):
        op.pyramid_scale_backward_dx(dy, g[:, :2], dp, [1, 2, 4])
    with pytest.raises(ValueError, match=r"argument 'dpooled' must have shape \[2, 63\], got \[2, 21\]"):
        op.pyramid_scale_backward_dx(dy, g, dp[:, :21], [1, 2, 4])
    with pytest.raises(TypeError, match=r"argument 'dpooled' must be Float for 'dy' of dtype Float, got Double"):
        op.pyramid_scale_backward_dx(dy, g, dp.double(), [1, 2, 4])
    with pytest.raises(ValueError, match=r"argument 'g' must be a contiguous CPU tensor"):
        op.pyramid_scale_backward_dx(dy, torch.rand(3, 2).t(), dp, [1, 2, 4])
    with pytest.raises(ValueError, match=r"argument 'dy' must have H >= 1 and W >= 1"):
        op.pyramid_scale_backward_dx(torch.randn(2, 3, 0, 6), g, dp, [1, 2, 4])
    with pytest.raises(ValueError, match=r"pyramid_mean: argument 'levels' must hold positive sizes"):
        op.pyramid_mean(dy, [1, 0])
    with pytest.raises(ValueError, match=r"pyramid_mean: argument 'x' must be 4-D"):
        op.pyramid_mean(dy[0], [1, 2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard page via mprotect")
@pytest.mark.parametrize("shape", [(2, 3, 4, 3), (1, 2, 7, 5), (2, 2, 14, 14), (1, 1, 2, 16), (2, 1, 3, 1)],
                         ids=["w3", "w5", "w14", "w16", "w1"])
def test_narrow_kernels_read_nothing_past_the_tensor(shape):
    """The narrow-row kernels read 16 lanes from each row start: the plane's last rows must load only
    what is left of it (x ends right before a PROT_NONE page here)."""
    x, keep_x = _at_end_of_mapping(shape)
    x.copy_(torch.randn(shape))
    got = torch.ops.fastattn_C.pyramid_mean(x, list(SPP))
    torch.testing.assert_close(got.double(), pooled64(x, SPP), rtol=1e-5, atol=1e-5)
    g, dp = torch.rand(shape[:2]), torch.randn(got.shape)
    dx = torch.ops.fastattn_C.pyramid_scale_backward_dx(x, g, dp, list(SPP))
    want = x.double() * g.double()[:, :, None, None] + _grad64(pooled_to_bins(dp, shape[1], SPP), shape, SPP,
                                                               "adaptive")
    torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-5)
    del x, keep_x


def _count(monkeypatch):
    from fastattn.modules import channel

    return count_calls(monkeypatch, channel._BinGateCPU, "apply")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
@pytest.mark.parametrize("shape", [(3, 16, 14, 14), (2, 16, 9, 11), (2, 16, 3, 20)], ids=["14x14", "9x11", "3x20"])
def test_spa_module_training_matches_reference(monkeypatch, dtype, tol, x_grad, shape):
    calls = _count(monkeypatch)
    torch.manual_seed(sum(shape))
    r, f = random_pair("SpatialPyramidAttention", dtype, shape[1], reduction=4)
    x = torch.randn(shape, dtype=dtype)
    assert f.cpu_fused(x)
    check_training_step(r, f, x, tol, x_grad)
    assert calls == [1]
    xf = x.clone().requires_grad_(x_grad)
    names = op_names(lambda: f(xf).sum().backward())                  # the fast module's ops alone
    assert ("fastattn_C::pyramid_scale_backward_dx" in names) == x_grad, names
    assert not {"fastattn_C::bin_mean_backward", "aten::cat"} & names, names


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
def test_spa_module_training_16bit(monkeypatch, dtype, tol):
    """16-bit maps: the fused path against the reference run in float32 on the same rounded inputs."""
    calls = _count(monkeypatch)
    torch.manual_seed(0)
    r, f = random_pair("SpatialPyramidAttention", torch.float32, 32, reduction=4)
    check_training_step_16bit(r, f.to(dtype), torch.randn(2, 32, 14, 14).to(dtype), tol)
    assert calls == [1]


def test_spa_module_backward_twice_and_path_conditions(monkeypatch):
    calls = _count(monkeypatch)
    torch.manual_seed(0)
    _, f = random_pair("SpatialPyramidAttention", torch.float32, 16, reduction=4)
    x = torch.randn(2, 16, 9, 10)
    check_backward_twice(f, x)
    assert calls == [1]
    assert not f.cpu_fused(x.to(memory_format=torch.channels_last))                  # the op path
    with torch.no_grad():
        names = op_names(lambda: f(x))
        assert "fastattn_C::pyramid_mean" in names and "aten::cat" not in names, names
        want = f(x)
        f.backend = "torch"
        assert not f.cpu_fused(x)
        torch.testing.assert_close(f(x), want)
    assert calls == [1]
    f.backend = None
    check_same_step_channels_last(f, x)
    assert calls == [1, 1]


def test_narrow_backward_many_bins():
    """bin_mean_backward on a tall narrow plane cut into 1 x 1 tiles (60000 bins, 20000 row
    ranges): the narrow path's bin tables are built in O(N log N) (the first version scanned the
    ranges for every bin and every row group: about 1.6e9 comparisons here), and each position's
    gradient is its own bin's."""
    dy = torch.randn(1, 2, 20000 * 3)
    dx = torch.ops.fastattn_C.bin_mean_backward(dy, [1, 2, 20000, 3], [1], "tiles", False)
    assert torch.equal(dx, dy.view(1, 2, 20000, 3))
