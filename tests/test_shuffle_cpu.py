"""ShuffleAttention's CPU path: the raw kernels (torch.ops.fastattn_C.shuffle_affine_gate: the
affine gate written in channel-shuffled order; shuffle_gate_train_backward: its backward with x's
gradient through the plane statistics, in one read) against float64 math, and
fastattn.ShuffleAttention on them (forward, every gradient) against
fastattn.reference.ShuffleAttention."""
import pytest
import torch

from cases.paths import (check_backward_twice, check_same_step_channels_last, check_training_step,
                         check_training_step_16bit, count_calls, op_names, random_pair)
from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")

DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]
SHAPES = [(3, 8, 7, 9), (2, 12, 1, 1), (2, 6, 17, 3), (1, 4, 33, 65)]


def shuffle64(t, groups):
    b, c, h, w = t.shape
    return t.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def params(x):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    alpha = torch.randn(x.shape[:2], dtype=acc)
    alpha[:, ::3] = 0                                   # the channel branch's alpha = 0
    return alpha, torch.randn(x.shape[:2], dtype=acc)


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_shuffle_affine_gate_matches_float64(dtype, tol, shape, groups):
    if shape[1] % groups:
        pytest.skip("C not divisible by groups")
    torch.manual_seed(sum(shape) + groups)
    x = torch.randn(shape).to(dtype)
    alpha, beta = params(x)
    x64, a64, b64 = x.double().requires_grad_(), alpha.double().requires_grad_(), beta.double().requires_grad_()
    y64 = shuffle64(x64 * torch.sigmoid(a64[..., None, None] * x64 + b64[..., None, None]), groups)
    y = torch.ops.fastattn_C.shuffle_affine_gate(x, alpha, beta, groups)
    assert y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    dy = torch.randn(shape).to(dtype)
    y64.backward(dy.double())
    # x's gradient through the statistics, per plane: k x + a, linear in the plane's dalpha, dbeta
    coef = torch.randn(*shape[:2], 4, dtype=alpha.dtype) / (shape[2] * shape[3])
    mean = torch.randn(shape[:2], dtype=alpha.dtype)
    dx, dalpha, dbeta = torch.ops.fastattn_C.shuffle_gate_train_backward(dy, x, alpha, beta, mean, coef, groups)
    assert dx.dtype == dtype and dalpha.dtype == alpha.dtype and dbeta.dtype == beta.dtype and dx.is_contiguous()
    # the channel sums: fp32 accumulation of 16-bit products, relative to the sum's size
    sum_tol = max(tol, 1e-5) * (shape[2] * shape[3]) ** 0.5
    torch.testing.assert_close(dalpha.double(), a64.grad, rtol=sum_tol, atol=sum_tol)
    torch.testing.assert_close(dbeta.double(), b64.grad, rtol=sum_tol, atol=sum_tol)
    c64 = coef.double()
    k = c64[..., 0] * a64.grad + c64[..., 1] * b64.grad
    a = c64[..., 2] * a64.grad + c64[..., 3] * b64.grad
    want = x64.grad + k[..., None, None] * (x64.detach() - mean.double()[..., None, None]) + a[..., None, None]
    torch.testing.assert_close(dx.double(), want, rtol=sum_tol, atol=sum_tol)


def test_shuffle_affine_gate_errors():
    x = torch.randn(2, 6, 3, 3)
    alpha, beta = params(x)
    op = torch.ops.fastattn_C
    with pytest.raises(ValueError, match=r"shuffle_affine_gate: argument 'groups' must be a positive divisor of "
                                         r"C = 6, got 4"):
        op.shuffle_affine_gate(x, alpha, beta, 4)
    coef = torch.zeros(2, 6, 4)
    with pytest.raises(ValueError, match=r"argument 'groups' must be a positive divisor of C = 6, got 0"):
        op.shuffle_gate_train_backward(x, x, alpha, beta, beta, coef, 0)
    with pytest.raises(ValueError, match=r"shuffle_affine_gate: argument 'x' must be NCHW-contiguous"):
        op.shuffle_affine_gate(x.to(memory_format=torch.channels_last), alpha, beta, 2)
    with pytest.raises(ValueError, match=r"argument 'alpha' must have shape \(B, C\) = \[2, 6\], got \[2, 3\]"):
        op.shuffle_affine_gate(x, alpha[:, :3], beta, 2)
    with pytest.raises(TypeError, match=r"argument 'beta' must be Float for 'x' of dtype Float, got Double"):
        op.shuffle_affine_gate(x, alpha, beta.double(), 2)
    with pytest.raises(ValueError, match=r"shuffle_gate_train_backward: argument 'dy' must have the shape of 'x'"):
        op.shuffle_gate_train_backward(x[:1], x, alpha, beta, beta, coef, 2)
    with pytest.raises(ValueError, match=r"shuffle_gate_train_backward: argument 'dy' must be NCHW-contiguous"):
        op.shuffle_gate_train_backward(x.to(memory_format=torch.channels_last), x, alpha, beta, beta, coef, 2)
    with pytest.raises(ValueError, match=r"argument 'coef' must have shape \(B, C, 4\) = \[2, 6, 4\], got \[2, 6, 2\]"):
        op.shuffle_gate_train_backward(x, x, alpha, beta, beta, coef[..., :2], 2)


