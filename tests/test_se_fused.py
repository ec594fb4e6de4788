"""The one-read squeeze-excite inference kernel (torch.ops.fastattn_C.se_forward) and its use by
fastattn.SqueezeExcite in CPU inference."""
import pytest
import torch

import fastattn
from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")


def se_math(x, w1, b1, w2, b2, r=None):
    """float64 SE: x * sigmoid(w2 relu(w1 mean + b1) + b2) (+ r)."""
    xd = x.double()
    m = xd.mean((2, 3))
    h = torch.relu(m @ w1.double().t() + (b1.double() if b1 is not None else 0))
    g = torch.sigmoid(h @ w2.double().t() + (b2.double() if b2 is not None else 0))
    y = xd * g[:, :, None, None]
    return y + r.double() if r is not None else y


def layouts(x):
    yield "nchw", x
    yield "channels_last", x.to(memory_format=torch.channels_last)
    buf = torch.zeros(x.shape[0], x.shape[1] + 2, *x.shape[2:], dtype=x.dtype)
    buf[:, 1:1 + x.shape[1]] = x
    yield "channel_slice", buf[:, 1:1 + x.shape[1]]
    yield "permuted", x.transpose(2, 3).contiguous().transpose(2, 3)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 20, 7, 9), (2, 33, 1, 5), (5, 16, 13, 1), (1, 8, 70, 70)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_se_forward_matches_float64(dtype, tol, shape, bias, residual):
    g = torch.Generator().manual_seed(sum(shape))
    B, C = shape[:2]
    hidden = max(1, C // 4)
    x = torch.randn(shape, generator=g).to(dtype) + 0.5
    w1, w2 = torch.randn(hidden, C, generator=g) / C ** 0.5, torch.randn(C, hidden, generator=g) / hidden ** 0.5
    b1, b2 = (torch.randn(hidden, generator=g), torch.randn(C, generator=g)) if bias else (None, None)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    want = se_math(x, w1, b1, w2, b2, r)
    for name, xv in layouts(x):
        y = torch.ops.fastattn_C.se_forward(xv, w1, b1, w2, b2, r)
        assert y.dtype == dtype and y.shape == x.shape, name
        assert y.stride() == torch.empty_like(xv).stride(), name
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_se_forward_errors():
    x = torch.randn(2, 8, 3, 3)
    w1, w2 = torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"argument 'w2' must have shape \(8, 2\)"):
        torch.ops.fastattn_C.se_forward(x, w1, None, torch.randn(8, 3), None, None)
    with pytest.raises(TypeError, match=r"argument 'w1' must be float32"):
        torch.ops.fastattn_C.se_forward(x, w1.double(), None, w2, None, None)
    with pytest.raises(TypeError, match=r"argument 'x' must be float32, float16 or bfloat16"):
        torch.ops.fastattn_C.se_forward(x.double(), w1, None, w2, None, None)
    with pytest.raises(ValueError, match=r"argument 'b2' must have shape \(8\)"):
        torch.ops.fastattn_C.se_forward(x, w1, None, w2, torch.randn(7), None)
    with pytest.raises(ValueError, match=r"argument 'residual' must have the shape of 'x'"):
        torch.ops.fastattn_C.se_forward(x, w1, None, w2, None, torch.randn(2, 8, 3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_module_inference_takes_the_one_read_kernel(dtype):
    torch.manual_seed(0)
    r = fastattn.reference.SqueezeExcite(32, reduction=4).eval().to(dtype)
    f = fastattn.SqueezeExcite(32, reduction=4).eval().to(dtype)
    f.load_state_dict(r.state_dict())
    x = torch.randn(2 * torch.get_num_threads(), 32, 6, 5, dtype=dtype)
    res = torch.randn_like(x)
    with torch.no_grad():
        assert f.one_read(x) and f.one_read(x, res)
        assert not f.one_read(x.to(memory_format=torch.channels_last))
        assert not f.one_read(x[:1]) or torch.get_num_threads() == 1
        assert not f.one_read(x, res.double())              # another dtype: the two-op path
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(f(x), r(x), rtol=tol, atol=tol)
        torch.testing.assert_close(f(x, res), r(x, res), rtol=tol, atol=tol)
    assert not f.one_read(x.requires_grad_())          # autograd records: the two-op path
    f.backend = "torch"
    with torch.no_grad():
        assert not f.one_read(x)


def eca_math(x, w):
    """float64 ECA: x * sigmoid(conv1d over channels of the mean, zero padding (k - 1) / 2)."""
    m = x.double().mean((2, 3))[:, None, :]
    k = w.numel()
    g = torch.sigmoid(torch.nn.functional.conv1d(m, w.double().view(1, 1, k), padding=(k - 1) // 2))[:, 0]
    return x.double() * g[:, :, None, None]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("k", [1, 3, 5, 9])
@pytest.mark.parametrize("shape", [(3, 20, 7, 9), (2, 4, 3, 5), (5, 37, 1, 1)])
def test_eca_forward_matches_float64(dtype, tol, k, shape):
    g = torch.Generator().manual_seed(k + sum(shape))
    x = torch.randn(shape, generator=g).to(dtype) + 0.5
    w = torch.randn(k, generator=g)
    want = eca_math(x, w)
    for name, xv in layouts(x):
        y = torch.ops.fastattn_C.eca_forward(xv, w)
        assert y.dtype == dtype and y.stride() == torch.empty_like(xv).stride(), name
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_eca_forward_errors():
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match=r"argument 'weight' must be 1-D with an odd number of taps"):
        torch.ops.fastattn_C.eca_forward(x, torch.randn(4))
    with pytest.raises(TypeError, match=r"argument 'weight' must be float32"):
        torch.ops.fastattn_C.eca_forward(x, torch.randn(3, dtype=torch.float64))


def test_eca_module_inference_takes_the_one_read_kernel():
    torch.manual_seed(0)
    r, f = fastattn.reference.ECA(64).eval(), fastattn.ECA(64).eval()
    f.load_state_dict(r.state_dict())
    x = torch.randn(2 * torch.get_num_threads(), 64, 5, 6)
    with torch.no_grad():
        assert f.one_read(x)
        torch.testing.assert_close(f(x), r(x), rtol=1e-5, atol=1e-5)
    assert not f.one_read(x.requires_grad_())


@pytest.mark.parametrize("kwargs,one_read", [({}, True), ({"use_mlp": False}, False), ({"extent": 2}, False)],
                         ids=["global_mlp", "no_mlp", "extent2"])
def test_gather_excite_inference(monkeypatch, kwargs, one_read):
    """GatherExcite with the global mean and its ConvMlp is SE's math: the one-read kernel in CPU
    inference; other configurations keep their own paths. Against the reference either way."""
    from fastattn.modules import channel as ch

    calls = []
    orig = ch._se_one_read
    monkeypatch.setattr(ch, "_se_one_read", lambda *a: calls.append(1) or orig(*a))
    torch.manual_seed(0)
    r, f = fastattn.reference.GatherExcite(32, **kwargs).eval(), fastattn.GatherExcite(32, **kwargs).eval()
    f.load_state_dict(r.state_dict())
    x = torch.randn(2 * torch.get_num_threads(), 32, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(f(x), r(x), rtol=1e-5, atol=1e-5)
    assert bool(calls) == one_read
