"""BAM's CPU path: the raw pointwise kernels (torch.ops.fastattn_C.pointwise_reduce_*: a 1x1 conv
C -> O of NCHW fp32 maps with the channel means in the same read, its dx and dweight) against
float64 math, and fastattn.BAM on them (forward, every gradient) against fastattn.reference.BAM."""
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils.prune)

from cases.paths import check_backward_twice, check_training_step, count_calls, random_pair
from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")

# (B, C, H, W, O): planes shorter than a vector, with a partial last vector, longer than dw's
# 512-pixel chunk with B > 1, 1x1; C and O off the register tiles (8 x 3 vectors, 4 x 6 for dw)
SHAPES = [(2, 5, 3, 7, 3), (3, 17, 5, 5, 9), (2, 32, 14, 14, 2), (2, 20, 40, 41, 16), (2, 48, 1, 1, 8),
          (4, 24, 4, 4, 1), (1, 70, 9, 23, 13)]
IDS = ["x".join(map(str, s)) for s in SHAPES]


def _pw():
    import fastattn._C  # noqa: F401  (registers torch.ops.fastattn_C)

    return torch.ops.fastattn_C


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_pointwise_reduce_mean_matches_float64(shape, with_bias):
    B, C, H, W, O = shape
    torch.manual_seed(sum(shape))
    x, w, b = torch.randn(B, C, H, W), torch.randn(O, C, 1, 1), torch.randn(O) if with_bias else None
    z, mean = _pw().pointwise_reduce_mean(x, w, b)
    want = F.conv2d(x.double(), w.double(), None if b is None else b.double())
    assert z.shape == (B, O, H, W) and z.is_contiguous() and mean.shape == (B, C)
    torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-5 * C ** 0.5)
    torch.testing.assert_close(mean.double(), x.double().mean((2, 3)), rtol=1e-6, atol=1e-6)
    z2, _ = _pw().pointwise_reduce_mean(x, w.reshape(O, C), b)          # (O, C) weights alike
    assert torch.equal(z2, z)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("with_g", [True, False], ids=["g", "no_g"])
def test_pointwise_reduce_backward_matches_float64(shape, with_g):
    B, C, H, W, O = shape
    torch.manual_seed(sum(shape) + 1)
    x, w, dz = torch.randn(B, C, H, W), torch.randn(O, C, 1, 1), torch.randn(B, O, H, W)
    g, dmean = (torch.randn(B, C, H, W), torch.randn(B, C)) if with_g else (None, None)
    dx = _pw().pointwise_reduce_dx(dz, w, g, dmean)
    want = torch.einsum("oc,bohw->bchw", w.double()[:, :, 0, 0], dz.double())
    if with_g:
        want = want + g.double() + dmean.double()[:, :, None, None] / (H * W)
    torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-5 * O ** 0.5)
    dw = _pw().pointwise_reduce_dw(dz, x)
    want_dw = torch.einsum("bohw,bchw->oc", dz.double(), x.double())
    assert dw.shape == (O, C)
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-5, atol=1e-5 * (B * H * W) ** 0.5)


def test_pointwise_reduce_errors():
    op = _pw()
    x, w, b = torch.randn(2, 8, 3, 3), torch.randn(4, 8, 1, 1), torch.randn(4)
    with pytest.raises(TypeError, match=r"pointwise_reduce_mean: argument 'x' must be float32, got BFloat16"):
        op.pointwise_reduce_mean(x.bfloat16(), w, b)
    with pytest.raises(ValueError, match=r"pointwise_reduce_mean: argument 'x' must be NCHW-contiguous"):
        op.pointwise_reduce_mean(x.to(memory_format=torch.channels_last), w, b)
    with pytest.raises(ValueError, match=r"argument 'weight' must have shape \(O, C\) or \(O, C, 1, 1\) with C = 8, "
                                         r"got \[4, 8, 3, 3\]"):
        op.pointwise_reduce_mean(x, torch.randn(4, 8, 3, 3), b)
    with pytest.raises(ValueError, match=r"argument 'bias' must have shape \(4\), got \[3\]"):
        op.pointwise_reduce_mean(x, w, b[:3])
    with pytest.raises(ValueError, match=r"argument 'x' must be 4-D, got 3-D"):
        op.pointwise_reduce_mean(x[0], w, b)
    dz = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"pointwise_reduce_dx: argument 'dz' must have 4 channels \(weight's O\), "
                                         r"got 3"):
        op.pointwise_reduce_dx(dz[:, :3].contiguous(), w, None, None)
    with pytest.raises(ValueError, match=r"argument 'g' must have shape \[2, 8, 3, 3\], got \[2, 8, 3, 2\]"):
        op.pointwise_reduce_dx(dz, w, x[..., :2].contiguous(), None)
    with pytest.raises(ValueError, match=r"argument 'dmean' must have shape \(2, 8\), got \[2, 7\]"):
        op.pointwise_reduce_dx(dz, w, None, torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"pointwise_reduce_dw: argument 'dz' must have the batch and spatial sizes"):
        op.pointwise_reduce_dw(dz[:1], x)
    with pytest.raises(TypeError, match=r"pointwise_reduce_dw: argument 'x' must be float32, got Double"):
        op.pointwise_reduce_dw(dz, x.double())


