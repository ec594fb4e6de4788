"""fastattn::channel_pool and fastattn::dct_pool on the compiled kernels: backend "cpu" (the OpenMP
C++ kernels) and, on a GPU machine, backend "cuda" (the CUDA C++ kernels; marked gpu).

Every result is checked against float64 math written out here (forward and every gradient), and,
for 16-bit dtypes, against PyTorch's own error in the same dtype: the kernel may be at most twice as
far from the float64 answer as the torch backend, plus half an ulp of the answer's scale. Layouts:
NCHW, channels_last, channel slices of both (not dense) and a transposed plane (the generic path);
shapes with odd sizes, 1 x 1 maps, C not a multiple of 16, and sizes that cross the kernels' chunk,
split and block boundaries."""
from __future__ import annotations

import math

import pytest
import torch

from fastattn import _ext
from fastattn.ops import _dispatch, pool
from fastattn.ops.pool import channel_pool, dct_pool

BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "slice", "slice_cl", "permuted"]
ALL = ("mean", "max", "std")


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _ready(backend: str, checks) -> None:
    """Skip (CPU: extension not built) or fail (GPU machine without the CUDA kernels) with the reason."""
    why = checks[backend](torch.empty(0, device=_device(backend)))
    if why is not None:
        if backend == "cuda":
            pytest.fail(f"backend 'cuda' should run on a GPU machine: {why}")
        pytest.skip(why)


def _make(shape, dtype, layout, device, gen=None):
    """A (B, C, H, W) tensor of `layout` holding random values (rounded to dtype)."""
    B, C, H, W = shape

    def rnd(*s):
        return torch.randn(*s, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)

    if layout == "slice":          # channels 1..C of a wider NCHW tensor: planes contiguous, not dense
        return rnd(B, C + 3, H, W)[:, 1:C + 1]
    if layout == "slice_cl":       # channels 2..C+1 of a wider channels_last tensor
        return rnd(B, C + 3, H, W).contiguous(memory_format=torch.channels_last)[:, 2:C + 2]
    if layout == "permuted":       # (B, C, W, H) storage seen transposed: neither layout
        return rnd(B, C, W, H).transpose(2, 3)
    x = rnd(B, C, H, W)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _close(got, want64, torch_res, dtype, what=""):
    """got vs the float64 answer: fp32/fp64 to a relative 1e-5 / 1e-12 of the answer's scale;
    16-bit: at most twice PyTorch's own error in that dtype plus half an ulp of the scale."""
    got, want64 = got.double(), want64.double()
    assert got.shape == want64.shape, (what, got.shape, want64.shape)
    if got.numel() == 0:
        return
    finite = torch.isfinite(want64)
    assert torch.equal(finite, torch.isfinite(got)), what
    got, want64 = got[finite], want64[finite]
    if got.numel() == 0:
        return
    err = (got - want64).abs().max().item()
    scale = want64.abs().max().item()
    if dtype in (torch.float32, torch.float64):
        tol = (1e-5 if dtype == torch.float32 else 1e-12) * (1 + scale)
        assert err <= tol, f"{what}: error {err:.3e} > {tol:.3e}"
        return
    ref_err = (torch_res.double()[finite] - want64).abs().max().item()
    tol = 2 * ref_err + 0.5 * torch.finfo(dtype).eps * scale + 1e-6 * (1 + scale)
    assert err <= tol, f"{what}: error {err:.3e} > {tol:.3e} (torch's own: {ref_err:.3e})"


# ------------------------------------------------------------------------------------------------
# channel_pool
# ------------------------------------------------------------------------------------------------


def _pool64(x, kinds, eps):
    """float64 statistics of every plane (mean, max, first argmax, unbiased std)."""
    flat = x.double().flatten(2)
    HW = flat.shape[2]
    out = {"mean": flat.mean(2)}
    if "max" in kinds:
        mx = flat.amax(2)
        out["max"] = mx
        first = (flat == mx[:, :, None]) | (flat.isnan() & mx.isnan()[:, :, None])
        out["argmax"] = first.to(torch.float32).argmax(2)      # the first position holding the max
    if "std" in kinds:
        out["std"] = ((flat - out["mean"][:, :, None]).pow(2).sum(2) / (HW - 1) + eps).sqrt()
    return out


