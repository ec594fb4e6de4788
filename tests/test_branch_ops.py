"""fastattn::branch_softmax_sum and ::branch_softmax_scale on the CPU (torch backend): math, gradcheck,
opcheck, errors, dispatch; backend="triton" on CUDA (gpu marker); the C++ kernels, backend="cpu" and
backend="cuda" (gpu marker), against float64 autograd and the torch backend."""
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
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run here: the CUDA C\+\+ kernels take CUDA"):
        branch_softmax_sum(F5, L3, backend="cuda")
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


# --------------------------------------------------------------------------------------------
# The C++ kernels of fastattn._C: backend="cpu" (OpenMP) and backend="cuda" (CUDA C++, gpu marker)
# --------------------------------------------------------------------------------------------

KERNEL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FEAT_LAYOUTS = ["nchw", "channels_last", "channel_slice", "permuted", "misaligned", "misaligned_cl"]
# (op, kwargs): the sum and the concatenation in both branch orders
OPS = [("sum", {}), ("scale", {"reverse": False}), ("scale", {"reverse": True})]
OP_IDS = ["sum", "scale", "scale_reversed"]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel(request):
    """The backend under test; skipped (with the reason) where fastattn._C lacks its kernels, except
    on a GPU machine, where a missing CUDA kernel is a failure."""
    from fastattn.ops import branch

    for checks in (branch.CHECKS, branch.CHECKS_SCALE):
        why = checks[request.param](torch.empty(0, device=request.param))
        if why and request.param == "cuda":
            pytest.fail(f"backend='cuda' cannot run on this GPU machine: {why}")
        if why:
            pytest.skip(why)
    return request.param


def make_feats(shape, dtype, layout, device, gen):
    """(B, K, C, H, W) branch features in one of the layouts the kernels handle."""
    B, K, C, H, W = shape
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    if layout in ("nchw", "channels_last"):
        maps = [rnd(B, C, H, W) for _ in range(K)]
        if layout == "channels_last":
            maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
        return torch.stack(maps, 1)
    if layout == "channel_slice":       # every other channel of a wider stack: not dense
        return rnd(B, K, 2 * C, H, W)[:, :, ::2]
    if layout == "permuted":            # H x W does not flatten: the generic path
        return rnd(B, K, C, W, H).transpose(3, 4)
    if layout == "misaligned":          # a dense NCHW stack one element off a 16-byte boundary
        return rnd(B * K * C * H * W + 1)[1:].view(B, K, C, H, W)
    if layout == "misaligned_cl":       # the same, channels innermost
        return rnd(B * K * C * H * W + 1)[1:].view(B, K, H, W, C).permute(0, 1, 4, 2, 3)
    raise ValueError(layout)


def apply(op, feats, logits, backend, kw):
    if op == "sum":
        return branch_softmax_sum(feats, logits, backend=backend)
    return branch_softmax_scale(feats, logits, backend=backend, **kw)


def run_op(op, feats, logits, dy, backend, kw):
    f, lg = feats.detach().requires_grad_(), logits.detach().clone().requires_grad_()
    y = apply(op, f, lg, backend, kw)
    y.backward(dy)
    return y.detach(), f.grad, lg.grad


def reference64(op, feats, logits, dy, kw):
    """(y, dfeats, dlogits) by float64 autograd of the plain formula."""
    f = feats.detach().double().cpu().requires_grad_()
    lg = logits.detach().double().cpu().requires_grad_()
    w = f * lg.softmax(1)[..., None, None]
    if op == "sum":
        y = w.sum(1)
    else:
        parts = list(w.unbind(1))
        y = torch.cat(parts[::-1] if kw["reverse"] else parts, 1)
    y.backward(dy.double().cpu())
    return y.detach(), f.grad, lg.grad


def check_close(got, same, want, dtype, what):
    """fp32/fp64: close to the float64 reference relative to its scale; fp16/bf16: at most twice as far
    from it as the torch backend in the same dtype (plus a hair)."""
    for name, g, s, r in zip(("y", "dfeats", "dlogits"), got, same, want):
        g, s = g.double().cpu(), s.double().cpu()
        scale = max(r.abs().max().item(), 1e-30)
        err = (g - r).abs().max().item() / scale
        if dtype in (torch.float32, torch.float64):
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            assert err <= tol, f"{what} {name}: error {err:.2e} x scale {scale:.2e}"
        else:
            base = (s - r).abs().max().item() / scale
            assert err <= 2 * base + 1e-5, f"{what} {name}: error {err:.2e}, torch backend's {base:.2e}"


def out_channels(op, K, C):
    return C if op == "sum" else K * C