def _pair(channels, **kwargs):
    return random_pair("BAM", torch.float32, channels, reduction=4, **kwargs)


@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
@pytest.mark.parametrize("combine", ["product", "sum"])
@pytest.mark.parametrize("shape", [(3, 16, 9, 11), (2, 24, 14, 14), (2, 40, 1, 5)], ids=["9x11", "14x14", "1x5"])
def test_bam_module_training_matches_reference(monkeypatch, x_grad, combine, shape):
    from fastattn.modules import hybrid

    calls = count_calls(monkeypatch, hybrid._ReduceAndMean, "apply")
    torch.manual_seed(sum(shape))
    r, f = _pair(shape[1], combine=combine, dilation=2)
    assert f.cpu_fused(torch.randn(shape))
    # 1e-3: the bias of the Linear before the channel branch's training-mode BatchNorm1d has a zero
    # gradient in exact math; both fp32 modules give rounding noise of ~2e-4 there
    check_training_step(r, f, torch.randn(shape), 1e-3, x_grad)
    assert calls == [1]


def test_bam_module_inference_matches_reference(monkeypatch):
    from fastattn.modules import hybrid

    calls = count_calls(monkeypatch, hybrid._ReduceAndMean, "apply")
    torch.manual_seed(0)
    r, f = _pair(32)
    r.eval(), f.eval()
    x = torch.randn(3, 32, 13, 14)
    with torch.no_grad():
        want, got = r(x), f(x)
    with torch.inference_mode():
        got_inference = f(x)
    assert f.cpu_fused(x) and calls == []    # without a gradient: the kernel alone, no autograd node
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_inference, got)


def test_bam_module_backward_twice():
    torch.manual_seed(0)
    _, f = _pair(16)
    check_backward_twice(f, torch.randn(2, 16, 5, 7))


def test_bam_module_path_conditions(monkeypatch):
    from fastattn.modules import hybrid

    calls = count_calls(monkeypatch, hybrid._ReduceAndMean, "apply")
    torch.manual_seed(0)
    _, f = _pair(16)
    x = torch.randn(2, 16, 5, 5)
    want = f(x)
    assert calls == [1] and f.cpu_fused(x)
    got = f(x.to(memory_format=torch.channels_last))              # channels_last: the op path
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    f.backend = "torch"
    torch.testing.assert_close(f(x), want, rtol=1e-5, atol=1e-5)
    f.backend = None
    assert not f.cpu_fused(x.double()) and not f.cpu_fused(x.bfloat16())    # fp32 kernels only
    assert not f.double().cpu_fused(x)                                       # fp64 parameters too
    assert calls == [1]


def test_bam_module_with_a_pruned_reduce_conv_takes_the_op_path():
    """Pruning keeps the conv's weight up to date in a forward pre-hook, which the CPU path (reading
    the weight without calling the conv) would skip: a hooked module takes the op path."""
    torch.manual_seed(0)
    r, f = _pair(16)
    for m in (r, f):
        torch.nn.utils.prune.l1_unstructured(m.spatial_att.gate_s[0], "weight", amount=0.5)
    x = torch.randn(2, 16, 5, 5)
    assert not f.cpu_fused(x)
    check_training_step(r, f, x, 1e-4)
    check_training_step(r, f, x, 1e-4)      # a second step: the mask applied again
