"""fastattn::bin_mean on the compiled kernels: backend "cpu" (the OpenMP C++ kernels) and, on a GPU
machine, backend "cuda" (the CUDA C++ kernels; marked gpu).

Forward and gradient against float64 math written out bin by bin (independent of the kernels'
cell decomposition), against PyTorch's own error for 16-bit dtypes; NCHW, channels_last, channel
slices and a transposed plane; overlapping adaptive bins, clipped tiles, 1 x 1 and 1 x n maps,
C not a multiple of 16, many cells (small channel blocks), planes split across jobs."""
from __future__ import annotations

import math

import pytest
import torch

from fastattn.ops import _dispatch, bins
from fastattn.ops.bins import bin_grid, bin_mean

from test_pool_kernels import BACKENDS, DTYPES, LAYOUTS, _close, _device, _make, _ready

SPP = (1, 2, 4)
# (shape, levels, mode)
CASES = [
    ((2, 5, 6, 5), SPP, "adaptive"),             # overlapping bins on both axes
    ((1, 70, 13, 17), (1, 3, 6), "adaptive"),
    ((2, 3, 1, 6), SPP, "adaptive"),             # H = 1 < n: every row bin is the whole column
    ((3, 7, 1, 1), SPP, "adaptive"),
    ((2, 5, 10, 9), (4,), "tiles"),              # clipped border tiles
    ((2, 5, 7, 7), (7,), "tiles"),
    ((2, 5, 1, 6), (4,), "tiles"),
    ((1, 70, 5, 11), (3,), "tiles"),
]


def _ids(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _bounds(size, level, mode):
    if mode == "adaptive":
        return [(math.floor(i * size / level), math.ceil((i + 1) * size / level)) for i in range(level)]
    return [(i * level, min(i * level + level, size)) for i in range(math.ceil(size / level))]


def _bins64(x, levels, mode):
    B, C, H, W = x.shape
    cols = []
    for n in levels:
        for h0, h1 in _bounds(H, n, mode):
            for w0, w1 in _bounds(W, n, mode):
                cols.append(x[:, :, h0:h1, w0:w1].double().sum(dim=(2, 3)) / ((h1 - h0) * (w1 - w0)))
    return torch.stack(cols, 2)


def _grad64(dy, shape, levels, mode):
    B, C, H, W = shape
    dx = torch.zeros(shape, dtype=torch.float64)
    i = 0
    for n in levels:
        for h0, h1 in _bounds(H, n, mode):
            for w0, w1 in _bounds(W, n, mode):
                dx[:, :, h0:h1, w0:w1] += (dy[:, :, i].double() / ((h1 - h0) * (w1 - w0)))[:, :, None, None]
                i += 1
    return dx


def _n_bins(shape, levels, mode):
    return sum(nh * nw for nh, nw in bin_grid(shape[2], shape[3], levels, mode))


def _check(backend, shape, levels, mode, dtype, layout, seed=0):
    device = _device(backend)
    gen = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, layout, device, gen)
    N = _n_bins(shape, levels, mode)
    dy = torch.randn(*shape[:2], N, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    res = {}
    for b in (backend, "torch"):
        xg = x.detach().requires_grad_(True)
        y = bin_mean(xg, levels, mode=mode, backend=b)
        res[b] = (y, *torch.autograd.grad(y, xg, dy))
    y, dx = res[backend]
    assert y.dtype == dtype and y.shape == (*shape[:2], N) and y.is_contiguous()
    assert dx.dtype == dtype and dx.shape == x.shape
    _close(y.cpu(), _bins64(x.cpu(), levels, mode), res["torch"][0].cpu(), dtype, f"{layout} y")
    _close(dx.cpu(), _grad64(dy.cpu(), shape, levels, mode), res["torch"][1].cpu(), dtype, f"{layout} dx")


@pytest.mark.parametrize("backend", BACKENDS)
class TestBinMean:
    @pytest.mark.parametrize("shape,levels,mode", CASES, ids=_ids)
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_cases_fp32(self, backend, shape, levels, mode, layout):
        _ready(backend, bins.CHECKS)
        _check(backend, shape, levels, mode, torch.float32, layout)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("levels,mode", [(SPP, "adaptive"), ((4,), "tiles")], ids=_ids)
    def test_dtypes(self, backend, dtype, layout, levels, mode):
        _ready(backend, bins.CHECKS)
        _check(backend, (2, 19, 14, 15), levels, mode, dtype, layout)

    # many cells (tiles of 2: small channel blocks on the CPU, beyond the CUDA shared-memory cell
    # tables), C > 1024, a split plane (B * C small, H * W > 32768), long thin planes
    @pytest.mark.parametrize("shape,levels,mode", [
        ((2, 100, 40, 41), (2,), "tiles"), ((1, 1100, 3, 5), SPP, "adaptive"), ((1, 2, 190, 181), SPP, "adaptive"),
        ((1, 3, 3000, 3), (1, 2, 7), "adaptive"), ((2, 3, 2, 5000), (3,), "tiles"), ((2, 4, 56, 56), (1, 3, 5, 7),
                                                                                    "adaptive"),
    ], ids=_ids)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    def test_big_and_odd(self, backend, shape, levels, mode, layout):
        _ready(backend, bins.CHECKS)
        _check(backend, shape, levels, mode, torch.float32, layout)

    def test_empty(self, backend):
        _ready(backend, bins.CHECKS)
        for shape in [(0, 3, 4, 4), (2, 0, 4, 4)]:
            x = torch.randn(shape, device=_device(backend), requires_grad=True)
            for levels, mode, n in [(SPP, "adaptive", 21), ((3,), "tiles", 4)]:
                y = bin_mean(x, levels, mode=mode, backend=backend)
                assert y.shape == (*shape[:2], n)
                (dx,) = torch.autograd.grad(y.sum(), x)
                assert dx.shape == shape

    def test_deterministic(self, backend):
        _ready(backend, bins.CHECKS)
        for layout in ("nchw", "channels_last"):
            x = _make((1, 3, 190, 181), torch.float32, layout, _device(backend))
            runs = [bin_mean(x, SPP, mode="adaptive", backend=backend) for _ in range(3)]
            assert all(torch.equal(runs[0], r) for r in runs[1:])

    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
    def test_gradcheck_and_gradgradcheck(self, backend, layout):
        _ready(backend, bins.CHECKS)
        x = _make((2, 3, 6, 5), torch.float64, layout, _device(backend)).detach().requires_grad_(True)
        for levels, mode in [(SPP, "adaptive"), ((4,), "tiles")]:
            f = lambda t: bin_mean(t, levels, mode=mode, backend=backend)  # noqa: E731
            assert torch.autograd.gradcheck(f, (x,))
            assert torch.autograd.gradgradcheck(f, (x,))

    def test_opcheck(self, backend):
        _ready(backend, bins.CHECKS)
        device = _device(backend)
        x = torch.randn(2, 3, 6, 5, device=device)
        args = [(x, list(SPP), "adaptive"), (x.contiguous(memory_format=torch.channels_last), [4], "tiles"),
                (torch.randn(2, 3, 10, 9, dtype=torch.float64, device=device), [4], "tiles"),
                (torch.randn(2, 3, 7, 7, dtype=torch.bfloat16, device=device), [1, 3], "adaptive"),
                (torch.cat([x, x], 1)[:, ::2], list(SPP), "adaptive")]
        for xx, levels, mode in args:
            torch.library.opcheck(torch.ops.fastattn.bin_mean.default, (xx.requires_grad_(True), levels, mode, backend))
        op = torch.ops.fastattn.bin_mean_backward.default
        for cl in (False, True):
            torch.library.opcheck(op, (torch.randn(2, 3, 21, device=device), [2, 3, 6, 5], list(SPP), "adaptive", cl,
                                       backend))
            torch.library.opcheck(op, (torch.randn(2, 3, 9, device=device), [2, 3, 10, 9], [4], "tiles", cl, backend))


def _cpu_ready():
    return bins.CHECKS["cpu"](torch.empty(0))


cpu_only = pytest.mark.skipif(_cpu_ready() is not None, reason=str(_cpu_ready()))


@cpu_only
def test_auto_on_cpu_picks_the_cpp_kernels():
    assert _dispatch.resolve("bin_mean", torch.randn(1, 2, 3, 3), "auto", bins.CHECKS) == "cpu"


@cpu_only
def test_results_do_not_depend_on_the_thread_count():
    before = torch.get_num_threads()
    xs = [torch.randn(1, 3, 190, 181), torch.randn(1, 3, 190, 181).contiguous(memory_format=torch.channels_last)]
    res = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            res.append([torch.ops.fastattn_C.bin_mean(x, [1, 2, 4], "adaptive") for x in xs])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*res))


