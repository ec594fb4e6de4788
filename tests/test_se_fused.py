"""The one-read squeeze-excite inference kernel (torch.ops.fastattn_C.se_forward) and its use by
fastattn.SqueezeExcite in CPU inference."""
import pytest
import torch

import fastattn
from cases.paths import check_training_step, count_calls
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
        xcl, rescl = (t.to(memory_format=torch.channels_last) for t in (x, res))
        assert f.one_read(xcl) and f.one_read(xcl, rescl)             # the channels_last loop
        assert not f.one_read(xcl, res)                               # a residual in another layout
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(f(xcl, rescl), r(xcl, rescl), rtol=tol, atol=tol)
        assert f(xcl).is_contiguous(memory_format=torch.channels_last)
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
        xcl = x.to(memory_format=torch.channels_last)
        assert f.one_read(xcl)
        torch.testing.assert_close(f(xcl), r(xcl), rtol=1e-5, atol=1e-5)
    assert not f.one_read(x.requires_grad_())


@pytest.mark.parametrize("kwargs,one_read", [({}, True), ({"use_mlp": False}, False), ({"extent": 2}, False)],
                         ids=["global_mlp", "no_mlp", "extent2"])
def test_gather_excite_inference(monkeypatch, kwargs, one_read):
    """GatherExcite with the global mean and its ConvMlp is SE's math: the one-read kernel in CPU
    inference; other configurations keep their own paths. Against the reference either way."""
    from fastattn.modules import channel as ch

    calls = count_calls(monkeypatch, ch, "_se_one_read")
    torch.manual_seed(0)
    r, f = fastattn.reference.GatherExcite(32, **kwargs).eval(), fastattn.GatherExcite(32, **kwargs).eval()
    f.load_state_dict(r.state_dict())
    x = torch.randn(2 * torch.get_num_threads(), 32, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(f(x), r(x), rtol=1e-5, atol=1e-5)
    assert bool(calls) == one_read


def srm_math(x, a_mean, a_std, bias, eps=1e-5):
    """float64 SRM with a folded BatchNorm: x * sigmoid(a_mean mean + a_std sqrt(var + eps) + bias)."""
    xd = x.double().flatten(2)
    std = (xd.var(dim=2, unbiased=True) + eps).sqrt()
    g = torch.sigmoid(a_mean.double() * xd.mean(2) + a_std.double() * std + bias.double())
    return x.double() * g[:, :, None, None]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 20, 7, 9), (2, 33, 1, 5), (5, 16, 13, 1), (1, 8, 70, 70)])
def test_srm_forward_matches_float64(dtype, tol, shape):
    g = torch.Generator().manual_seed(sum(shape))
    C = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)      # off-centre: the variance is two-pass
    a_mean, a_std, bias = (torch.randn(C, generator=g) for _ in range(3))
    want = srm_math(x, a_mean, a_std, bias)
    for name, xv in layouts(x):
        y = torch.ops.fastattn_C.srm_forward(xv, a_mean, a_std, bias, 1e-5)
        assert y.dtype == dtype and y.stride() == torch.empty_like(xv).stride(), name
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_srm_forward_errors():
    x, v = torch.randn(2, 8, 3, 3), torch.randn(8)
    with pytest.raises(ValueError, match=r"argument 'a_std' must have shape \(8\)"):
        torch.ops.fastattn_C.srm_forward(x, v, torch.randn(7), v, 1e-5)
    with pytest.raises(ValueError, match=r"argument 'x' must have H \* W >= 2"):
        torch.ops.fastattn_C.srm_forward(torch.randn(2, 8, 1, 1), v, v, v, 1e-5)
    with pytest.raises(TypeError, match=r"argument 'bias' must be float32"):
        torch.ops.fastattn_C.srm_forward(x, v, v, v.half(), 1e-5)