@pytest.mark.parametrize("op,kw", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", FEAT_LAYOUTS)
def test_kernel_matches_reference(kernel, op, kw, dtype, layout):
    gen = torch.Generator().manual_seed(0)
    B, K, C, H, W = shape = (2, 3, 20, 13, 11)
    feats = make_feats(shape, dtype, layout, kernel, gen)
    logits = (torch.randn(B, K, C, generator=gen) * 2).to(kernel)      # float32 logits, any feats dtype
    if dtype == torch.float64:
        logits = logits.double()
    dy = torch.randn(B, out_channels(op, K, C), H, W, generator=gen).to(dtype).to(kernel)
    if feats.stride(2) == 1:
        dy = dy.contiguous(memory_format=torch.channels_last)
    got = run_op(op, feats, logits, dy, kernel, kw)
    same = run_op(op, feats, logits, dy, "torch", kw)
    check_close(got, same, reference64(op, feats, logits, dy, kw), dtype, f"{kernel} {op} {layout}")
    y, df, dl = got
    assert y.dtype == dtype and df.dtype == dtype and dl.dtype == logits.dtype
    assert y.stride() == same[0].stride()          # channels_last for a stack of channels_last maps
    dfo, _ = getattr(torch.ops.fastattn, f"branch_softmax_{op}_backward")(dy, feats, logits, *kw.values(), kernel)
    assert dfo.stride() == torch.empty_like(feats).stride()


# K = 1, 1 x 1 maps, C = 70 (not a multiple of 16), H x W crossing the 1024-position tiles, C over
# the 1024-channel tiles, few (b, c) jobs with many positions (split sums), empty tensors.
BRANCH_SHAPES = [(2, 2, 5, 1, 1), (1, 3, 70, 3, 3), (1, 1, 4, 13, 17), (2, 4, 17, 33, 35), (1, 2, 1100, 3, 3),
                 (1, 2, 3, 200, 200), (0, 2, 3, 4, 4), (2, 2, 0, 3, 3), (2, 2, 3, 0, 4)]


@pytest.mark.parametrize("op,kw", OPS, ids=OP_IDS)
@pytest.mark.parametrize("shape", BRANCH_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "permuted"])
def test_kernel_odd_shapes(kernel, op, kw, shape, layout):
    gen = torch.Generator().manual_seed(1)
    B, K, C, H, W = shape
    feats = make_feats(shape, torch.float32, layout, kernel, gen)
    logits = torch.randn(B, K, C, generator=gen).to(kernel)
    dy = torch.randn(B, out_channels(op, K, C), H, W, generator=gen).to(kernel)
    got = run_op(op, feats, logits, dy, kernel, kw)
    if feats.numel() == 0:
        assert got[0].shape == (B, out_channels(op, K, C), H, W) and got[1].shape == feats.shape
        assert not got[2].any()
        return
    check_close(got, run_op(op, feats, logits, dy, "torch", kw), reference64(op, feats, logits, dy, kw),
                torch.float32, f"{kernel} {op} {shape} {layout}")


@pytest.mark.parametrize("op,kw", OPS, ids=OP_IDS)
def test_kernel_dy_layouts(kernel, op, kw):
    """dy in the other memory format, and the expanded (stride 0) dy of y.sum().backward()."""
    gen = torch.Generator().manual_seed(2)
    B, K, C, H, W = shape = (2, 3, 6, 7, 5)
    logits = torch.randn(B, K, C, generator=gen).to(kernel)
    for layout in ("nchw", "channels_last"):
        feats = make_feats(shape, torch.float32, layout, kernel, gen)
        dy = torch.randn(B, out_channels(op, K, C), H, W, generator=gen).to(kernel)
        dys = {"nchw": dy.contiguous(), "channels_last": dy.contiguous(memory_format=torch.channels_last),
               "expanded": torch.ones(1, device=kernel).expand(dy.shape)}
        for name, d in dys.items():
            check_close(run_op(op, feats, logits, d, kernel, kw), run_op(op, feats, logits, d, "torch", kw),
                        reference64(op, feats, logits, d, kw), torch.float32, f"{op} {layout} / dy {name}")


@pytest.mark.parametrize("op,kw", OPS, ids=OP_IDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_kernel_gradcheck(kernel, op, kw, layout):
    gen = torch.Generator().manual_seed(3)
    feats = make_feats((2, 3, 4, 3, 5), torch.float64, layout, kernel, gen).requires_grad_()
    logits = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen).to(kernel).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, lg: apply(op, f, lg, kernel, kw), (feats, logits))


def test_kernel_opcheck(kernel):
    logits = torch.randn(2, 3, 4, device=kernel, requires_grad=True)
    gen = torch.Generator().manual_seed(4)
    for layout in ("nchw", "channels_last"):
        feats = make_feats((2, 3, 4, 3, 5), torch.float32, layout, kernel, gen).requires_grad_()
        torch.library.opcheck(torch.ops.fastattn.branch_softmax_sum.default, (feats, logits, kernel))
        torch.library.opcheck(torch.ops.fastattn.branch_softmax_sum_backward.default,
                              (torch.randn(2, 4, 3, 5, device=kernel), feats.detach(), logits.detach(), kernel))
        for reverse in (False, True):
            torch.library.opcheck(torch.ops.fastattn.branch_softmax_scale.default, (feats, logits, reverse, kernel))
            torch.library.opcheck(torch.ops.fastattn.branch_softmax_scale_backward.default,
                                  (torch.randn(2, 12, 3, 5, device=kernel), feats.detach(), logits.detach(), reverse,
                                   kernel))