def _pool_grad64(x, stats, d, kinds):
    """dx of the pooled statistics for the cotangents d (one (B, C) per kind), in float64."""
    B, C, H, W = x.shape
    HW = H * W
    flat = x.double().flatten(2)
    dx = torch.zeros_like(flat)
    g = dict(zip(kinds, (t.double() for t in d)))
    if "mean" in g:
        dx += g["mean"][:, :, None] / HW
    if "std" in g:
        dx += g["std"][:, :, None] * (flat - stats["mean"][:, :, None]) / ((HW - 1) * stats["std"][:, :, None])
    if "max" in g:
        dx.scatter_add_(2, stats["argmax"][:, :, None], g["max"][:, :, None])
    return dx.view(B, C, H, W)


def _run_pool(x, kinds, eps, backend, d):
    """(outputs, dx) of channel_pool on backend, with cotangents d."""
    xg = x.detach().requires_grad_(True)
    outs = channel_pool(xg, kinds, eps=eps, backend=backend)
    (dx,) = torch.autograd.grad(outs, xg, d)
    return outs, dx


def _check_pool(backend, shape, dtype, layout, kinds=ALL, eps=1e-5, seed=0):
    device = _device(backend)
    gen = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, layout, device, gen)
    d = [torch.randn(shape[:2], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for _ in kinds]
    outs, dx = _run_pool(x, kinds, eps, backend, d)
    ref_outs, ref_dx = _run_pool(x, kinds, eps, "torch", d)
    stats = _pool64(x.cpu(), kinds, eps)
    for k, o, r in zip(kinds, outs, ref_outs):
        assert o.dtype == dtype and o.shape == shape[:2] and o.device.type == device
        if k == "max":            # a max is exact in any dtype
            assert torch.equal(o.cpu().double(), stats["max"]), f"{layout} max"
        else:
            _close(o.cpu(), stats[k], r.cpu(), dtype, f"{layout} {k}")
    assert dx.dtype == dtype and dx.shape == x.shape
    _close(dx.cpu(), _pool_grad64(x.cpu(), stats, [t.cpu() for t in d], kinds), ref_dx.cpu(), dtype, f"{layout} dx")
    if "max" in kinds:            # the raw outputs carry the first argmax
        raw = torch.ops.fastattn.channel_pool.default(x, list(kinds), eps, backend)
        assert torch.equal(raw[len(kinds)].cpu(), stats["argmax"]), f"{layout} argmax"


@pytest.mark.parametrize("backend", BACKENDS)
class TestChannelPool:
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_all_kinds(self, backend, dtype, layout):
        _ready(backend, pool.CHECKS)
        _check_pool(backend, (2, 70, 13, 17), dtype, layout)

    @pytest.mark.parametrize("kinds", [("mean",), ("max",), ("std",), ("std", "mean"), ("max", "mean"),
                                       ("std", "max")], ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "permuted"])
    def test_subsets_of_kinds(self, backend, kinds, layout):
        _ready(backend, pool.CHECKS)
        _check_pool(backend, (3, 5, 6, 7), torch.float32, layout, kinds)

    # 1 x 1 and 1 x n maps, odd sizes, C > 1024 (two channel blocks), planes that cross the fp32
    # chunk (4096), split planes (B * C small, H * W > 32768), batch 1
    @pytest.mark.parametrize("shape", [(3, 5, 1, 1), (2, 3, 1, 9), (2, 4, 11, 1), (1, 1, 7, 7), (2, 1100, 3, 2),
                                       (1, 3, 71, 67), (1, 2, 190, 181), (4, 17, 5, 3)], ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice_cl"])
    def test_odd_shapes(self, backend, shape, layout):
        _ready(backend, pool.CHECKS)
        kinds = ALL if shape[2] * shape[3] >= 2 else ("mean", "max")
        _check_pool(backend, shape, torch.float32, layout, kinds)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
    def test_split_planes_low_precision(self, backend, dtype):
        _ready(backend, pool.CHECKS)
        for layout in ("nchw", "channels_last"):
            _check_pool(backend, (1, 3, 150, 230), dtype, layout)

    def test_empty(self, backend):
        _ready(backend, pool.CHECKS)
        device = _device(backend)
        for shape in [(0, 3, 4, 4), (2, 0, 4, 4)]:
            x = torch.randn(shape, device=device, requires_grad=True)
            outs = channel_pool(x, ALL, backend=backend)
            assert [o.shape for o in outs] == [shape[:2]] * 3
            sum(o.sum() for o in outs).backward()
            assert x.grad.shape == shape
        x = torch.randn(2, 3, 0, 4, device=device)      # mean of an empty plane: NaN, as torch
        (m,) = channel_pool(x, ("mean",), backend=backend)
        assert m.shape == (2, 3) and torch.isnan(m).all()

    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "permuted"])
    def test_max_ties_nan_and_minus_inf(self, backend, layout):
        """The first maximum wins across chunks and splits; a NaN beats any number (the first NaN);
        a plane of -inf has its max -inf at 0."""
        _ready(backend, pool.CHECKS)
        device = _device(backend)
        B, C, H, W = 2, 3, 150, 230                    # 34500 positions: chunks and splits
        x = torch.randn(B, C, H, W, dtype=torch.float64) - 10
        flat = x.view(B, C, H * W)
        for p in (30000, 5000, 17000):                 # ties: the lowest position must win
            flat[0, 0, p] = 7.0
        flat[0, 1, 33000] = 9.0
        flat[0, 1, 34499] = float("nan")
        flat[0, 1, 20000] = float("nan")
        flat[0, 1, 25000] = float("nan")
        flat[0, 2] = float("-inf")
        flat[1, 0, 0] = flat[1, 0, H * W - 1] = 5.0
        x = x.float().to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "permuted":
            x = x.transpose(2, 3).contiguous().transpose(2, 3)
        vmax, argmax = torch.ops.fastattn.channel_pool.default(x, ["max"], 1e-5, backend)
        assert argmax[0].tolist() == [5000, 20000, 0] and argmax[1, 0].item() == 0
        assert vmax[0, 0].item() == 7.0 and math.isnan(vmax[0, 1].item()) and vmax[0, 2].item() == float("-inf")
        xg = x.detach().requires_grad_(True)
        (m,) = channel_pool(xg, ("max",), backend=backend)
        m.sum().backward()
        g = xg.grad.cpu().reshape(B, C, H * W)
        assert g[0, 0, 5000] == 1 and g[0, 1, 20000] == 1 and g[0, 2, 0] == 1 and g.sum() == B * C

    @pytest.mark.parametrize("offset", [100.0, 1e4, 1e5])
    def test_std_of_an_offset_plane_fp32(self, backend, offset):
        """mean >> std: the sums are shifted by the plane's first value and deviations are taken from
        chunk means (never E[x^2] - E[x]^2), so fp32 keeps the digits torch's two-pass fp32 keeps."""
        _ready(backend, pool.CHECKS)
        x = (torch.randn(2, 3, 130, 140, dtype=torch.float64) + offset).float()
        want = _pool64(x, ["mean", "std"], 1e-5)
        for layout in ("nchw", "channels_last", "permuted"):
            xx = x.to(_device(backend))
            if layout == "channels_last":
                xx = xx.contiguous(memory_format=torch.channels_last)
            elif layout == "permuted":
                xx = xx.transpose(2, 3).contiguous().transpose(2, 3)
            mean, std = channel_pool(xx, ["mean", "std"], backend=backend)
            torch.testing.assert_close(std.cpu().double(), want["std"], rtol=1e-6, atol=0, msg=layout)
            torch.testing.assert_close(mean.cpu().double(), want["mean"], rtol=1e-7, atol=0, msg=layout)

    def test_inf_in_a_plane(self, backend):
        """An infinite first value must not poison the shifted sums: mean inf, std NaN, as torch."""
        _ready(backend, pool.CHECKS)
        x = torch.randn(1, 2, 5, 6)
        x[0, 0, 0, 0] = float("inf")
        x[0, 1, 3, 2] = float("inf")
        mean, std = channel_pool(x.to(_device(backend)), ["mean", "std"], backend=backend)
        ref_mean, ref_std = channel_pool(x, ["mean", "std"], backend="torch")
        torch.testing.assert_close(mean.cpu(), ref_mean, equal_nan=True)
        torch.testing.assert_close(std.cpu(), ref_std, equal_nan=True)

    def test_deterministic(self, backend):
        _ready(backend, pool.CHECKS)
        device = _device(backend)
        for layout in ("nchw", "channels_last"):
            x = _make((1, 3, 150, 230), torch.float32, layout, device)
            runs = [torch.ops.fastattn.channel_pool.default(x, list(ALL), 1e-5, backend) for _ in range(3)]
            for r in runs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(runs[0], r))

    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
    def test_gradcheck(self, backend, layout):
        _ready(backend, pool.CHECKS)
        x = _make((2, 3, 3, 4), torch.float64, layout, _device(backend)).detach().requires_grad_(True)
        for kinds in (ALL, ("max", "std"), ("mean",)):
            assert torch.autograd.gradcheck(lambda t: channel_pool(t, kinds, backend=backend), (x,))

    def test_opcheck(self, backend):
        _ready(backend, pool.CHECKS)
        device = _device(backend)
        x = torch.randn(2, 3, 4, 5, device=device)
        op = torch.ops.fastattn.channel_pool.default
        for xx, kinds in [(x, list(ALL)), (x.contiguous(memory_format=torch.channels_last), ["std", "mean"]),
                          (x.double(), ["max"]), (x.bfloat16(), ["mean", "max"]), (torch.cat([x, x], 1)[:, ::2], ALL)]:
            torch.library.opcheck(op, (xx.detach().requires_grad_(True), list(kinds), 1e-5, backend))
        B, C, size = 2, 3, [2, 3, 4, 5]
        argmax = torch.randint(0, 20, (B, C), device=device)
        g = [torch.randn(B, C, device=device) for _ in range(3)]
        mean, std = torch.randn(B, C, device=device), torch.rand(B, C, device=device) + 1
        bwd = torch.ops.fastattn.channel_pool_backward.default
        for cl in (False, True):
            torch.library.opcheck(bwd, (g[0], g[1], g[2], argmax, x, mean, std, size, cl, backend))
            torch.library.opcheck(bwd, (None, g[1], None, argmax.int(), None, None, None, size, cl, backend))
            torch.library.opcheck(bwd, (g[0], None, g[2], None, x, mean, std, size, cl, backend))


