"""Triton branch_softmax_sum / branch_softmax_scale kernels (TRITON_INTERPRET=1, CPU tensors) against the
torch backend and float64 math."""
import pytest
import torch

import fastattn.kernels.branch as branch_kernels
from fastattn.ops.branch import branch_softmax_scale, branch_softmax_sum

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (B, K, C, H, W): C = 70 crosses BLOCK_C = 64 (channels_last), 40 x 33 > 1024 positions (NCHW),
# 1 x 1 planes, batch 1, K = 1 and K = 3 (BLOCK_K = 4 with a masked branch).
SHAPES = [(2, 2, 6, 5, 7), (1, 3, 70, 3, 3), (2, 2, 5, 1, 1), (1, 2, 3, 40, 33), (1, 1, 4, 13, 17)]


def layouts(maps):
    """K (B, C, H, W) maps -> (B, K, C, H, W) feats in the ways a caller builds them (all equal)."""
    yield "stack_nchw", torch.stack(maps, 1)
    yield "stack_channels_last", torch.stack([m.contiguous(memory_format=torch.channels_last) for m in maps], 1)
    wide = torch.stack(maps, 1)
    yield "channel_slice", torch.stack([wide, wide], 3).flatten(2, 3)[:, :, ::2]   # channel stride 2 * H * W
    yield "transposed_plane", torch.stack([m.transpose(2, 3).contiguous() for m in maps], 1).transpose(3, 4)


def math64(feats, logits, dy, reverse=None):
    """float64 autograd of the sum (reverse None) or of the reversed / plain concatenation."""
    f = feats.detach().double().requires_grad_()
    lg = logits.detach().double().requires_grad_()
    w = f * lg.softmax(1)[..., None, None]
    y = w.sum(1) if reverse is None else (w.flip(1) if reverse else w).flatten(1, 2)
    return y.detach(), torch.autograd.grad(y, (f, lg), dy.double())


def run(feats, logits, dy, backend, reverse=None):
    f, lg = feats.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    # clone() keeps the strides of dense tensors; restore views exactly for the non-dense ones
    if f.stride() != feats.stride():
        f = feats.detach().requires_grad_()
    if reverse is None:
        y = branch_softmax_sum(f, lg, backend=backend)
    else:
        y = branch_softmax_scale(f, lg, reverse=reverse, backend=backend)
    y.backward(dy)
    return y.detach(), (f.grad, lg.grad), f


def check(shape, dtype, reverse=None):
    B, K, C, H, W = shape
    out_c = C if reverse is None else K * C
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(B, C, H, W, generator=g).to(dtype) for _ in range(K)]
    logits = (torch.randn(B, K, C, generator=g) * 2).to(torch.float64 if dtype == torch.float64 else torch.float32)
    dy = torch.randn(B, out_c, H, W, generator=g).to(dtype)
    tol = TOL.get(dtype, 1e-12)
    for layout, feats in layouts(maps):
        y, grads, f = run(feats, logits, dy, "triton", reverse)
        y_t, grads_t, _ = run(feats, logits, dy, "torch", reverse)
        y64, grads64 = math64(feats, logits, dy, reverse)
        assert y.dtype == dtype and y.shape == (B, out_c, H, W) and y.stride() == y_t.stride()
        if layout == "stack_channels_last" and out_c > 1 and H * W > 1:
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].stride() == grads_t[0].stride() == torch.empty_like(f).stride()
        for name, got, mine, want in zip(("y", "dfeats", "dlogits"), (y, *grads), (y_t, *grads_t), (y64, *grads64)):
            assert got.dtype == mine.dtype
            scale = 1 + want.abs().max().item()
            err, err_t = ((t.double() - want).abs().max().item() for t in (got, mine))
            assert err <= tol * scale, f"{layout} {name}: {err}"
            # no further from float64 than twice the torch backend's error, plus a few roundings
            assert err <= 2 * err_t + 8 * torch.finfo(got.dtype).eps * scale, f"{layout} {name}: {err} vs {err_t}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
def test_forward_backward(shape, dtype):
    check(shape, dtype)


@pytest.mark.parametrize("shape", [(2, 3, 20, 3, 5), (1, 2, 3, 9, 11)], ids=str)
def test_small_tiles(shape, monkeypatch):
    """Tiles of a few elements: many blocks of channels and positions, several HW splits per program."""
    monkeypatch.setattr(branch_kernels, "TILE", 64)
    monkeypatch.setattr(branch_kernels, "TILE_BWD", 32)
    check(shape, torch.float32)


def test_float64_exact():
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 7, 5, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    dy = torch.randn(2, 7, 5, 6, generator=g, dtype=torch.float64)
    for layout, feats in layouts(maps):
        y, grads, _ = run(feats, logits, dy, "triton")
        y64, grads64 = math64(feats, logits, dy)
        torch.testing.assert_close(y, y64, rtol=1e-13, atol=1e-13, msg=lambda m: f"{layout}: {m}")
        for got, want in zip(grads, grads64):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13, msg=lambda m: f"{layout}: {m}")


def test_expanded_gradient():
    """dy may arrive as a broadcast view (stride 0)."""
    feats = torch.randn(2, 2, 3, 4, 5)
    logits = torch.randn(2, 2, 3)
    dy = torch.ones(1, 1, 1, 1).expand(2, 3, 4, 5)
    _, grads, _ = run(feats, logits, dy, "triton")
    _, grads_t, _ = run(feats, logits, dy, "torch")
    for got, want in zip(grads, grads_t):
        torch.testing.assert_close(got, want)


def test_empty_batch():
    feats = torch.randn(0, 2, 3, 4, 4, requires_grad=True)
    logits = torch.randn(0, 2, 3, requires_grad=True)
    y = branch_softmax_sum(feats, logits, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 3, 4, 4) and feats.grad.shape == feats.shape and logits.grad.shape == logits.shape


def test_deterministic(monkeypatch):
    monkeypatch.setattr(branch_kernels, "TILE_BWD", 256)
    feats = torch.randn(1, 2, 3, 29, 31)
    logits = torch.randn(1, 2, 3)
    dy = torch.randn(1, 3, 29, 31)
    first = run(feats, logits, dy, "triton")[1][1]
    assert torch.equal(first, run(feats, logits, dy, "triton")[1][1])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 6, 5, 7), (1, 3, 70, 3, 3), (2, 2, 5, 1, 1), (1, 2, 3, 40, 33)], ids=str)
@pytest.mark.parametrize("dtype", list(TOL) + [torch.float64], ids=lambda d: str(d)[6:])
def test_scale(shape, dtype, reverse):
    check(shape, dtype, reverse)


def test_scale_small_tiles(monkeypatch):
    monkeypatch.setattr(branch_kernels, "TILE", 64)
    monkeypatch.setattr(branch_kernels, "TILE_BWD", 32)
    check((2, 3, 20, 3, 5), torch.float32, True)
    check((1, 2, 3, 9, 11), torch.float32, False)
