"""Triton channel_scale kernels (TRITON_INTERPRET=1, CPU tensors) against the torch backend and float64 math."""
import pytest
import torch

from fastattn.ops.gate import channel_scale

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SHAPES = [(2, 70, 5, 7), (1, 3, 13, 17), (2, 5, 1, 1), (1, 2, 40, 33)]  # crosses BLOCK_C=64 and BLOCK_HW=1024


def layouts(x):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "channel_slice", torch.cat([x, x], 1)[:, ::2]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_forward_backward(shape, dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(dtype)
    a0 = torch.rand(shape[:2], generator=g)
    for layout, x0 in layouts(base):
        r0 = torch.randn(x0.shape, generator=g).to(dtype) if with_residual else None
        ins = [x0.clone().requires_grad_(), a0.clone().requires_grad_()]
        r = r0.clone().requires_grad_() if with_residual else None
        y = channel_scale(*ins, r, backend="triton")
        assert y.dtype == dtype and y.shape == shape
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=g).to(dtype)
        y.backward(dy)
        # float64 math on the same (rounded) inputs
        x64, a64 = x0.double(), a0.double()
        want = x64 * a64[:, :, None, None] + (r0.double() if with_residual else 0)
        tol = TOL[dtype]
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{layout} y: {m}")
        torch.testing.assert_close(ins[0].grad.double(), dy.double() * a64[:, :, None, None], rtol=tol, atol=tol)
        da = (dy.double() * x64).sum((2, 3))
        torch.testing.assert_close(ins[1].grad.double(), da, rtol=tol, atol=tol * shape[2] * shape[3] ** 0.5)
        if with_residual:
            assert torch.equal(r.grad, dy)


def test_expanded_gradient():
    """dy may arrive as a broadcast view (stride 0), e.g. from a mean's backward."""
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    a = torch.rand(2, 3, requires_grad=True)
    y = channel_scale(x, a, backend="triton")
    y.backward(torch.ones(1, 1, 1, 1).expand(2, 3, 4, 5))
    torch.testing.assert_close(x.grad, a.detach()[:, :, None, None].expand(2, 3, 4, 5))
    torch.testing.assert_close(a.grad, x.detach().sum((2, 3)))


def test_empty_batch():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    a = torch.rand(0, 3, requires_grad=True)
    y = channel_scale(x, a, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 3, 4, 4) and x.grad.shape == x.shape and a.grad.shape == a.shape


def test_deterministic_da():
    x = torch.randn(2, 8, 37, 41, requires_grad=True)
    a = torch.rand(2, 8, requires_grad=True)
    grads = []
    for _ in range(2):
        a.grad = None
        channel_scale(x, a, backend="triton").sum().backward()
        grads.append(a.grad.clone())
    assert torch.equal(grads[0], grads[1])


MODES = ["max", "add", "bam", "bam_sum"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(2, 70, 5, 7), (1, 3, 13, 17), (2, 20, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
def test_channel_spatial_gate(mode, shape, dtype):
    from fastattn.ops.gate import channel_spatial_gate

    g = torch.Generator().manual_seed(1)
    B, C, H, W = shape
    base = torch.randn(shape, generator=g).to(dtype)
    a0, s0 = torch.randn(B, C, generator=g), torch.randn(B, 1, H, W, generator=g)
    base[..., ::3] = 0                    # ties of max(x a, x s): x = 0, as after a ReLU ...
    a0[:, 0] = s0[:, 0, 0, -1]            # ... and a = s (channel 0, last column)
    for layout, x0 in layouts(base):
        got, want = [], []
        for backend, out in (("triton", got), ("torch", want)):
            x, a, s = (t.clone().requires_grad_() for t in (x0, a0, s0))
            y = channel_spatial_gate(x, a, s, mode, backend=backend)
            y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(dtype))
            out += [y, x.grad, a.grad, s.grad]
        tol = TOL[dtype]
        for name, p, q in zip(("y", "dx", "da", "ds"), got, want):
            assert p.dtype == q.dtype and p.shape == q.shape
            scale = max(1.0, q.abs().max().item())
            torch.testing.assert_close(p.double(), q.double(), rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"{layout} {name}: {m}")
        if layout == "channels_last":
            assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 70, 5, 7), (1, 3, 40, 33), (2, 5, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
def test_channel_affine_gate(shape, dtype):
    from fastattn.ops.gate import channel_affine_gate

    g = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=g).to(dtype)
    al0, be0 = torch.randn(shape[:2], generator=g), torch.randn(shape[:2], generator=g)
    dy = torch.randn(shape, generator=g).to(dtype)
    for layout, x0 in layouts(base):
        got, want = [], []
        for backend, out in (("triton", got), ("torch", want)):
            x, al, be = (t.clone().requires_grad_() for t in (x0, al0, be0))
            y = channel_affine_gate(x, al, be, backend=backend)
            y.backward(dy)
            out += [y, x.grad, al.grad, be.grad]
        tol = TOL[dtype]
        for name, p, q in zip(("y", "dx", "dalpha", "dbeta"), got, want):
            scale = max(1.0, q.abs().max().item())
            torch.testing.assert_close(p.double(), q.double(), rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"{layout} {name}: {m}")


def test_opcheck_triton_on_a_plane_that_does_not_flatten():
    """A dense x whose H x W cannot be flattened is copied for the kernel; the output must still
    have the strides the fake implementation promises (those of empty_like(x))."""
    from fastattn.ops.gate import channel_affine_gate, channel_spatial_gate  # noqa: F401

    x = torch.randn(2, 3, 4, 5).transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    a, s = torch.rand(2, 3, requires_grad=True), torch.rand(2, 1, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.fastattn.channel_scale.default, (x, a, None, "triton"))
    torch.library.opcheck(torch.ops.fastattn.channel_spatial_gate.default, (x, a, s, "bam", "triton"))
    torch.library.opcheck(torch.ops.fastattn.channel_affine_gate.default, (x, a, a.detach().clone(), "triton"))