def cbam_math(x, w1, b1, w2, b2, use_mean, use_max, conv_weight, conv_bias):
    """float64 CBAM with the spatial BatchNorm folded into (conv_weight (2, k, k), conv_bias)."""
    xd = x.double()
    mlp = lambda v: torch.relu(v @ w1.double().t() + b1.double()) @ w2.double().t() + b2.double()  # noqa: E731
    att = 0
    if use_mean:
        att = att + mlp(xd.mean((2, 3)))
    if use_max:
        att = att + mlp(xd.amax((2, 3)))
    y = xd * torch.sigmoid(att)[:, :, None, None]
    if conv_weight is None:
        return y
    k = conv_weight.shape[-1]
    pooled = torch.stack([y.amax(1), y.mean(1)], 1)
    s = torch.nn.functional.conv2d(pooled, conv_weight.double()[None], padding=(k - 1) // 2) + conv_bias
    return y * torch.sigmoid(s)


def cbam_args(C, k, g, use_mean=True, use_max=True, spatial=True):
    hidden = max(1, C // 4)
    w1, b1 = torch.randn(hidden, C, generator=g) / C ** 0.5, torch.randn(hidden, generator=g)
    w2, b2 = torch.randn(C, hidden, generator=g) / hidden ** 0.5, torch.randn(C, generator=g)
    cw = torch.randn(2, k, k, generator=g) / k if spatial else None
    return w1, b1, w2, b2, use_mean, use_max, cw, 0.3 if spatial else 0.0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 20, 7, 9), (2, 33, 1, 5), (5, 16, 13, 1), (1, 8, 40, 37)])
@pytest.mark.parametrize("pools", [(True, True), (True, False), (False, True)], ids=["mean_max", "mean", "max"])
@pytest.mark.parametrize("k,spatial", [(7, True), (3, True), (1, True), (7, False)],
                         ids=["k7", "k3", "k1", "no_spatial"])
