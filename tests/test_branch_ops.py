"""fastattn::branch_softmax_sum and ::branch_softmax_scale on the CPU (torch backend): math, gradcheck,
opcheck, errors, dispatch; and backend="triton" on CUDA (gpu marker)."""
import pytest
import torch
import torch.nn.functional as F

from fastattn.ops import _dispatch
from fastattn.ops.branch import branch_softmax_scale, branch_softmax_sum
from fastattn.reference.channel import PyramidSplitAttention, SelectiveKernel


def math64(feats, logits):
    """Independent float64 math: explicit softmax over the branches, then the weighted sum."""
    e = (logits.double() - logits.double().amax(1, keepdim=True)).exp()
    a = e / e.sum(1, keepdim=True)
    return sum(a[:, k, :, None, None] * feats[:, k].double() for k in range(feats.shape[1]))


def stacked(B, K, C, H, W, layout, dtype=torch.float64):
    maps = [torch.randn(B, C, H, W, dtype=dtype) for _ in range(K)]
    if layout == "channels_last":
        maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
    feats = torch.stack(maps, 1)
    if layout == "channel_slice":
        feats = torch.stack([feats, feats], 3).flatten(2, 3)[:, :, ::2]
    return feats


@pytest.mark.parametrize("shape", [(2, 2, 6, 5, 7), (1, 3, 70, 3, 3), (2, 2, 5, 1, 1), (1, 1, 4, 13, 17)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_math_and_format(shape, layout):
    feats = stacked(*shape, layout)
    logits = torch.randn(*shape[:3], dtype=torch.float64) * 3
    y = branch_softmax_sum(feats, logits)
    torch.testing.assert_close(y, math64(feats, logits), rtol=1e-12, atol=1e-12)
    C, H, W = shape[2:]
    cl = layout == "channels_last" and C > 1 and H * W > 1
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def test_matches_selective_kernel():
    """Fed with SK's branch maps and attention logits, the op reproduces SelectiveKernel.forward."""
    torch.manual_seed(0)
    sk = SelectiveKernel(32, branches=3, groups=4, min_dim=8).eval()
    x = torch.randn(2, 32, 7, 9)
    with torch.no_grad():
        feats = torch.stack([p(x) for p in sk.paths], 1)
        s = feats.sum(1).mean((2, 3), keepdim=True)
        logits = sk.attn.fc_select(F.relu(sk.attn.bn(sk.attn.fc_reduce(s)))).view(2, 3, 32)
        torch.testing.assert_close(branch_softmax_sum(feats, logits), sk(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_gradcheck(layout):
    feats = stacked(2, 3, 4, 3, 5, layout).requires_grad_()
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, lg: branch_softmax_sum(f, lg, backend="torch"), (feats, logits))


def test_gradients_match_autograd():
    feats = stacked(2, 3, 5, 4, 4, "channels_last").requires_grad_()
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    want = torch.autograd.grad((feats * logits.softmax(1)[..., None, None]).sum(1), (feats, logits), dy)
    got = torch.autograd.grad(branch_softmax_sum(feats, logits), (feats, logits), dy)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)
    assert got[0].stride() == feats.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    feats = stacked(2, 2, 8, 5, 5, "channels_last", dtype).requires_grad_()
    logits = torch.randn(2, 2, 8, requires_grad=True)        # float32 logits with 16-bit maps
    y = branch_softmax_sum(feats, logits)
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.double(), math64(feats.detach(), logits.detach()), rtol=tol, atol=tol)
    y.float().sum().backward()
    assert feats.grad.dtype == dtype and logits.grad.dtype == torch.float32


def test_empty_batch():
    feats = torch.randn(0, 2, 3, 4, 4, requires_grad=True)
    logits = torch.randn(0, 2, 3, requires_grad=True)
    y = branch_softmax_sum(feats, logits)
    y.sum().backward()
    assert y.shape == (0, 3, 4, 4) and feats.grad.shape == feats.shape


def test_opcheck():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    for layout in ("nchw", "channels_last", "channel_slice"):
        feats = stacked(2, 3, 4, 3, 5, layout, torch.float32).requires_grad_()
        torch.library.opcheck(torch.ops.fastattn.branch_softmax_sum.default, (feats, logits, "torch"))
        dy = torch.randn(2, 4, 3, 5)
        torch.library.opcheck(torch.ops.fastattn.branch_softmax_sum_backward.default,
                              (dy, feats.detach(), logits.detach(), "torch"))


def test_compile_fullgraph():
    def f(feats, logits):
        return branch_softmax_sum(feats, logits) + 1

    feats, logits = stacked(2, 2, 4, 5, 5, "channels_last", torch.float32), torch.randn(2, 2, 4)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(feats, logits), f(feats, logits))