@cpu_only
@pytest.mark.parametrize("call,err,match", [
    (lambda C: C.bin_mean(torch.randn(2, 3, 4), [1], "adaptive"), ValueError, r"argument 'x' must be 4-D"),
    (lambda C: C.bin_mean(torch.ones(2, 3, 4, 4, dtype=torch.int32), [1], "adaptive"), TypeError,
     r"argument 'x' must be float32"),
    (lambda C: C.bin_mean(torch.randn(2, 3, 4, 4), [1], "max"), ValueError, r"argument 'mode' must be 'adaptive' or"),
    (lambda C: C.bin_mean(torch.randn(2, 3, 4, 4), [], "adaptive"), ValueError, r"argument 'levels' must be a non-empty"),
    (lambda C: C.bin_mean(torch.randn(2, 3, 4, 4), [2, 0], "adaptive"), ValueError, r"argument 'levels' must hold"),
    (lambda C: C.bin_mean(torch.randn(2, 3, 4, 4), [2, 3], "tiles"), ValueError, r"argument 'levels' must be one tile"),
    (lambda C: C.bin_mean(torch.randn(2, 3, 0, 4), [1], "adaptive"), ValueError, r"argument 'x' must have H >= 1"),
    (lambda C: C.bin_mean_backward(torch.randn(2, 3, 20), [2, 3, 6, 5], [1, 2, 4], "adaptive", False), ValueError,
     r"argument 'dy' must have shape \(B, C, N\) = \(2, 3, 21\)"),
    (lambda C: C.bin_mean_backward(torch.randn(2, 3, 21), [2, 3, 6], [1, 2, 4], "adaptive", False), ValueError,
     r"argument 'size' must be 4 sizes"),
    (lambda C: C.bin_mean_backward(torch.randn(2, 3, 21).int(), [2, 3, 6, 5], [1, 2, 4], "adaptive", False),
     TypeError, r"argument 'dy' must be float32"),
])
def test_raw_op_checks(call, err, match):
    with pytest.raises(err, match=match):
        call(torch.ops.fastattn_C)