def test_cbam_forward_matches_float64(dtype, tol, shape, pools, k, spatial):
    g = torch.Generator().manual_seed(sum(shape) + k)
    x = (torch.randn(shape, generator=g) + 0.5).to(dtype)
    args = cbam_args(shape[1], k, g, *pools, spatial=spatial)
    want = cbam_math(x, *args)
    for name, xv in layouts(x):
        y = torch.ops.fastattn_C.cbam_forward(xv, *args)
        assert y.dtype == dtype and y.stride() == torch.empty_like(xv).stride(), name
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("pools", [(True, True), (False, True)], ids=["mean_max", "max"])
def test_cbam_forward_propagates_nan_and_inf(pools):
    """A NaN in one plane makes that sample's channel gate NaN (as torch's amax and mean do);
    an inf stays out of the other samples."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 5, 6, generator=g)
    x[0, 2, 1, 3] = float("nan")
    x[1, 5, 4, 0] = float("inf")
    args = cbam_args(8, 3, g, *pools)
    want = cbam_math(x, *args)
    y = torch.ops.fastattn_C.cbam_forward(x, *args)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert y[0].isnan().all() and not y[2].isnan().any()


def test_se_forward_propagates_nan():
    """A NaN mean goes through the ReLU (as torch.relu) into that sample's gate."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 4, 5, generator=g)
    x[1, 6, 2, 2] = float("nan")
    w1, w2, b1, b2 = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), torch.randn(2), torch.randn(8)
    y = torch.ops.fastattn_C.se_forward(x, w1, b1, w2, b2, None)
    torch.testing.assert_close(y.double(), se_math(x, w1, b1, w2, b2), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert y[1].isnan().all() and not y[0].isnan().any()


def test_cbam_forward_errors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    w1, b1, w2, b2, m, mx, cw, cb = cbam_args(8, 7, g)
    with pytest.raises(ValueError, match=r"argument 'conv_weight' must have shape \(2, k, k\) with k odd"):
        torch.ops.fastattn_C.cbam_forward(x, w1, b1, w2, b2, m, mx, torch.randn(2, 4, 4), cb)
    with pytest.raises(ValueError, match=r"at least one of 'use_mean' and 'use_max'"):
        torch.ops.fastattn_C.cbam_forward(x, w1, b1, w2, b2, False, False, cw, cb)
    with pytest.raises(ValueError, match=r"argument 'b1' must have shape \(2\)"):
        torch.ops.fastattn_C.cbam_forward(x, w1, torch.randn(3), w2, b2, m, mx, cw, cb)
    with pytest.raises(TypeError, match=r"argument 'x' must be float32, float16 or bfloat16"):
        torch.ops.fastattn_C.cbam_forward(x.double(), w1, b1, w2, b2, m, mx, cw, cb)


def _randomise_batch_norms(module):
    for bn in module.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("name,kwargs", [("SRM", {}), ("CBAM", {}), ("CBAM", {"pool_types": ("max",)}),
                                         ("CBAM", {"no_spatial": True}), ("CBAM", {"kernel_size": 3})],
                         ids=["srm", "cbam", "cbam_max", "cbam_no_spatial", "cbam_k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_srm_cbam_modules_take_the_one_read_kernel_in_eval(name, kwargs, dtype):
    """In CPU inference (eval BatchNorms) SRM and CBAM run their one-read kernel and match the
    reference; in train mode, with a gradient, or with the torch backend they do not."""
    torch.manual_seed(0)
    C = 32
    r = getattr(fastattn.reference, name)(C, **kwargs)
    _randomise_batch_norms(r)
    if name == "SRM":
        r.cfc.data.normal_()
    r = r.eval().to(dtype)
    f = getattr(fastattn, name)(C, **kwargs).eval().to(dtype)
    f.load_state_dict(r.state_dict())
    x = torch.randn(2 * torch.get_num_threads(), C, 9, 7, dtype=dtype) + 0.3
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        assert f.one_read(x)
        torch.testing.assert_close(f(x), r(x), rtol=tol, atol=tol)
        assert not f.one_read(x.to(memory_format=torch.channels_last))
        f.train()
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in f.modules())
        assert f.one_read(x) != has_bn            # batch statistics: the general path
        f.eval()
    assert not f.one_read(x.requires_grad_())
    f.backend = "torch"
    with torch.no_grad():
        assert not f.one_read(x)


@pytest.mark.parametrize("pools", [("avg", "avg"), ("max", "avg", "max")])
def test_cbam_repeated_pool_type_keeps_the_general_path(pools):
    """A pool named twice counts twice in the reference's sum: the op path (which pools it once)."""
    torch.manual_seed(0)
    r = fastattn.reference.CBAM(16, reduction=4, pool_types=pools)
    m = fastattn.CBAM(16, reduction=4, pool_types=pools)
    m.load_state_dict(r.state_dict())
    x = torch.randn(2 * torch.get_num_threads(), 16, 4, 4)
    assert not m.train_fused(x.requires_grad_())
    torch.testing.assert_close(m(x), r(x), rtol=1e-5, atol=1e-5)
    m.eval(), r.eval()
    with torch.no_grad():
        assert not m.one_read(x)
        torch.testing.assert_close(m(x), r(x), rtol=1e-5, atol=1e-5)


# --- training: the two backward passes of the pooled-gate modules (fastattn.modules.channel._PooledGate)

ALL_DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3), (torch.float64, 1e-12)]