F5 = torch.randn(2, 3, 4, 5, 5)
L3 = torch.randn(2, 3, 4)


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.randn(2, 4, 5, 5), L3), {}, ValueError, r"branch_softmax_sum: argument 'feats' must be 5-D"),
    ((F5, torch.randn(2, 12)), {}, ValueError, r"argument 'logits' must be 3-D"),
    ((F5, torch.randn(2, 4, 3)), {}, ValueError, r"argument 'logits' must have shape \(B, K, C\)"),
    ((F5.long(), L3), {}, TypeError, r"argument 'feats' must be a floating"),
    ((F5, L3.long()), {}, TypeError, r"argument 'logits' must be a floating"),
    (([F5[:, 0], F5[:, 1]], L3), {}, TypeError, r"argument 'feats' must be a torch.Tensor"),
    ((torch.randn(2, 0, 4, 5, 5), torch.randn(2, 0, 4)), {}, ValueError, r"argument 'feats' must have at least one"),
    ((F5, L3), {"backend": "fast"}, ValueError, r"argument 'backend' must be one of"),
])
def test_bad_arguments(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        branch_softmax_sum(*args, **kwargs)


def test_explicit_backend_that_cannot_run_says_why():
    if _dispatch.triton_interpreting():
        pytest.skip("interpreter on")
    with pytest.raises(RuntimeError, match=r"branch_softmax_sum: backend='triton' cannot run here: "
                                           r".*(CUDA tensors|not installed)"):
        branch_softmax_sum(F5, L3, backend="triton")
    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run here"):
        branch_softmax_sum(F5, L3, backend="cpu")
    assert branch_softmax_sum(F5, L3, backend="auto").shape == (2, 4, 5, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 2, 256, 56, 56), (32, 3, 512, 14, 14), (8, 4, 64, 28, 28)], ids=str)
def test_triton_on_cuda(shape, dtype, layout):
    """SK-ResNet-like shapes against the torch backend."""
    B, K, C, H, W = shape
    maps = [torch.randn(B, C, H, W, device="cuda").to(dtype) for _ in range(K)]
    if layout == "channels_last":
        maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
    feats = torch.stack(maps, 1)
    logits = torch.randn(B, K, C, device="cuda")
    dy = torch.randn(B, C, H, W, device="cuda").to(dtype)
    outs = []
    for backend in ("triton", "torch"):
        f, lg = feats.clone().requires_grad_(), logits.clone().requires_grad_()
        y = branch_softmax_sum(f, lg, backend=backend)
        y.backward(dy)
        outs.append((y.detach(), f.grad, lg.grad))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(*outs):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)
    assert outs[0][0].stride() == outs[1][0].stride() and outs[0][1].stride() == feats.stride()


# --------------------------------------------------------------------------------------------
# branch_softmax_scale: the weighted branches concatenated on channels (PyramidSplitAttention)
# --------------------------------------------------------------------------------------------


