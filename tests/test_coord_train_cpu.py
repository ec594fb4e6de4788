"""CoordinateAttention's CPU training path (fastattn.modules.hybrid._CoordTrain) and its two raw
ops: fastattn_C::coord_scale_grads (da_h, da_w from one read of dy and x) and
fastattn_C::coord_backward_dx (the whole dx in one write)."""
import pytest
import torch

import fastattn
from cases.paths import check_training_step, count_calls
from fastattn import _ext
from test_coord_ops import KTOL, ULP, _CoordKernelTests

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C is not built")

LAYOUTS = _CoordKernelTests.LAYOUTS
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _make(shape, dtype, layout, g):
    return _CoordKernelTests()._make(shape, dtype, layout, g)


def _train_calls(monkeypatch):
    from fastattn.modules import hybrid

    return count_calls(monkeypatch, hybrid._CoordTrain, "apply")


# --- the raw ops against float64 math


@pytest.mark.parametrize("shape", [(2, 70, 13, 17), (2, 40, 20, 40), (1, 64, 17, 64), (2, 17, 5, 70), (3, 5, 1, 1),
                                   (2, 33, 1, 9)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_raw_ops_match_float64(shape, dtype, layout):
    """Every walk (rows with and without the AVX-512 short-row kernels, channels, generic) and
    dtype; dy in x's layout."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(sum(shape))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, dy = _make(shape, dtype, layout, g), _make(shape, dtype, layout, g)
    a_h, a_w = torch.rand(B, C, H, generator=g).to(acc), torch.rand(B, C, W, generator=g).to(acc)
    dxh, dxw = torch.randn(B, C, H, generator=g).to(dtype), torch.randn(B, C, W, generator=g).to(dtype)

    da_h, da_w = torch.ops.fastattn_C.coord_scale_grads(dy, x, a_h, a_w)
    dx = torch.ops.fastattn_C.coord_backward_dx(dy, a_h, a_w, dxh, dxw)
    assert da_h.dtype == da_w.dtype == acc and dx.dtype == dtype
    assert dx.stride() == torch.empty_like(dy).stride()

    x64, dy64, ah64, aw64 = x.double(), dy.double(), a_h.double()[..., None], a_w.double()[:, :, None, :]
    want_dx = dy64 * aw64 * ah64 + dxh.double()[..., None] / W + dxw.double()[:, :, None, :] / H
    tol = KTOL[dtype]
    for name, got, want, n in (("da_h", da_h, (dy64 * x64 * aw64).sum(3), W),
                               ("da_w", da_w, (dy64 * x64 * ah64).sum(2), H), ("dx", dx, want_dx, 1)):
        scale = max(1.0, want.abs().max().item())
        # 16-bit inputs: dx is rounded once to the dtype; the sums are fp32 of exactly converted values
        atol = (2 * ULP[dtype] * scale if name == "dx" and dtype in (torch.float16, torch.bfloat16)
                else KTOL[torch.float32 if acc == torch.float32 else dtype] * scale * n ** 0.5)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=atol, msg=lambda m: f"{layout} {name}: {m}")


def test_raw_ops_agree_with_coord_scale_backward():
    """coord_scale_grads is coord_scale_backward without dx: the same sums, bit for bit."""
    g = torch.Generator().manual_seed(1)
    for layout in ("nchw", "channels_last", "crop"):
        x, dy = _make((3, 70, 14, 14), torch.float32, layout, g), _make((3, 70, 14, 14), torch.float32, layout, g)
        a_h, a_w = torch.rand(3, 70, 14, generator=g), torch.rand(3, 70, 14, generator=g)
        _, want_h, want_w = torch.ops.fastattn_C.coord_scale_backward(dy, x, a_h, a_w)
        got_h, got_w = torch.ops.fastattn_C.coord_scale_grads(dy, x, a_h, a_w)
        assert torch.equal(got_h, want_h) and torch.equal(got_w, want_w), layout


def test_raw_op_errors():
    x = torch.randn(2, 3, 4, 5)
    a_h, a_w = torch.rand(2, 3, 4), torch.rand(2, 3, 5)
    grads, dx = torch.ops.fastattn_C.coord_scale_grads, torch.ops.fastattn_C.coord_backward_dx
    with pytest.raises(ValueError, match=r"coord_scale_grads: argument 'dy' must have the shape of 'x'"):
        grads(x[:, :, :3], x, a_h, a_w)
    with pytest.raises(TypeError, match=r"coord_scale_grads: argument 'dy' must have the dtype of 'x'"):
        grads(x.double(), x, a_h, a_w)
    with pytest.raises(ValueError, match=r"coord_backward_dx: argument 'dy' must be 4-D"):
        dx(x[0], a_h, a_w, a_h, a_w)
    with pytest.raises(ValueError, match=r"coord_backward_dx: argument 'a_w' must have shape \(B, C, W\) = \(2, 3, 5"):
        dx(x, a_h, a_h, a_h, a_w)
    with pytest.raises(TypeError, match=r"coord_backward_dx: argument 'dxh' must be BFloat16"):
        dx(x.bfloat16(), a_h, a_w, a_h, a_w.bfloat16())
    with pytest.raises(TypeError, match=r"coord_backward_dx: argument 'a_h' must be Float"):
        dx(x, a_h.double(), a_w, a_h, a_w)
    with pytest.raises(ValueError, match=r"coord_backward_dx: argument 'a_h' must be contiguous"):
        dx(x, torch.rand(2, 4, 3).transpose(1, 2), a_w, a_h, a_w)


# --- the module path


@pytest.mark.parametrize("shape", [(3, 32, 7, 9), (4, 64, 14, 14), (2, 16, 1, 13), (2, 24, 11, 1), (2, 40, 9, 70)],
                         ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_training_path_matches_reference(monkeypatch, shape, layout, dtype, tol, x_grad, train):
    """Output, x's gradient, every parameter's gradient and the BatchNorm's running statistics."""
    calls = _train_calls(monkeypatch)
    torch.manual_seed(sum(shape))
    C = shape[1]
    r = fastattn.reference.CoordinateAttention(C, reduction=4).to(dtype).train(train)
    f = fastattn.CoordinateAttention(C, reduction=4).to(dtype).train(train)
    f.load_state_dict(r.state_dict())
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check_training_step(r, f, x, tol, x_grad)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_training_path_low_precision(monkeypatch, dtype, layout):
    """fp16/bf16 x and parameters: every gradient at most 2x as far from the float64 answer as
    the reference module's in the same dtype, plus a small atol (DESIGN.md, Numerics)."""
    calls = _train_calls(monkeypatch)
    torch.manual_seed(0)
    r64 = fastattn.reference.CoordinateAttention(64, reduction=4).double()
    x64 = torch.randn(4, 64, 14, 14, dtype=torch.float64)
    dy64 = torch.randn_like(x64)
    results = []
    for m, x in ((r64, x64), (fastattn.reference.CoordinateAttention(64, reduction=4), None),
                 (fastattn.CoordinateAttention(64, reduction=4), None)):
        if x is None:
            m.load_state_dict(r64.state_dict())
            m = m.to(dtype)
            x = x64.to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.clone().requires_grad_()
        m(x).backward(dy64.to(x.dtype))
        results.append([x.grad] + [p.grad for p in m.parameters()])
    assert calls == [1]
    for want, ref, got in zip(*results):
        ref_err = (ref.double() - want).abs().max().item()
        got_err = (got.double() - want).abs().max().item()
        assert got_err <= 2 * ref_err + 1e-2 * max(1.0, want.abs().max().item()), (got_err, ref_err)


@pytest.mark.parametrize("dy_kind", ["expanded", "permuted", "channels_last"])
def test_training_path_any_dy_layout(monkeypatch, dy_kind):
    """y.sum().backward()'s stride-0 dy, a dy of another layout: the same gradients as the op path."""
    calls = _train_calls(monkeypatch)
    torch.manual_seed(0)
    f = fastattn.CoordinateAttention(32, reduction=4)
    x = torch.randn(3, 32, 7, 9)
    dy = {"expanded": torch.ones(()).expand(3, 32, 7, 9),
          "permuted": torch.randn(3, 9, 7, 32).permute(0, 3, 2, 1),
          "channels_last": torch.randn(3, 32, 7, 9).contiguous(memory_format=torch.channels_last)}[dy_kind]
    grads = []
    for fused in (True, False):
        f.zero_grad()
        xx = x.clone().requires_grad_()
        if not fused:
            monkeypatch.setattr(fastattn.CoordinateAttention, "train_fused", lambda self, x: False)
        f(xx).backward(dy)
        grads.append([xx.grad] + [p.grad.clone() for p in f.parameters()])
    assert calls == [1]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_path_conditions(monkeypatch):
    calls = _train_calls(monkeypatch)
    f = fastattn.CoordinateAttention(16, reduction=4)
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        f(x)                                                       # nothing to record
    f(x.transpose(2, 3).contiguous().transpose(2, 3)).sum()       # neither NCHW nor channels_last: op path
    f.requires_grad_(False)
    f(x)                                                           # no gradient anywhere
    f.requires_grad_(True)
    f.backend = "torch"
    f(x).sum().backward()
    f.backend = None
    handle = f.conv1.register_forward_hook(lambda *a: None)
    f(x).sum().backward()                                          # a hooked layer: op path
    handle.remove()
    f(torch.randn(0, 16, 5, 6)).sum().backward()                   # empty: op path
    assert not calls
    f(x).sum().backward()
    f(x.contiguous(memory_format=torch.channels_last)).sum().backward()
    assert calls == [1, 1]


def test_training_path_backward_twice_with_retain_graph(monkeypatch):
    calls = _train_calls(monkeypatch)
    torch.manual_seed(0)
    f = fastattn.CoordinateAttention(16, reduction=4)
    x = torch.randn(2, 16, 5, 6, requires_grad=True)
    dy = torch.randn_like(x)
    y = f(x)
    y.backward(dy, retain_graph=True)
    once = [x.grad.clone()] + [p.grad.clone() for p in f.parameters()]
    y.backward(dy)
    twice = [x.grad] + [p.grad for p in f.parameters()]
    assert calls == [1]
    for a, b in zip(once, twice):
        torch.testing.assert_close(b, 2 * a, rtol=1e-5, atol=1e-6)