@pytest.mark.parametrize("dtype,tol", ALL_DTYPES, ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("shape", [(3, 20, 7, 9), (2, 33, 1, 5), (1, 8, 70, 70)])
def test_channel_dot_and_affine_backward_match_float64(dtype, tol, shape):
    from test_pooled_gate_one_read import repeated_rows_filter

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gate, k, a, e = (torch.randn(shape[:2], generator=g).to(acc) for _ in range(4))
    filt = torch.randn(shape[1:], generator=g).to(acc)
    filt_runs = repeated_rows_filter(*shape[1:], g).to(acc)
    want_dot = (dy.double() * x.double()).sum((2, 3))
    want_dx = dy.double() * gate.double()[..., None, None] + k.double()[..., None, None] * x.double() \
        + a.double()[..., None, None]
    hw = shape[2] * shape[3]
    for name, xv in layouts(x):
        for dname, dyv in (("same", dy.to(memory_format=torch.channels_last) if name == "channels_last" else dy),
                           ("expanded", dy[:1, :1, :1, :1].expand(shape))):
            if dname == "expanded":
                wd = (dy[:1, :1, :1, :1].double() * x.double()).sum((2, 3))
                wx = dy[:1, :1, :1, :1].double() * gate.double()[..., None, None] \
                    + k.double()[..., None, None] * x.double() + a.double()[..., None, None]
            else:
                wd, wx = want_dot, want_dx
            got = torch.ops.fastattn_C.channel_dot(dyv, xv)
            assert got.dtype == acc and got.shape == shape[:2]
            torch.testing.assert_close(got.double(), wd, rtol=tol, atol=tol * hw ** 0.5,
                                       msg=lambda m: f"{name}/{dname}: {m}")
            dx = torch.ops.fastattn_C.channel_scale_affine_backward(dyv, xv, gate, k, a, None, None)
            assert dx.dtype == dtype and dx.stride() == torch.empty_like(xv).stride()
            torch.testing.assert_close(dx.double(), wx, rtol=tol, atol=tol, msg=lambda m: f"{name}/{dname}: {m}")
            for fname, f in (("filter", filt), ("filter of equal-row runs", filt_runs)):
                dx = torch.ops.fastattn_C.channel_scale_affine_backward(dyv, xv, gate, k, a, f, e)
                torch.testing.assert_close(dx.double(), wx + e.double()[..., None, None] * f.double(), rtol=tol,
                                           atol=tol, msg=lambda m: f"{name}/{dname}, {fname}: {m}")
            # k None: no x term (x's values are not read: NaN there must not show)
            wx0 = wx - k.double()[..., None, None] * x.double()
            dx = torch.ops.fastattn_C.channel_scale_affine_backward(dyv, torch.full_like(xv, float("nan")), gate, None,
                                                                    a, None, None)
            torch.testing.assert_close(dx.double(), wx0, rtol=tol, atol=tol, msg=lambda m: f"{name}/{dname}, no k: {m}")
            dx = torch.ops.fastattn_C.channel_scale_affine_backward(dyv, xv, gate, None, a, filt, e)
            torch.testing.assert_close(dx.double(), wx0 + e.double()[..., None, None] * filt.double(), rtol=tol,
                                       atol=tol, msg=lambda m: f"{name}/{dname}, no k, filter: {m}")


def test_channel_dot_and_affine_backward_errors():
    x = torch.randn(2, 4, 3, 3)
    v = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"argument 'dy' must have the shape of 'x'"):
        torch.ops.fastattn_C.channel_dot(torch.randn(2, 4, 3, 2), x)
    with pytest.raises(TypeError, match=r"argument 'dy' must have the dtype of 'x'"):
        torch.ops.fastattn_C.channel_dot(x.double(), x)
    with pytest.raises(ValueError, match=r"argument 'k' must have shape \(2, 4\)"):
        torch.ops.fastattn_C.channel_scale_affine_backward(x, x, v, torch.randn(2, 3), v, None, None)
    with pytest.raises(TypeError, match=r"argument 'a' must be Float, got BFloat16"):
        torch.ops.fastattn_C.channel_scale_affine_backward(x.bfloat16(), x.bfloat16(), v, v, v.bfloat16(), None, None)
    with pytest.raises(ValueError, match=r"arguments 'filter' and 'e' must be given together"):
        torch.ops.fastattn_C.channel_scale_affine_backward(x, x, v, v, v, torch.randn(4, 3, 3), None)
    with pytest.raises(ValueError, match=r"argument 'filter' must have shape \(C, H, W\) = \(4, 3, 3\)"):
        torch.ops.fastattn_C.channel_scale_affine_backward(x, x, v, v, v, torch.randn(4, 3, 2), v)