def scale64(feats, logits, reverse):
    a = logits.double().softmax(1)
    w = [a[:, k, :, None, None] * feats[:, k].double() for k in range(feats.shape[1])]
    return torch.cat(w[::-1] if reverse else w, 1)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 6, 5, 7), (1, 2, 3, 1, 1), (2, 1, 5, 3, 3)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_scale_math_and_format(shape, layout, reverse):
    feats = stacked(*shape, layout)
    logits = torch.randn(*shape[:3], dtype=torch.float64) * 3
    y = branch_softmax_scale(feats, logits, reverse=reverse)
    torch.testing.assert_close(y, scale64(feats, logits, reverse), rtol=1e-12, atol=1e-12)
    B, K, C, H, W = shape
    cl = layout == "channels_last" and K * C > 1 and H * W > 1
    assert y.shape == (B, K * C, H, W)
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def test_scale_matches_pyramid_split_attention():
    """Fed with PSA's branch maps and SE weights, reverse=True reproduces PyramidSplitAttention.forward."""
    torch.manual_seed(0)
    psa = PyramidSplitAttention(16, 64, conv_groups=(1, 2, 4, 8)).eval()
    x = torch.randn(2, 16, 7, 9)
    with torch.no_grad():
        maps = [getattr(psa, f"conv_{i + 1}")(x) for i in range(4)]
        logits = torch.stack([psa.se(m) for m in maps], 1).flatten(2)       # (B, 4, 16)
        torch.testing.assert_close(branch_softmax_scale(torch.stack(maps, 1), logits, reverse=True), psa(x),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_scale_gradcheck(layout, reverse):
    feats = stacked(2, 3, 4, 3, 5, layout).requires_grad_()
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, lg: branch_softmax_scale(f, lg, reverse=reverse, backend="torch"),
                                    (feats, logits))


def test_scale_opcheck():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    for layout in ("nchw", "channels_last"):
        feats = stacked(2, 3, 4, 3, 5, layout, torch.float32).requires_grad_()
        for reverse in (False, True):
            torch.library.opcheck(torch.ops.fastattn.branch_softmax_scale.default, (feats, logits, reverse, "torch"))
            dy = torch.randn(2, 12, 3, 5)
            torch.library.opcheck(torch.ops.fastattn.branch_softmax_scale_backward.default,
                                  (dy, feats.detach(), logits.detach(), reverse, "torch"))


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.randn(2, 4, 5, 5), L3), {}, ValueError, r"branch_softmax_scale: argument 'feats' must be 5-D"),
    ((F5, torch.randn(2, 4, 3)), {}, ValueError, r"branch_softmax_scale: argument 'logits' must have shape"),
    ((F5, L3), {"reverse": 1}, TypeError, r"branch_softmax_scale: argument 'reverse' must be a bool"),
])
def test_scale_bad_arguments(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        branch_softmax_scale(*args, **kwargs)


def test_scale_triton_on_cpu_says_why():
    if _dispatch.triton_interpreting():
        pytest.skip("interpreter on")
    with pytest.raises(RuntimeError, match=r"branch_softmax_scale: backend='triton' cannot run here"):
        branch_softmax_scale(F5, L3, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_triton_on_cuda(dtype, layout):
    """EPSANet-50 stage-2-like shape: 4 branches of 32 channels, 28 x 28."""
    B, K, C, H, W = 32, 4, 32, 28, 28
    maps = [torch.randn(B, C, H, W, device="cuda").to(dtype) for _ in range(K)]
    if layout == "channels_last":
        maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
    feats = torch.stack(maps, 1)
    logits = torch.rand(B, K, C, device="cuda")
    dy = torch.randn(B, K * C, H, W, device="cuda").to(dtype)
    outs = []
    for backend in ("triton", "torch"):
        f, lg = feats.clone().requires_grad_(), logits.clone().requires_grad_()
        y = branch_softmax_scale(f, lg, reverse=True, backend=backend)
        y.backward(dy)
        outs.append((y.detach(), f.grad, lg.grad))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(*outs):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())