# ------------------------------------------------------------------------------------------------
# dct_pool
# ------------------------------------------------------------------------------------------------


def _weight(shape, dtype, kind, device, gen):
    C, H, W = shape

    def rnd(*s):
        return torch.randn(*s, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)

    if kind == "hwc":             # channels innermost, as a channels_last x wants
        return rnd(H, W, C).permute(2, 0, 1)
    if kind == "strided":         # every other column of a wider weight
        return rnd(C, H, 2 * W)[:, :, ::2]
    return rnd(C, H, W)


def _check_dct(backend, shape, dtype, layout, wdtype=None, wkind="chw", need=(True, True), seed=0):
    device = _device(backend)
    gen = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, layout, device, gen)
    w = _weight(shape[1:], wdtype or dtype, wkind, device, gen)
    dy = torch.randn(shape[:2], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    res = {}
    for b in (backend, "torch"):
        xg, wg = x.detach().requires_grad_(need[0]), w.detach().requires_grad_(need[1])
        y = dct_pool(xg, wg, backend=b)
        ins = [t for t, n in ((xg, need[0]), (wg, need[1])) if n]
        res[b] = (y, *torch.autograd.grad(y, ins, dy)) if ins else (y,)
    x64, w64, dy64 = x.cpu().double(), w.cpu().double(), dy.cpu().double()
    # (name, float64 answer, dtype, number of terms summed per result)
    checks = [("y", torch.einsum("bchw,chw->bc", x64, w64), dtype, shape[2] * shape[3])]
    if need[0]:
        checks.append(("dx", dy64[:, :, None, None] * w64, dtype, 1))
    if need[1]:
        checks.append(("dweight", torch.einsum("bc,bchw->chw", dy64, x64), w.dtype, shape[0]))
    got, ref = res[backend], res["torch"]
    assert got[0].dtype == dtype and got[0].shape == shape[:2]
    if need[0]:
        assert got[1].dtype == dtype and got[1].shape == x.shape
    if need[1]:
        assert got[-1].dtype == w.dtype and got[-1].shape == w.shape
    for (name, want, dt, n), g, r in zip(checks, got, ref):
        if dt == torch.float32:   # fp32 sums: the error grows like sqrt(terms)
            torch.testing.assert_close(g.cpu().double(), want, rtol=1e-5, atol=1e-6 * math.sqrt(n),
                                       msg=lambda m: f"{layout} {name}: {m}")
        else:
            _close(g.cpu(), want, r.cpu(), dt, f"{layout} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
class TestDctPool:
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_forward_and_grads(self, backend, dtype, layout):
        _ready(backend, pool.DCT_CHECKS)
        _check_dct(backend, (3, 70, 13, 17), dtype, layout)

    @pytest.mark.parametrize("wkind", ["chw", "hwc", "strided"])
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    def test_weight_layouts(self, backend, wkind, layout):
        _ready(backend, pool.DCT_CHECKS)
        _check_dct(backend, (2, 6, 7, 5), torch.float32, layout, wkind=wkind)

    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    def test_mixed_dtypes(self, backend, layout):
        """bf16 activations with a module's fp32 buffer: y and dx in bf16, dweight in fp32."""
        _ready(backend, pool.DCT_CHECKS)
        _check_dct(backend, (2, 5, 7, 7), torch.bfloat16, layout, wdtype=torch.float32)

    @pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["dx_only", "dweight_only"])
    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "permuted"])
    def test_one_gradient(self, backend, need, layout):
        _ready(backend, pool.DCT_CHECKS)
        _check_dct(backend, (3, 5, 4, 6), torch.float32, layout, need=need)

    # 1 x 1 maps, C > 1024, batch splits of dweight (few channels, big batch), planes past 2048
    @pytest.mark.parametrize("shape", [(3, 6, 1, 1), (2, 1100, 2, 3), (40, 2, 5, 5), (2, 3, 50, 47),
                                       (1, 2, 190, 181)], ids=str)
    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice_cl"])
    def test_odd_shapes(self, backend, shape, layout):
        _ready(backend, pool.DCT_CHECKS)
        _check_dct(backend, shape, torch.float32, layout)

    def test_empty(self, backend):
        _ready(backend, pool.DCT_CHECKS)
        device = _device(backend)
        x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
        w = torch.randn(3, 4, 4, device=device, requires_grad=True)
        y = dct_pool(x, w, backend=backend)
        assert y.shape == (0, 3)
        dx, dw = torch.autograd.grad(y.sum(), (x, w))
        assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))
        x = torch.randn(2, 0, 4, 4, device=device)
        assert dct_pool(x, torch.randn(0, 4, 4, device=device), backend=backend).shape == (2, 0)

    def test_deterministic_dweight(self, backend):
        _ready(backend, pool.DCT_CHECKS)
        device = _device(backend)
        for layout in ("nchw", "channels_last"):
            x = _make((40, 3, 9, 9), torch.float32, layout, device)
            w = torch.randn(3, 9, 9, device=device)
            dy = torch.randn(40, 3, device=device)
            outs = [torch.ops.fastattn.dct_pool_backward.default(dy, w, x, list(x.shape), layout != "nchw", True,
                                                                 backend) for _ in range(3)]
            assert all(torch.equal(outs[0][1], o[1]) for o in outs[1:])

    @pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
    def test_gradcheck(self, backend, layout):
        _ready(backend, pool.DCT_CHECKS)
        device = _device(backend)
        x = _make((2, 3, 3, 4), torch.float64, layout, device).detach().requires_grad_(True)
        w = torch.randn(3, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: dct_pool(a, b, backend=backend), (x, w))

    def test_opcheck(self, backend):
        _ready(backend, pool.DCT_CHECKS)
        device = _device(backend)
        x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
        w = torch.randn(3, 4, 5, device=device, requires_grad=True)
        op = torch.ops.fastattn.dct_pool.default
        torch.library.opcheck(op, (x, w, backend))
        torch.library.opcheck(op, (x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True),
                                   w, backend))
        torch.library.opcheck(op, (x, w.detach().double(), backend))
        size, dy = [2, 3, 4, 5], torch.randn(2, 3, device=device)
        bwd = torch.ops.fastattn.dct_pool_backward.default
        for cl in (False, True):
            torch.library.opcheck(bwd, (dy, w.detach(), x.detach(), size, cl, True, backend))
            torch.library.opcheck(bwd, (dy, w.detach(), None, size, cl, True, backend))
            torch.library.opcheck(bwd, (dy, w.detach().permute(0, 2, 1).contiguous().permute(0, 2, 1), x.detach(),
                                        size, cl, False, backend))


