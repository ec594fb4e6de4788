"""SRM's CPU training kernels (torch.ops.fastattn_C.srm_train_forward / _backward: the plane
statistics, the style integration, the BatchNorm over the batch and the gate, channel block by
channel block) and fastattn.SRM's use of them."""
import pytest
import torch

import fastattn
from cases.paths import op_names, check_backward_twice, check_steps_take_ops
from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")

OPS = torch.ops.fastattn_C if _ext.available() else None
BN_EPS, STD_EPS = 1e-5, 1e-5


def srm_math(x, cfc, gamma, beta):
    """float64 SRM forward with the BatchNorm on batch statistics, differentiable in x, cfc, gamma,
    beta; and (mean, std, g, zmean, zvar)."""
    flat = x.flatten(2)
    mean = flat.mean(2)
    std = (flat.var(2, unbiased=True) + STD_EPS).sqrt()
    z = mean * cfc[:, 0] + std * cfc[:, 1]
    zvar, zmean = torch.var_mean(z, dim=0, unbiased=False)
    g = torch.sigmoid((z - zmean) / torch.sqrt(zvar + BN_EPS) * gamma + beta)
    return x * g[:, :, None, None], mean, std, g, zmean, zvar


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 20, 7, 9), (2, 33, 1, 5), (5, 16, 13, 1), (4, 64, 3, 3), (3, 3, 300, 300)],
                         ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_float64(dtype, tol, shape):
    """Forward and backward against float64 autograd (3x3x300x300: one channel over the block
    budget). Each plane gets its own scale and offset: with planes of like statistics the
    BatchNorm over the batch divides differences of z far below its eps, and any rounding of the
    statistics shows up whole in the gradients (in the reference's float32 too)."""
    gen = torch.Generator().manual_seed(sum(shape))
    B, C = shape[:2]
    scale = torch.rand(B, C, 1, 1, generator=gen) * 1.5 + 0.5
    x = (torch.randn(shape, generator=gen) * scale + torch.randn(B, C, 1, 1, generator=gen)).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    cfc, gamma, beta = torch.randn(C, 2, generator=gen), torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    y, mean, std, g, zmean, zvar = OPS.srm_train_forward(x, cfc, gamma, beta, BN_EPS, STD_EPS)
    xd, cd, gd, bd = (t.double().requires_grad_() for t in (x, cfc, gamma, beta))
    yd, md, sd, g_d, zmd, zvd = srm_math(xd, cd, gd, bd)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), yd.detach(), rtol=tol, atol=tol)
    for got, want in ((mean, md), (std, sd), (g, g_d), (zmean, zmd), (zvar, zvd)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-4)
    yd.backward(dy.double())
    dx, dcfc, dgamma, dbeta = OPS.srm_train_backward(dy, x, cfc, gamma, BN_EPS, mean, std, g, zmean, zvar, True)
    torch.testing.assert_close(dx.double(), xd.grad, rtol=tol, atol=tol)
    for got, want in ((dcfc, cd.grad), (dgamma, gd.grad), (dbeta, bd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=1e-3)
    dx0, dcfc0, _, _ = OPS.srm_train_backward(dy, x, cfc, gamma, BN_EPS, mean, std, g, zmean, zvar, False)
    assert dx0.numel() == 0
    torch.testing.assert_close(dcfc0, dcfc, rtol=0, atol=0)


def test_errors():
    x = torch.randn(2, 4, 3, 3)
    v, cfc = torch.randn(4), torch.randn(4, 2)
    fwd, bwd = OPS.srm_train_forward, OPS.srm_train_backward
    with pytest.raises(ValueError, match=r"argument 'cfc' must have shape \(4, 2\)"):
        fwd(x, torch.randn(2, 4), v, v, BN_EPS, STD_EPS)
    with pytest.raises(ValueError, match=r"H \* W >= 2"):
        fwd(torch.randn(2, 4, 1, 1), cfc, v, v, BN_EPS, STD_EPS)
    with pytest.raises(TypeError, match=r"argument 'x' must be float32, float16 or bfloat16"):
        fwd(x.double(), cfc, v, v, BN_EPS, STD_EPS)
    y, mean, std, g, zmean, zvar = fwd(x, cfc, v, v, BN_EPS, STD_EPS)
    with pytest.raises(ValueError, match=r"argument 'g' must have shape \(2, 4\)"):
        bwd(x, x, cfc, v, BN_EPS, mean, std, g[:1], zmean, zvar, True)
    with pytest.raises(ValueError, match=r"argument 'dy' must be NCHW-contiguous"):
        bwd(x.to(memory_format=torch.channels_last), x, cfc, v, BN_EPS, mean, std, g, zmean, zvar, True)


def _pair(C, dtype=torch.float32, **bn_kwargs):
    ref, fast = fastattn.reference.SRM(C), fastattn.SRM(C)
    for m in (ref, fast):
        m.bn = torch.nn.BatchNorm2d(C, **bn_kwargs)
    with torch.no_grad():
        ref.cfc.normal_()
        ref.bn.weight.normal_()
        ref.bn.bias.normal_()
    fast.load_state_dict(ref.state_dict())
    return ref.to(dtype), fast.to(dtype)


@pytest.mark.parametrize("bn_kwargs", [{}, {"momentum": None}, {"track_running_stats": False}],
                         ids=["momentum", "cumulative", "no_running_stats"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
@pytest.mark.parametrize("shape", [(4, 24, 7, 9), (3, 16, 1, 13)], ids=["7x9", "1x13"])
def test_module_training_takes_the_kernels(bn_kwargs, x_grad, shape):
    """Two training steps: output, every gradient and the running statistics as the reference's
    (float32; the BatchNorm over a few samples amplifies rounding, hence 1e-3)."""
    torch.manual_seed(0)
    ref, fast = _pair(shape[1], **bn_kwargs)
    check_steps_take_ops(ref, fast, shape, fast.batch_stats_fused,
                         ("fastattn_C::srm_train_forward", "fastattn_C::srm_train_backward"), 1e-3, x_grad=x_grad)


def test_module_conditions():
    """Eval mode, float64, channels_last and a single sample take the other paths; a
    non-contiguous dy and a second backward work."""
    torch.manual_seed(1)
    ref, fast = _pair(16)
    x = torch.randn(3, 16, 5, 5)
    assert not fast.batch_stats_fused(x.to(memory_format=torch.channels_last))
    assert not fast.batch_stats_fused(x[:1])
    fast.eval()
    assert not fast.batch_stats_fused(x)
    fast.train()
    _, fast64 = _pair(16, torch.float64)
    assert not fast64.batch_stats_fused(x.double())
    names = op_names(lambda: check_backward_twice(fast, x))
    assert "fastattn_C::srm_train_backward" in names
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(3, 5, 5, 16).permute(0, 3, 1, 2)
    ref(xr).backward(dy)
    fast(xf).backward(dy)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-3, atol=1e-3)