def _count_pooled_gate(monkeypatch):
    from fastattn.modules import channel as ch

    return count_calls(monkeypatch, ch._PooledGate, "apply")


@pytest.mark.parametrize("name", ["SqueezeExcite", "ECA", "SRM", "GatherExcite", "MultiSpectralAttention"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_pooled_gate_training_path_matches_reference(monkeypatch, name, dtype, tol, x_grad, train):
    """With a gradient to record on CPU NCHW, SE/ECA/SRM/GatherExcite take the two-pass training
    path (SRM in train mode on float32: its batch-statistics kernels, tests/test_srm_train_cpu.py);
    output, every gradient and the BatchNorm running statistics match the reference."""
    from fastattn.modules import channel as ch

    calls = _count_pooled_gate(monkeypatch)
    srm_calls = count_calls(monkeypatch, ch._SRMTrain, "apply")
    torch.manual_seed(0)
    args = (32, 7, 9) if name == "MultiSpectralAttention" else (32,)     # FcaNet: the DCT grid is the map
    r = getattr(fastattn.reference, name)(*args).to(dtype)
    if name == "SRM":
        r.cfc.data.normal_()
    _randomise_batch_norms(r)
    f = getattr(fastattn, name)(*args).to(dtype)
    f.load_state_dict(r.state_dict())
    r.train(train), f.train(train)
    x = torch.randn(3, 32, 7, 9, dtype=dtype) * 2 + 1
    xr, xf = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
    dy = torch.randn_like(x)
    assert f.train_fused(xf)
    batch_stats = name == "SRM" and f.batch_stats_fused(xf)
    assert batch_stats == (name == "SRM" and train and dtype == torch.float32)
    yr, yf = r(xr), f(xf)
    assert (srm_calls if batch_stats else calls), "the training path was not taken"
    torch.autograd.backward(yr, dy)
    torch.autograd.backward(yf, dy)
    torch.testing.assert_close(yf, yr, rtol=tol, atol=tol)
    if x_grad:
        torch.testing.assert_close(xf.grad, xr.grad, rtol=tol, atol=tol)
    for (pname, pr), pf in zip(r.named_parameters(), f.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=tol, atol=tol, msg=lambda m: f"{pname}: {m}")
    for br, bf in zip(r.buffers(), f.buffers()):
        torch.testing.assert_close(bf, br, rtol=tol, atol=tol)


def test_pooled_gate_training_path_conditions(monkeypatch):
    calls = _count_pooled_gate(monkeypatch)
    f = fastattn.SqueezeExcite(16)
    x = torch.randn(2, 16, 5, 5)
    f(x.to(memory_format=torch.channels_last)).sum().backward()     # channels_last: the op path
    f(x, torch.randn_like(x)).sum().backward()                       # a residual: the op path
    with torch.no_grad():
        f(x)                                                         # nothing to record
    f.requires_grad_(False)
    assert not f.train_fused(x)
    f(x)                                                             # no gradient anywhere
    assert not calls
    f.requires_grad_(True)
    f.backend = "torch"
    f(x).sum().backward()
    assert not calls
    f.backend = None
    f(x).sum().backward()
    assert len(calls) == 1


# --- CBAM training: three backward passes (fastattn.modules.hybrid._CBAMTrain)


def _count_cbam_train(monkeypatch):
    from fastattn.modules import hybrid

    return count_calls(monkeypatch, hybrid._CBAMTrain, "apply")


@pytest.mark.parametrize("kwargs", [{}, {"pool_types": ("max",)}, {"pool_types": ("avg",)},
                                    {"pool_types": ("max", "avg")}, {"kernel_size": 3}],
                         ids=["avg_max", "max", "avg", "max_avg", "k3"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
@pytest.mark.parametrize("shape", [(4, 32, 7, 9), (2, 16, 1, 13), (3, 24, 11, 1)], ids=["7x9", "1x13", "11x1"])
def test_cbam_training_path_matches_reference(monkeypatch, kwargs, dtype, tol, x_grad, shape):
    calls = _count_cbam_train(monkeypatch)
    torch.manual_seed(sum(shape))
    C = shape[1]
    r = fastattn.reference.CBAM(C, reduction=4, **kwargs).to(dtype)
    f = fastattn.CBAM(C, reduction=4, **kwargs).to(dtype)
    f.load_state_dict(r.state_dict())
    check_training_step(r, f, torch.randn(shape, dtype=dtype), tol, x_grad)     # the spatial BatchNorm too
    assert calls == [1]


def test_cbam_training_path_ties_match_the_op_path(monkeypatch):
    """Ties in both max pools: the three-pass backward sends the max gradients where the op
    path does (the first maximum), non-contiguous dy included."""
    calls = _count_cbam_train(monkeypatch)
    torch.manual_seed(0)
    f = fastattn.CBAM(16, reduction=4)
    x = torch.randn(2, 16, 5, 6).round()                           # many equal values
    x[:, :, 2, :] = 3.0                                             # a tied row of maxima per plane
    dy = torch.randn(2, 6, 5, 16).permute(0, 3, 2, 1)               # non-contiguous dy
    grads = []
    for fused in (True, False):
        f.zero_grad()
        xx = x.clone().requires_grad_()
        if not fused:
            f.backend = "cpu"
            monkeypatch.setattr(fastattn.CBAM, "train_fused", lambda self, x: False)
        f(xx).backward(dy)
        grads.append([xx.grad] + [p.grad.clone() for p in f.parameters()])
    assert calls == [1]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cbam_training_path_conditions(monkeypatch):
    calls = _count_cbam_train(monkeypatch)
    f = fastattn.CBAM(16, reduction=4)
    x = torch.randn(2 * torch.get_num_threads(), 16, 5, 5)
    f(x.to(memory_format=torch.channels_last)).sum().backward()     # channels_last: the op path
    fastattn.CBAM(16, reduction=4, no_spatial=True)(x).sum().backward()
    fastattn.CBAM(16, reduction=4, pool_types=("avg", "avg"))(x).sum().backward()
    with torch.no_grad():
        f(x)
    if torch.get_num_threads() > 1:
        f(x[:1]).sum().backward()                                   # fewer samples than threads
    assert not calls
    f(x).sum().backward()
    assert calls == [1]


def test_cbam_backward_raw_errors():
    x = torch.randn(2, 4, 3, 3)
    a, s = torch.rand(2, 4), torch.rand(2, 9)
    with pytest.raises(ValueError, match=r"argument 'x' must be NCHW-contiguous"):
        torch.ops.fastattn_C.cbam_backward_sums(x, x.transpose(2, 3), a, s)
    with pytest.raises(ValueError, match=r"argument 's' must have shape \(2, 9\)"):
        torch.ops.fastattn_C.cbam_backward_sums(x, x, a, torch.rand(2, 8))
    with pytest.raises(TypeError, match=r"argument 'idx_c' must be Int"):
        torch.ops.fastattn_C.cbam_backward_pool_grad(x, s, s, torch.zeros(2, 9, dtype=torch.int64))
    z, iz = torch.zeros(2, 9, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"argument 'idx_p' must hold positions in \[0, H \* W = 9\)"):
        torch.ops.fastattn_C.cbam_backward_dx(x, a, s, s, s, z, a, a, iz + 9)


# --- FcaNet (MultiSpectralAttention) inference: the DCT pool as the squeeze


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 20, 7, 9), (2, 33, 1, 5), (1, 8, 70, 70)])
@pytest.mark.parametrize("rows", ["distinct", "runs"])
def test_fca_forward_matches_float64(dtype, tol, shape, rows):
    """A random filter, and one of runs of equal rows (FcaNet's; the kernel reads one per run)."""
    from test_pooled_gate_one_read import repeated_rows_filter

    g = torch.Generator().manual_seed(sum(shape))
    B, C, H, W = shape
    hidden = max(1, C // 4)
    x = torch.randn(shape, generator=g).to(dtype)
    if rows == "distinct":
        filt = torch.randn(C, H, W, generator=g) / (H * W) ** 0.5
    else:
        filt = repeated_rows_filter(C, H, W, g) / (H * W) ** 0.5
    w1, w2 = torch.randn(hidden, C, generator=g) / C ** 0.5, torch.randn(C, hidden, generator=g) / hidden ** 0.5
    d = (x.double() * filt.double()).sum((2, 3))
    want = x.double() * torch.sigmoid(torch.relu(d @ w1.double().t()) @ w2.double().t())[:, :, None, None]
    for name, xv in layouts(x):
        y = torch.ops.fastattn_C.fca_forward(xv, filt, w1, w2)
        assert y.dtype == dtype and y.stride() == torch.empty_like(xv).stride(), name
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_fca_forward_errors():
    x = torch.randn(2, 8, 7, 7)
    w1, w2 = torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"argument 'filter' must have shape \(C, H, W\) = \(8, 7, 7\)"):
        torch.ops.fastattn_C.fca_forward(x, torch.randn(8, 7, 6), w1, w2)
    with pytest.raises(ValueError, match=r"argument 'filter' must be contiguous"):
        torch.ops.fastattn_C.fca_forward(x, torch.randn(8, 7, 7).transpose(1, 2), w1, w2)
    with pytest.raises(ValueError, match=r"argument 'w2' must have shape \(8, 2\)"):
        torch.ops.fastattn_C.fca_forward(x, torch.randn(8, 7, 7), w1, torch.randn(8, 3))


@pytest.mark.parametrize("dct,one_read", [((7, 7), True), ((14, 14), False)], ids=["dct_map", "adaptive_pool"])
def test_multispectral_inference_takes_the_one_read_kernel(dct, one_read):
    torch.manual_seed(0)
    r = fastattn.reference.MultiSpectralAttention(64, *dct).eval()
    f = fastattn.MultiSpectralAttention(64, *dct).eval()
    f.load_state_dict(r.state_dict())
    x = torch.randn(2 * torch.get_num_threads(), 64, 7, 7)
    with torch.no_grad():
        assert f.one_read(x) == one_read
        torch.testing.assert_close(f(x), r(x), rtol=1e-5, atol=1e-5)
    assert not f.one_read(x.requires_grad_())


# --- scSE inference in one read


def scse_math(x, w1, b1, w2, b2, conv_w, conv_b, combine):
    xd = x.double()
    g = torch.sigmoid(torch.relu(xd.mean((2, 3)) @ w1.double().t() + b1.double()) @ w2.double().t() + b2.double())
    s = torch.sigmoid((xd * conv_w.double()[None, :, None, None]).sum(1, keepdim=True) + conv_b)
    c, z = xd * g[:, :, None, None], xd * s
    return torch.maximum(c, z) if combine == "max" else c + z


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 20, 7, 9), (2, 33, 1, 5), (1, 8, 70, 70)])
@pytest.mark.parametrize("combine", ["max", "add"])
def test_scse_forward_matches_float64(dtype, tol, shape, combine):
    g = torch.Generator().manual_seed(sum(shape))
    C = shape[1]
    hidden = max(1, C // 2)
    x = torch.randn(shape, generator=g).to(dtype)
    w1, b1 = torch.randn(hidden, C, generator=g) / C ** 0.5, torch.randn(hidden, generator=g)
    w2, b2 = torch.randn(C, hidden, generator=g) / hidden ** 0.5, torch.randn(C, generator=g)
    conv_w = torch.randn(C, generator=g) / C ** 0.5
    want = scse_math(x, w1, b1, w2, b2, conv_w, 0.2, combine)
    for name, xv in layouts(x):
        y = torch.ops.fastattn_C.scse_forward(xv, w1, b1, w2, b2, conv_w, 0.2, combine)
        assert y.dtype == dtype and y.stride() == torch.empty_like(xv).stride(), name
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_scse_forward_nan_and_errors():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 4, 4, generator=g)
    x[1, 3, 2, 1] = float("nan")
    args = (torch.randn(4, 8, generator=g), torch.randn(4, generator=g), torch.randn(8, 4, generator=g),
            torch.randn(8, generator=g), torch.randn(8, generator=g), -0.1)
    y = torch.ops.fastattn_C.scse_forward(x, *args, "max")
    torch.testing.assert_close(y.double(), scse_math(x, *args, "max"), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert y[1].isnan().all() and not y[0].isnan().any()           # the NaN poisons its sample's gates
    with pytest.raises(ValueError, match=r"argument 'combine' must be 'max' or 'add', got 'mul'"):
        torch.ops.fastattn_C.scse_forward(x, *args, "mul")
    with pytest.raises(ValueError, match=r"argument 'conv_w' must have shape \(8\)"):
        torch.ops.fastattn_C.scse_forward(x, *args[:4], torch.randn(7), 0.0, "max")


@pytest.mark.parametrize("combine", ["max", "add"])
def test_scse_module_inference_takes_the_one_read_kernel(combine):
    torch.manual_seed(0)
    r, f = fastattn.reference.SCSE(32, combine=combine).eval(), fastattn.SCSE(32, combine=combine).eval()
    f.load_state_dict(r.state_dict())
    x = torch.randn(2 * torch.get_num_threads(), 32, 6, 7)
    with torch.no_grad():
        assert f.one_read(x)
        torch.testing.assert_close(f(x), r(x), rtol=1e-5, atol=1e-5)
        assert not f.one_read(x.to(memory_format=torch.channels_last))
    assert not f.one_read(x.requires_grad_())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
def test_scse_squeeze_conv_matches_torch(dtype, tol, bias, x_grad):
    """sSE's 1x1 conv C -> 1 as a batched matrix product (fastattn.modules.hybrid._conv_to_one):
    forward and every gradient as torch's conv; channels_last keeps the conv."""
    from fastattn.modules.hybrid import _conv_to_one

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 1, 1, bias=bias).to(dtype)
    x = torch.randn(3, 12, 5, 7, dtype=dtype)
    xa, xb = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
    dy = torch.randn(3, 1, 5, 7, dtype=dtype)
    ya = _conv_to_one(xa, conv)
    assert ya.grad_fn is not None and "PointwiseToOne" in type(ya.grad_fn).__name__
    ya.backward(dy)
    got = [xa.grad] + [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    yb = conv(xb)
    yb.backward(dy)
    want = [xb.grad] + [p.grad for p in conv.parameters()]
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    cl = _conv_to_one(x.to(memory_format=torch.channels_last), conv)
    assert "PointwiseToOne" not in type(cl.grad_fn).__name__


@pytest.mark.parametrize("name", ["SqueezeExcite", "SRM", "CBAM"])
def test_training_paths_backward_twice_with_retain_graph(monkeypatch, name):
    """backward(retain_graph=True) then backward again: the module paths keep their gate graphs,
    so the gradients accumulate to twice one backward's."""
    from fastattn.modules import channel as ch

    pooled_gate, cbam = _count_pooled_gate(monkeypatch), _count_cbam_train(monkeypatch)
    srm = count_calls(monkeypatch, ch._SRMTrain, "apply")
    torch.manual_seed(0)
    f = getattr(fastattn, name)(16)
    x = torch.randn(2 * torch.get_num_threads(), 16, 5, 6, requires_grad=True)
    dy = torch.randn_like(x)
    y = f(x)
    assert len(pooled_gate) + len(cbam) + len(srm) == 1
    y.backward(dy, retain_graph=True)
    once = [x.grad.clone()] + [p.grad.clone() for p in f.parameters()]
    y.backward(dy)
    twice = [x.grad] + [p.grad for p in f.parameters()]
    for a, b in zip(once, twice):
        torch.testing.assert_close(b, 2 * a, rtol=1e-5, atol=1e-6)