# ------------------------------------------------------------------------------------------------
# backend selection, thread-count independence, raw-op argument checks (CPU)
# ------------------------------------------------------------------------------------------------


def _cpu_ready():
    return pool.CHECKS["cpu"](torch.empty(0))


cpu_only = pytest.mark.skipif(_cpu_ready() is not None, reason=str(_cpu_ready()))


@cpu_only
def test_auto_on_cpu_picks_the_cpp_kernels():
    x = torch.randn(1, 2, 3, 3)
    assert _dispatch.resolve("channel_pool", x, "auto", pool.CHECKS) == "cpu"
    assert _dispatch.resolve("dct_pool", x, "auto", pool.DCT_CHECKS) == "cpu"


@cpu_only
def test_results_do_not_depend_on_the_thread_count():
    before = torch.get_num_threads()
    x = torch.randn(3, 5, 150, 230).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 150, 230)
    dy = torch.randn(3, 5)
    res = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            res.append([*torch.ops.fastattn_C.channel_pool(x, ["mean", "max", "std"], 1e-5),
                        torch.ops.fastattn_C.channel_pool(x.contiguous(), ["std"], 1e-5)[0],
                        torch.ops.fastattn_C.dct_pool(x, w),
                        *torch.ops.fastattn_C.dct_pool_backward(dy, w, x, list(x.shape), True, True)])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*res))


