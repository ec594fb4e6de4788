"""NAM's CPU training kernels (torch.ops.fastattn_C.nam_train_forward / _backward: the batch
statistics, the gate and its backward channel block by channel block) and fastattn.NAM's use of them."""
import pytest
import torch

import fastattn
from cases.paths import op_names, check_backward_twice, check_steps_take_ops
from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")

OPS = torch.ops.fastattn_C if _ext.available() else None
EPS = 1e-5


def nam_math(x, gamma, bias, w):
    """float64 y = x * sigmoid(w * batchnorm(x)) with the batch statistics, differentiable in x,
    gamma and bias (w a constant, as NAM detaches it); and the statistics."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    z = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + EPS) * gamma[:, None, None] + bias[:, None, None]
    return x * torch.sigmoid(z * w[:, None, None]), mean, var


def random_args(shape, dtype, gen):
    C = shape[1]
    x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype)
    gamma, bias = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    w = gamma.abs() / gamma.abs().sum()
    return x, gamma, bias, w


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 20, 7, 9), (2, 33, 1, 5), (5, 16, 13, 1), (1, 8, 1, 2), (4, 64, 3, 3),
                                   (2, 40, 70, 3), (2, 3, 300, 300)], ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_float64(dtype, tol, shape):
    """Forward and backward against float64 autograd; 2x3x300x300: one channel's planes (720 KB)
    over the block budget, so the dx pass recomputes the gate instead of keeping it."""
    gen = torch.Generator().manual_seed(sum(shape))
    x, gamma, bias, w = random_args(shape, dtype, gen)
    dy = torch.randn(shape, generator=gen).to(dtype)
    y, mean, var = OPS.nam_train_forward(x, gamma, bias, w, EPS)
    xd, gd, bd = (t.double().requires_grad_() for t in (x, gamma, bias))
    yd, md, vd = nam_math(xd, gd, bd, w.double())
    assert y.dtype == dtype and y.shape == x.shape and mean.shape == var.shape == (shape[1],)
    torch.testing.assert_close(y.double(), yd.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(mean.double(), md.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), vd.detach(), rtol=1e-5, atol=1e-5)
    yd.backward(dy.double())
    dx, dgamma, dbias = OPS.nam_train_backward(dy, x, gamma, bias, w, EPS, mean, var, True)
    torch.testing.assert_close(dx.double(), xd.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(dgamma.double(), gd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dbias.double(), bd.grad, rtol=1e-4, atol=1e-4)
    dx0, dgamma0, dbias0 = OPS.nam_train_backward(dy, x, gamma, bias, w, EPS, mean, var, False)
    assert dx0.numel() == 0
    torch.testing.assert_close(dgamma0, dgamma, rtol=0, atol=0)
    torch.testing.assert_close(dbias0, dbias, rtol=0, atol=0)


def test_errors():
    x = torch.randn(2, 4, 3, 3)
    v = torch.randn(4)
    fwd, bwd = OPS.nam_train_forward, OPS.nam_train_backward
    with pytest.raises(ValueError, match=r"argument 'gamma' must have shape \(C\) = \(4\), got \[3\]"):
        fwd(x, torch.randn(3), v, v, EPS)
    with pytest.raises(TypeError, match=r"argument 'w' must be float32, got Double"):
        fwd(x, v, v, v.double(), EPS)
    with pytest.raises(TypeError, match=r"argument 'x' must be float32, float16 or bfloat16"):
        fwd(x.double(), v, v, v, EPS)
    with pytest.raises(ValueError, match=r"argument 'x' must be NCHW-contiguous"):
        fwd(x.to(memory_format=torch.channels_last), v, v, v, EPS)
    with pytest.raises(ValueError, match=r"B \* H \* W >= 1"):
        fwd(torch.randn(0, 4, 3, 3), v, v, v, EPS)
    y, mean, var = fwd(x, v, v, v, EPS)
    with pytest.raises(ValueError, match=r"argument 'dy' must have the shape of 'x'"):
        bwd(torch.randn(2, 4, 3, 2), x, v, v, v, EPS, mean, var, True)
    with pytest.raises(ValueError, match=r"argument 'var' must have shape \(C\)"):
        bwd(x, x, v, v, v, EPS, mean, var[:2], True)


def _pair(C, dtype=torch.float32, **bn_kwargs):
    ref, fast = fastattn.reference.NAM(C), fastattn.NAM(C)
    for m in (ref, fast):
        m.bn2 = torch.nn.BatchNorm2d(C, **bn_kwargs)
    with torch.no_grad():
        ref.bn2.weight.normal_()
        ref.bn2.bias.normal_()
    fast.load_state_dict(ref.state_dict())
    return ref.to(dtype), fast.to(dtype)


@pytest.mark.parametrize("bn_kwargs", [{}, {"momentum": None}, {"track_running_stats": False}],
                         ids=["momentum", "cumulative", "no_running_stats"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
@pytest.mark.parametrize("shape", [(4, 24, 7, 9), (3, 16, 1, 13)], ids=["7x9", "1x13"])
def test_module_training_takes_the_kernels(bn_kwargs, x_grad, shape):
    """Two training steps: output, every gradient and the running statistics as the reference's."""
    torch.manual_seed(0)
    ref, fast = _pair(shape[1], **bn_kwargs)
    check_steps_take_ops(ref, fast, shape, fast.train_fused,
                         ("fastattn_C::nam_train_forward", "fastattn_C::nam_train_backward"), 1e-4, x_grad=x_grad)


def test_module_conditions():
    """Eval mode with running statistics, float64, channels_last and a single value per channel
    take the op path; a non-contiguous dy and a second backward work."""
    torch.manual_seed(1)
    ref, fast = _pair(16)
    x = torch.randn(3, 16, 5, 5)
    assert not fast.train_fused(x.to(memory_format=torch.channels_last))
    assert not fast.train_fused(torch.randn(1, 16, 1, 1))
    fast.eval()
    assert not fast.train_fused(x)
    fast.train()
    _, fast64 = _pair(16, torch.float64)
    assert not fast64.train_fused(x.double())
    names = op_names(lambda: check_backward_twice(fast, x))
    assert "fastattn_C::nam_train_backward" in names
    ref.train(), fast.train()
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(3, 5, 5, 16).permute(0, 3, 1, 2)
    ref(xr).backward(dy)
    fast(xf).backward(dy)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-4)
