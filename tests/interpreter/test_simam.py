"""Triton SimAM kernels (TRITON_INTERPRET=1, CPU tensors) against the torch backend, float64 math
and autograd of the reference module."""
import pytest
import torch

from fastattn.kernels import simam as K
from fastattn.ops.simam import simam
from fastattn.reference.hybrid import SimAM

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SHAPES = [
    (1, 70, 7, 7),     # C crosses the channel blocks, 7 x 7
    (1, 3, 13, 17),    # odd everything, batch 1
    (2, 5, 1, 2),      # the smallest plane (n = 2)
    (1, 2, 65, 65),    # HW > 4096: NCHW walks the plane (two passes forward, three backward)
    (1, 66, 20, 20),   # channels_last walks the plane (16 x 512 > the one-tile limit), C crosses 64
]
DTYPE_IDS = lambda d: str(d)[6:]  # noqa: E731


def layouts(x):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "channel_slice", torch.cat([x, x], 1)[:, ::2]


def reference64(x, dy, e_lambda):
    """(y, dx) of the reference module by autograd, in float64 on the same (rounded) inputs."""
    x64 = x.detach().double().requires_grad_()
    y = SimAM(e_lambda)(x64)
    y.backward(dy.double())
    return y.detach(), x64.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=DTYPE_IDS)
def test_simam(shape, dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).mul(2).add(1).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    tol = TOL[dtype]
    for layout, x0 in layouts(base):
        res = {}
        for backend in ("triton", "torch"):
            x = x0.clone().requires_grad_()
            y = simam(x, 0.1, backend=backend)
            assert y.shape == shape and y.dtype == dtype
            if layout == "channels_last":
                assert y.is_contiguous(memory_format=torch.channels_last)
            y.backward(dy)
            if layout == "channels_last":
                assert x.grad.is_contiguous(memory_format=torch.channels_last)
            res[backend] = (y, x.grad)
        want_y, want_dx = reference64(x0, dy, 0.1)
        scale = want_y.abs().max().item()
        for backend in ("triton", "torch"):
            torch.testing.assert_close(res[backend][0].double(), want_y, rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"{layout} {backend} y: {m}")
            torch.testing.assert_close(res[backend][1].double(), want_dx, rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"{layout} {backend} dx: {m}")
        for got, other, name in zip(res["triton"], res["torch"], ("y", "dx")):
            torch.testing.assert_close(got.double(), other.double(), rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"{layout} {name} triton vs torch: {m}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("one_tile_max", [16, K._ONE_TILE_MAX], ids=["walked", "one_tile"])
def test_float64_kernels(layout, one_tile_max):
    """float64 runs the kernels in float64 (lambda split in two float32 halves): agreement to rounding,
    for both the one-tile and the walked-plane code paths (one_tile_max=16 forces walking)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 67, 6, 7, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    want_y, want_dx = reference64(x, dy, 1e-4)
    torch.testing.assert_close(K.simam_forward(x, 1e-4, one_tile_max=one_tile_max), want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K.simam_backward(dy, x, 1e-4, one_tile_max=one_tile_max), want_dx,
                               rtol=1e-10, atol=1e-10)


def test_walked_statistics_with_a_large_mean():
    """mean = 300 std: sum(x^2) - n mu^2 in fp32 would lose ~5e-3 of the variance; the per-tile
    (Chan) combination keeps it to rounding."""
    g = torch.Generator().manual_seed(2)
    x = (300.0 + torch.randn(1, 3, 16, 24, generator=g)).float()
    dy = torch.randn(x.shape, generator=g)
    want_y, want_dx = reference64(x, dy, 1e-4)
    for one_tile_max in (16, 64, K._ONE_TILE_MAX):
        torch.testing.assert_close(K.simam_forward(x, 1e-4, one_tile_max=one_tile_max).double(), want_y,
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(K.simam_backward(dy, x, 1e-4, one_tile_max=one_tile_max).double(), want_dx,
                                   rtol=0, atol=1e-4 * want_dx.abs().max().item())   # fp32 torch: 1.3e-5


def test_expanded_gradient():
    """dy may arrive as a broadcast view (stride 0)."""
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    simam(x, backend="triton").backward(torch.ones(1, 1, 1, 1).expand(2, 3, 4, 5))
    want = reference64(x, torch.ones(2, 3, 4, 5), 1e-4)[1]
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    for shape in ((0, 3, 4, 5), (2, 0, 4, 5)):
        x = torch.randn(shape, requires_grad=True)
        y = simam(x, backend="triton")
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape


def test_deterministic():
    x = torch.randn(1, 4, 70, 70, requires_grad=True)
    runs = []
    for _ in range(2):
        x.grad = None
        y = simam(x, backend="triton")
        y.square().sum().backward()
        runs.append((y.detach(), x.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "transposed"])
def test_opcheck_triton(layout):
    """The fake impls promise the strides the Triton path returns (transposed: a copied exotic view)."""
    x = torch.randn(2, 3, 4, 5)
    x = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
         "transposed": x.transpose(2, 3).contiguous().transpose(2, 3)}[layout].requires_grad_()
    torch.library.opcheck(torch.ops.fastattn.simam.default, (x, 0.1, "triton"))
    torch.library.opcheck(torch.ops.fastattn.simam_backward.default, (torch.randn(2, 3, 4, 5), x.detach(), 0.1,
                                                                      "triton"))