@cpu_only
@pytest.mark.parametrize("call,err,match", [
    (lambda C: C.channel_pool(torch.randn(2, 3, 4), ["mean"], 1e-5), ValueError, r"argument 'x' must be 4-D"),
    (lambda C: C.channel_pool(torch.ones(2, 3, 4, 4, dtype=torch.int32), ["mean"], 1e-5), TypeError,
     r"argument 'x' must be float32"),
    (lambda C: C.channel_pool(torch.randn(2, 3, 4, 4), [], 1e-5), ValueError, r"argument 'kinds' must name"),
    (lambda C: C.channel_pool(torch.randn(2, 3, 4, 4), ["min"], 1e-5), ValueError, r"argument 'kinds' .*'min'"),
    (lambda C: C.channel_pool(torch.randn(2, 3, 4, 4), ["max", "max"], 1e-5), ValueError, r"distinct"),
    (lambda C: C.channel_pool(torch.randn(2, 3, 4, 4), ["std"], -1.0), ValueError, r"argument 'eps' must be"),
    (lambda C: C.channel_pool(torch.randn(2, 3, 1, 1), ["std"], 1e-5), ValueError, r"H \* W >= 2 for kind 'std'"),
    (lambda C: C.channel_pool(torch.randn(2, 3, 0, 1), ["max"], 1e-5), ValueError, r"H \* W >= 1 for kind 'max'"),
    (lambda C: C.channel_pool_backward(torch.randn(2, 4), None, None, None, None, None, None, [2, 3, 4, 4], False),
     ValueError, r"argument 'dmean' must have shape \(B, C\) = \(2, 3\)"),
    (lambda C: C.channel_pool_backward(None, torch.randn(2, 3), None, None, None, None, None, [2, 3, 4, 4], False),
     ValueError, r"argument 'argmax' must be given with 'dmax'"),
    (lambda C: C.channel_pool_backward(None, torch.randn(2, 3), None, torch.full((2, 3), 16), None, None, None,
                                       [2, 3, 4, 4], False), ValueError, r"argument 'argmax' must hold flat indices"),
    (lambda C: C.channel_pool_backward(None, torch.randn(2, 3), None, torch.zeros(2, 3), None, None, None,
                                       [2, 3, 4, 4], False), TypeError, r"argument 'argmax' must be int64 or int32"),
    (lambda C: C.channel_pool_backward(torch.randn(2, 3), None, torch.randn(2, 3).double(), None, None, None, None,
                                       [2, 3, 4, 4], False), TypeError, r"argument 'dstd' must have the dtype"),
    (lambda C: C.channel_pool_backward(None, None, torch.randn(2, 3), None, None, None, None, [2, 3, 4, 4], False),
     ValueError, r"arguments 'x', 'mean' and 'std' must be given with 'dstd'"),
    (lambda C: C.channel_pool_backward(None, None, torch.randn(2, 3), None, torch.randn(2, 3, 4, 5), torch.randn(2, 3),
                                       torch.rand(2, 3), [2, 3, 4, 4], False), ValueError, r"argument 'x' must have shape"),
    (lambda C: C.channel_pool_backward(torch.randn(2, 3), None, None, None, None, None, None, [2, 3, 4], False),
     ValueError, r"argument 'size' must be 4 sizes"),
    (lambda C: C.dct_pool(torch.randn(2, 3, 4, 5), torch.randn(3, 5, 4)), ValueError,
     r"argument 'weight' must have shape \(C, H, W\) = \(3, 4, 5\)"),
    (lambda C: C.dct_pool(torch.randn(2, 3, 4, 5), torch.ones(3, 4, 5, dtype=torch.int64)), TypeError,
     r"argument 'weight' must be float32"),
    (lambda C: C.dct_pool_backward(torch.randn(2, 4), torch.randn(3, 4, 5), None, [2, 3, 4, 5], False, True),
     ValueError, r"argument 'dy' must have shape \(B, C\) = \(2, 3\)"),
    (lambda C: C.dct_pool_backward(torch.randn(2, 3), torch.randn(3, 4, 5), torch.randn(2, 3, 4, 5).double(),
                                   [2, 3, 4, 5], False, True), TypeError, r"argument 'x' must have the dtype of 'dy'"),
])
def test_raw_op_checks(call, err, match):
    with pytest.raises(err, match=match):
        call(torch.ops.fastattn_C)


