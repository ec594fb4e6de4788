"""scSE's CPU training kernels (fastattn_C::scse_train_forward / scse_train_backward, csrc/cpu/se.cpp)
and the module path that runs them (fastattn.SCSE in training, `_SCSETrain`), against float64 autograd
of the reference math. Inputs include a ReLU's zeros and a = s ties, where torch.maximum splits the
gradient."""
import math

import pytest
import torch

import fastattn
from fastattn import _ext
from cases.paths import check_backward_twice, op_names

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")

OPS = ("fastattn_C::scse_train_forward", "fastattn_C::scse_train_backward")


def _weights(C, g):
    hidden = max(1, C // 2)
    return (torch.randn(hidden, C, generator=g) / C ** 0.5, torch.randn(hidden, generator=g),
            torch.randn(C, hidden, generator=g) / hidden ** 0.5, torch.randn(C, generator=g),
            torch.randn(C, generator=g) / C ** 0.5)


def _math64(x, dy, w1, b1, w2, b2, conv_w, conv_b, combine, gates=None):
    """(y, dx, d mean-gate g, dconv_w, dconv_b) in float64 autograd; dg is the gradient of the cSE
    gate g (after its sigmoid), as the kernel returns it. gates: the kernel's float32 (g, s), to
    take max's side (and its ties) as the kernel does, in float32 (an fp32 tie, g = s to the last
    bit, is not one in float64, and the gradient's split there is not a rounding-level change)."""
    x64 = x.double().requires_grad_()
    cw = conv_w.double().requires_grad_()
    cb = torch.tensor(conv_b, dtype=torch.float64, requires_grad=True)
    g = torch.sigmoid(torch.relu(x64.mean((2, 3)) @ w1.double().t() + b1.double()) @ w2.double().t() + b2.double())
    g.retain_grad()
    s = torch.sigmoid((x64 * cw[None, :, None, None]).sum(1, keepdim=True) + cb)
    c, z = x64 * g[:, :, None, None], x64 * s
    if combine == "max" and gates is not None:
        xa, xs = x * gates[0][:, :, None, None], x * gates[1].view(x.shape[0], 1, *x.shape[2:])
        wa = torch.where(xa == xs, 0.5, (xa > xs).double())
        ws = torch.where(xa == xs, 0.5, (xa < xs).double())
        y = wa * c + ws * z
    else:
        y = torch.maximum(c, z) if combine == "max" else c + z
    y.backward(dy.double())
    return y.detach(), x64.grad, g.grad, cw.grad, cb.grad


def _inputs(shape, seed, relu=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if relu:
        x = x.clamp_min(0)
        x[:, min(1, shape[1] - 1)] = 0          # a dead channel
    return x, torch.randn(shape, generator=g), _weights(shape[1], g), g


@pytest.mark.parametrize("combine", ["max", "add"])
@pytest.mark.parametrize("shape", [(3, 20, 7, 9), (2, 33, 1, 5), (2, 8, 70, 70), (1, 4, 1, 1)], ids=str)
def test_kernels_match_float64(shape, combine):
    x, dy, (w1, b1, w2, b2, cw), _ = _inputs(shape, sum(shape))
    b1[0] = -100.0                          # a hidden unit the ReLU zeroes in every sample
    w = (w1, b1, w2, b2, cw)
    ops = torch.ops.fastattn_C
    y, mean, g, s = ops.scse_train_forward(x, *w, 0.3, combine)
    want = _math64(x, dy, *w, 0.3, combine, (g, s))
    B, C, H, W = shape
    torch.testing.assert_close(y.double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), x.double().mean((2, 3)), rtol=1e-6, atol=1e-6)
    assert s.shape == (B, H * W) and g.shape == (B, C)
    dx, dg, dcw, dcb = ops.scse_train_backward(dy, x, mean, g, s, *w, combine)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.is_contiguous()
    assert dcw.shape == (B, C) and dcb.shape == (B,)
    tol = 1e-5 * max(1.0, math.sqrt(H * W))
    torch.testing.assert_close(dx.double(), want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dg.double(), want[2], rtol=tol, atol=tol)
    torch.testing.assert_close(dcw.sum(0).double(), want[3], rtol=tol, atol=tol)
    torch.testing.assert_close(dcb.sum().double(), want[4], rtol=tol, atol=tol)


def test_max_ties_split_the_gradient():
    """x = 0 ties every pixel of max(x g, x s): dx there takes dy (g + s) / 2 (torch.maximum), not
    dy g (the rule of the kernels before): the two differ by dy (g - s) / 2, far above rounding."""
    x, dy, w, _ = _inputs((2, 6, 4, 5), 3, relu=False)
    x[:, :, 1] = 0
    ops = torch.ops.fastattn_C
    _, mean, g, s = ops.scse_train_forward(x, *w, 0.0, "max")
    dx = ops.scse_train_backward(dy, x, mean, g, s, *w, "max")[0]
    want = _math64(x, dy, *w, 0.0, "max")[1]
    ties_to_g = want.clone()
    ties_to_g[:, :, 1] += dy[:, :, 1].double() * (g[:, :, None].double() - s.view(2, 1, 4, 5)[:, :, 1].double()) / 2
    assert (ties_to_g - want).abs().max() > 1e-2
    torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combine", ["max", "add"])
def test_streaming_path(combine):
    """fp32 dx of at least half the last-level cache is written with streaming stores (vector body,
    odd planes that start unaligned): against float64."""
    C, H, W = 3, 161, 163
    B = max(2, _ext.build_info()["llc_bytes"] // 2 // 4 // (C * H * W) + 1)
    x, dy, w, _ = _inputs((B, C, H, W), 9)
    ops = torch.ops.fastattn_C
    y, mean, g, s = ops.scse_train_forward(x, *w, -0.2, combine)
    dx = ops.scse_train_backward(dy, x, mean, g, s, *w, combine)[0]
    want = _math64(x, dy, *w, -0.2, combine, (g, s))
    torch.testing.assert_close(y.double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), want[1], rtol=1e-5, atol=1e-5)


def _pair(C, combine, seed=0):
    torch.manual_seed(seed)
    ref = fastattn.reference.SCSE(C, 2, combine=combine)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    fast = fastattn.SCSE(C, 2, combine=combine)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("combine", ["max", "add"])
@pytest.mark.parametrize("shape", [(2, 16, 7, 9), (4, 24, 14, 14), (3, 8, 1, 3)], ids=str)
def test_module_training_takes_the_kernels(shape, combine):
    ref, fast = _pair(shape[1], combine)
    x = torch.randn(shape).clamp_min(0)
    assert fast.train_fused(x)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(shape)
    yr = ref(xr)
    names = op_names(lambda: fast(xf).backward(dy))
    assert set(OPS) <= names, names
    yr.backward(dy)
    torch.testing.assert_close(fast(x), yr.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for (n, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad of {n}: {m}")


def test_module_parameter_gradients_only_and_backward_twice():
    ref, fast = _pair(12, "max", seed=1)
    x = torch.randn(2, 12, 5, 6)
    fast(x).sum().backward()                 # x without grad; dy a stride-0 expansion
    ref(x).sum().backward()
    for (n, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad of {n}: {m}")
    fast.zero_grad()
    assert fast.train_fused(x.requires_grad_())
    check_backward_twice(fast, x)


def test_module_frozen_layers():
    """Frozen cSE layers (requires_grad False): no gradient for them, the others still right."""
    ref, fast = _pair(10, "add", seed=2)
    for m in (ref, fast):
        m.cSE.requires_grad_(False)
    x = torch.randn(2, 10, 4, 4)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn_like(x)
    ref(xr).backward(dy)
    fast(xf).backward(dy)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-5)
    assert fast.cSE.fc1.weight.grad is None
    torch.testing.assert_close(fast.sSE.conv.weight.grad, ref.sSE.conv.weight.grad, rtol=1e-4, atol=1e-4)


def test_module_conditions():
    _, fast = _pair(8, "max")
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    assert fast.train_fused(x)
    assert fast.train_fused(x.detach())                                       # the parameters' gradients
    fast.requires_grad_(False)
    assert not fast.train_fused(x.detach())                                   # nothing to differentiate
    fast.requires_grad_(True)
    with torch.no_grad():
        assert not fast.train_fused(x)
    assert not fast.train_fused(x.to(memory_format=torch.channels_last))     # NCHW only (the op path)
    assert not fast.train_fused(x.half())                                     # float32 only
    if torch.get_num_threads() > 1:                                           # a sample per thread at least
        assert not fast.train_fused(torch.randn(1, 8, 5, 5, requires_grad=True))
    assert not fast.train_fused(torch.randn(2, 8, 0, 5, requires_grad=True))        # empty
    fast.backend = "torch"
    assert not fast.train_fused(x)


@pytest.mark.parametrize("call,match", [
    (lambda o, x, w: o.scse_train_forward(x, *w, 0.0, "min"), r"argument 'combine' must be 'max' or 'add'"),
    (lambda o, x, w: o.scse_train_forward(x[:, :, :0], *w, 0.0, "max"), r"argument 'x' must have H \* W >= 1"),
    (lambda o, x, w: o.scse_train_forward(x.to(memory_format=torch.channels_last), *w, 0.0, "max"),
     r"argument 'x' must be NCHW-contiguous"),
    (lambda o, x, w: o.scse_train_forward(x, w[0][:, :3].contiguous(), *w[1:], 0.0, "max"),
     r"argument 'w1' must have shape"),
    (lambda o, x, w: o.scse_train_backward(x.transpose(2, 3), x, *o.scse_train_forward(x, *w, 0.0, "max")[1:], *w,
                                           "max"), r"argument 'dy' must have the shape"),
    (lambda o, x, w: o.scse_train_backward(x, x, torch.zeros(2, 5), *o.scse_train_forward(x, *w, 0.0, "max")[2:], *w,
                                           "max"), r"argument 'mean' must have shape \(2, 4\)"),
    (lambda o, x, w: o.scse_train_backward(x, x, *o.scse_train_forward(x, *w, 0.0, "max")[1:3], torch.zeros(2, 6),
                                           *w, "max"), r"argument 's' must have shape \(2, 30\)"),
])
def test_kernel_argument_errors(call, match):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 6, generator=g)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(torch.ops.fastattn_C, x, _weights(4, g))