def _count(monkeypatch):
    from fastattn.modules import hybrid

    return count_calls(monkeypatch, hybrid._ShuffleTrainCPU, "apply")


def _pair(dtype, channels, groups):
    return random_pair("ShuffleAttention", dtype, channels, groups=groups)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
@pytest.mark.parametrize("shape,groups", [((3, 16, 5, 7), 2), ((2, 24, 9, 3), 3), ((2, 8, 1, 6), 4)],
                         ids=["5x7", "9x3", "1x6"])
def test_shuffle_module_training_matches_reference(monkeypatch, dtype, tol, x_grad, shape, groups):
    calls = _count(monkeypatch)
    torch.manual_seed(sum(shape))
    r, f = _pair(dtype, shape[1], groups)
    check_training_step(r, f, torch.randn(shape, dtype=dtype), tol, x_grad)
    assert calls == [1]
    x = torch.randn(shape, dtype=dtype, requires_grad=x_grad)
    names = op_names(lambda: f(x).sum().backward())                   # the fast module's ops alone
    assert "fastattn_C::shuffle_gate_train_backward" in names
    assert "fastattn_C::channel_pool_backward" not in names, names


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
def test_shuffle_module_training_16bit(monkeypatch, dtype, tol):
    """16-bit maps (statistics from torch.var_mean on a float32 copy): the fused training step
    against the float32 reference on the same rounded inputs."""
    calls = _count(monkeypatch)
    torch.manual_seed(0)
    r, f = _pair(torch.float32, 32, 4)
    check_training_step_16bit(r, f.to(dtype), torch.randn(2, 32, 9, 7).to(dtype), tol, param_tol=4 * tol)
    assert calls == [1]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)],
                         ids=["fp32", "bf16", "fp16"])
def test_shuffle_module_inference_matches_reference(monkeypatch, dtype, tol):
    calls = _count(monkeypatch)
    torch.manual_seed(0)
    r, f = _pair(torch.float32, 32, 4)
    x = torch.randn(3, 32, 14, 13)
    with torch.no_grad():
        want = r(x.to(dtype).float()).to(dtype)     # the fp32 reference on the rounded input
        got = f.to(dtype)(x.to(dtype))
    with torch.inference_mode():
        got_inference = f(x.to(dtype))
        names = op_names(lambda: f(x.to(dtype)))
    assert not calls and "fastattn_C::shuffle_affine_gate" in names     # inference: no autograd function
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(got_inference, got)


def test_shuffle_module_backward_twice(monkeypatch):
    calls = _count(monkeypatch)
    torch.manual_seed(0)
    _, f = _pair(torch.float32, 16, 2)
    check_backward_twice(f, torch.randn(2, 16, 5, 7))
    assert calls == [1]


def test_shuffle_module_path_conditions(monkeypatch):
    calls = _count(monkeypatch)
    _, f = _pair(torch.float32, 16, 2)
    x = torch.randn(2, 16, 5, 5)
    want = f(x)
    got = f(x.to(memory_format=torch.channels_last))              # channels_last: the op path
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want)
    f.backend = "torch"
    torch.testing.assert_close(f(x), want)
    assert calls == [1]
    f.backend = None
    check_same_step_channels_last(f, x)
    assert calls == [1, 1]
    f.backend = None
    assert f.cpu_fused(x) and not f.cpu_fused(x[:, :, :, :0])