def test_kernel_deterministic(kernel):
    """dlogits bitwise the same on every run and (CPU) whatever the number of threads, with the
    positions split across jobs ((1, 2, 3, 200, 200)) or not."""
    gen = torch.Generator().manual_seed(5)
    for shape in ((1, 2, 3, 200, 200), (4, 2, 64, 20, 20)):
        for layout in ("nchw", "channels_last"):
            feats = make_feats(shape, torch.float32, layout, kernel, gen)
            logits = torch.randn(shape[:3], generator=gen).to(kernel)
            dy = torch.randn(shape[0], shape[2], *shape[3:], generator=gen).to(kernel)
            threads = torch.get_num_threads()
            runs = []
            for n in ([1, 2, 3] if kernel == "cpu" else [threads] * 3):
                torch.set_num_threads(n)
                try:
                    runs.append(torch.ops.fastattn.branch_softmax_sum_backward(dy, feats, logits, kernel))
                finally:
                    torch.set_num_threads(threads)
            for other in runs[1:]:
                assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1]), f"{shape} {layout}"


def test_kernel_auto_and_explicit(kernel):
    from fastattn.ops import branch

    feats = torch.randn(1, 2, 3, 4, 4, device=kernel)
    if kernel == "cpu":
        assert _dispatch.resolve("branch_softmax_sum", feats, "auto", branch.CHECKS) == "cpu"
        assert _dispatch.resolve("branch_softmax_scale", feats, "auto", branch.CHECKS_SCALE) == "cpu"
    assert _dispatch.resolve("branch_softmax_sum", feats, kernel, branch.CHECKS) == kernel


def test_kernel_raw_op_checks(kernel):
    raw = torch.ops.fastattn_C
    feats = torch.randn(2, 3, 4, 5, 5, device=kernel)
    logits = torch.randn(2, 3, 4, device=kernel)
    with pytest.raises(ValueError, match=r"branch_softmax_sum: argument 'feats' must be 5-D"):
        raw.branch_softmax_sum(feats[0], logits)
    with pytest.raises(TypeError, match=r"argument 'feats' must be float32, float64, float16 or bfloat16"):
        raw.branch_softmax_sum(feats.int(), logits)
    with pytest.raises(TypeError, match=r"argument 'logits' must be Float"):
        raw.branch_softmax_sum(feats.half(), logits.half())
    with pytest.raises(ValueError, match=r"argument 'logits' must have shape \(B, K, C\)"):
        raw.branch_softmax_scale(feats, logits[:, :2], True)
    with pytest.raises(ValueError, match=r"argument 'logits' must be contiguous"):
        raw.branch_softmax_sum(feats, logits.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match=r"at least one branch"):
        raw.branch_softmax_sum(feats[:, :0], logits[:, :0])
    with pytest.raises(ValueError, match=r"branch_softmax_scale_backward: argument 'dy' must have shape"):
        raw.branch_softmax_scale_backward(torch.randn(2, 4, 5, 5, device=kernel), feats, logits, False)
    with pytest.raises(TypeError, match=r"branch_softmax_sum_backward: argument 'dy' must have the dtype"):
        raw.branch_softmax_sum_backward(torch.randn(2, 4, 5, 5, device=kernel).double(), feats, logits)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_kernel_large_shapes(layout):
    """SK-ResNet and EPSANet-like shapes, and a few-(b, c) shape that splits positions across blocks,
    against the torch backend."""
    from fastattn.ops import branch

    assert branch.CHECKS["cuda"](torch.empty(0, device="cuda")) is None
    gen = torch.Generator().manual_seed(6)
    for (op, kw), shape in ((OPS[0], (16, 2, 256, 56, 56)), (OPS[0], (32, 3, 512, 14, 14)),
                            (OPS[2], (32, 4, 32, 28, 28)), (OPS[0], (1, 2, 8, 300, 300))):
        B, K, C, H, W = shape
        feats = make_feats(shape, torch.float32, layout, "cuda", gen)
        logits = torch.randn(B, K, C, generator=gen).cuda()
        dy = torch.randn(B, out_channels(op, K, C), H, W, generator=gen).cuda()
        got, want = run_op(op, feats, logits, dy, "cuda", kw), run_op(op, feats, logits, dy, "torch", kw)
        for name, g, h in zip(("y", "dfeats", "dlogits"), got, want):
            scale = h.abs().max().item()
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{shape} {name}: {m}")