def test_extension_has_the_kernels_where_built():
    if not _ext.available():
        pytest.skip(f"extension not built: {_ext.why_unavailable()}")
    for name in ("channel_pool", "channel_pool_backward", "dct_pool", "dct_pool_backward"):
        assert _dispatch._registered(name, "CPU"), name


def _same_bits(got, want, signed_zeros=True):
    """Equal bit patterns, any NaN matching any NaN; -0 and +0 told apart unless signed_zeros=False
    (a mean of -0 is +0: its sum starts at +0, as torch's pools do)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    if not signed_zeros:
        got, want = torch.where(got == 0, 0, got), torch.where(want == 0, 0, want)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_conversions_are_exact(backend, dtype):
    """The kernels' own 16-bit loads and stores: every bit pattern read back unchanged (1 x 1 tile
    means), and floats rounded to nearest even as torch rounds them (dx of dct_pool with dy = 1:
    dx = weight rounded), subnormals, overflow to inf and NaN included."""
    from fastattn.ops import bins

    _ready(backend, bins.CHECKS)
    _ready(backend, pool.DCT_CHECKS)
    device = _device(backend)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, 1, 256, 256)
    y = torch.ops.fastattn.bin_mean.default(every.to(device), [1], "tiles", backend)
    _same_bits(y.cpu(), every.reshape(1, 1, -1), signed_zeros=False)
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(4000, generator=g) * s for s in (1e-7, 1e-5, 1e-3, 1, 1e3, 6e4, 1e5, 1e30)])
    w = torch.cat([w, torch.tensor([float("nan"), float("inf"), -float("inf"), 65504.0, 65519.99, 65520.0, 0.0,
                                    -0.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1 + 2.0**-8, 1 + 3 * 2.0**-9])])
    w = w[: (w.numel() // 8) * 8].reshape(8, 1, -1)
    dy = torch.ones(1, 8, dtype=dtype, device=device)
    (dx,) = torch.ops.fastattn.dct_pool_backward.default(dy, w.to(device), None, [1, 8, 1, w.shape[2]], False, True,
                                                         backend)
    _same_bits(dx.cpu(), w.to(dtype).unsqueeze(0))
