"""The one-read training kernels of the pooled-gate modules (torch.ops.fastattn_C.pooled_gate_train_forward
and _backward: SqueezeExcite, ECA, GatherExcite, MultiSpectralAttention) and their use by
fastattn.modules.channel._PooledGate."""
import pytest
import torch

from cases.paths import op_names, check_backward_twice, check_training_step, random_pair
from fastattn import _ext
from fastattn.modules import channel as ch

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")

OPS = torch.ops.fastattn_C if _ext.available() else None
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def gate_weights(kind: str, C: int, H: int, W: int, gen: torch.Generator) -> tuple:
    """(filter, w1, b1, w2, b2, conv_w) of a random gate: "mlp", "mlp_nobias", "conv3", "conv1",
    "conv5" (ECA's taps), "dct" (an MLP without biases after a DCT-like filter pool) or "dct_runs"
    (the same with runs of equal filter rows, as FcaNet's, which the kernels read once per run)."""
    filt = None
    if kind == "dct":
        filt = torch.randn(C, H, W, generator=gen) / (H * W) ** 0.5
    if kind == "dct_runs":
        filt = repeated_rows_filter(C, H, W, gen)
    if kind.startswith("conv"):
        return None, None, None, None, None, torch.randn(int(kind[4:]), generator=gen)
    hidden = max(1, C // 4)
    w1 = torch.randn(hidden, C, generator=gen) / C ** 0.5
    w2 = torch.randn(C, hidden, generator=gen) / hidden ** 0.5
    bias = kind == "mlp"
    b1 = torch.randn(hidden, generator=gen) if bias else None
    b2 = torch.randn(C, generator=gen) if bias else None
    return filt, w1, b1, w2, b2, None


def repeated_rows_filter(C: int, H: int, W: int, gen: torch.Generator) -> torch.Tensor:
    """A (C, H, W) filter of runs of up to three equal rows; a run may repeat an earlier run's row
    after another one, and the last row differs from the one before it in one element only (or
    by the sign of a zero)."""
    rows = torch.randn(max(1, C // 2), H, W, generator=gen)
    pick = torch.arange(C) // 3 % rows.shape[0]
    pick[3 * 2:3 * 3] = 0            # run 0's row again after run 1's
    filt = rows[pick].clone()
    if C >= 2:
        filt[-1] = filt[-2]
        if H * W > 1:
            filt[-1, -1, -1] += 1.0
        else:
            filt[-2] = 0.0
            filt[-1] = -0.0
    return filt


def gate_math(x: torch.Tensor, weights: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (y, stats, g) of y = x * gate(stats(x)), differentiable."""
    filt, w1, b1, w2, b2, conv_w = (None if t is None else t.double() for t in weights)
    stats = (x * filt).sum((2, 3)) if filt is not None else x.mean((2, 3))
    if conv_w is not None:
        k = conv_w.numel()
        z = torch.nn.functional.conv1d(stats[:, None], conv_w.view(1, 1, k), padding=(k - 1) // 2)[:, 0]
    else:
        h = torch.relu(stats @ w1.t() + (b1 if b1 is not None else 0))
        z = h @ w2.t() + (b2 if b2 is not None else 0)
    g = torch.sigmoid(z)
    return x * g[:, :, None, None], stats, g


KINDS = ["mlp", "mlp_nobias", "conv1", "conv3", "conv5", "dct", "dct_runs"]
SHAPES = [(3, 20, 7, 9), (2, 33, 1, 5), (5, 16, 13, 1), (3, 8, 1, 1), (4, 3, 6, 6)]


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_train_forward_and_backward_match_float64(dtype, tol, kind, shape):
    """y, the statistics and the gate of the forward; dx and dg = sum dy * x of the backward (dg
    is exact: the kernel's input to autograd's parameter gradients) against float64 autograd."""
    gen = torch.Generator().manual_seed(sum(shape) + len(kind))
    B, C, H, W = shape
    weights = gate_weights(kind, C, H, W, gen)
    x = (torch.randn(shape, generator=gen) + 0.5).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    y, stats, g = OPS.pooled_gate_train_forward(x, *weights)
    xd = x.double().requires_grad_()
    yd, stats_d, g_d = gate_math(xd, weights)
    assert y.dtype == dtype and y.shape == x.shape and stats.dtype == g.dtype == torch.float32
    torch.testing.assert_close(y.double(), yd.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(stats.double(), stats_d.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double(), g_d.detach(), rtol=1e-5, atol=1e-5)

    dx, dg = OPS.pooled_gate_train_backward(dy, x, stats, g, *weights)
    yd.backward(dy.double())
    assert dx.dtype == dtype and dx.shape == x.shape and dg.shape == (B, C)
    torch.testing.assert_close(dx.double(), xd.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(dg.double(), (dy.double() * x.double()).sum((2, 3)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["mlp", "conv3", "dct"])
def test_large_samples_take_the_unstaggered_loop(kind):
    """Samples too large for two (forward) or three (backward) per thread in the last-level cache
    run one after another instead of staggered: the same results."""
    llc = _ext.build_info().get("llc_bytes", 0) or 32 << 20
    C, H = 8, 8
    while 4 * C * H * H < llc // 2:   # one fp32 sample over half the LLC: unstaggered on any thread count
        H *= 2
    gen = torch.Generator().manual_seed(1)
    shape = (3, C, H, H + 1)
    weights = gate_weights(kind, C, H, H + 1, gen)
    x, dy = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    y, stats, g = OPS.pooled_gate_train_forward(x, *weights)
    dx, dg = OPS.pooled_gate_train_backward(dy, x, stats, g, *weights)
    xd = x.double().requires_grad_()
    yd, _, _ = gate_math(xd, weights)
    yd.backward(dy.double())
    torch.testing.assert_close(y.double(), yd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), xd.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "conv3", "dct"])
def test_staggered_loop_with_several_samples_per_thread(kind):
    """Seven samples on two threads (three and four each): the staggered loops (the next sample's
    statistics / dy * x sums between this sample's planes) run, whatever the machine's threads."""
    assert _ext.build_info().get("llc_bytes", 0) > 0
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(4)
        shape = (7, 24, 9, 11)
        weights = gate_weights(kind, 24, 9, 11, gen)
        x, dy = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        y, stats, g = OPS.pooled_gate_train_forward(x, *weights)
        dx, dg = OPS.pooled_gate_train_backward(dy, x, stats, g, *weights)
    finally:
        torch.set_num_threads(before)
    xd = x.double().requires_grad_()
    yd, stats_d, _ = gate_math(xd, weights)
    yd.backward(dy.double())
    torch.testing.assert_close(y.double(), yd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.double(), stats_d.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dg.double(), (dy.double() * x.double()).sum((2, 3)), rtol=1e-5, atol=1e-4)


def test_nan_propagates():
    gen = torch.Generator().manual_seed(2)
    weights = gate_weights("mlp", 8, 4, 4, gen)
    x = torch.randn(2, 8, 4, 4, generator=gen)
    x[1, 3, 2, 1] = float("nan")
    y, stats, g = OPS.pooled_gate_train_forward(x, *weights)
    assert torch.isnan(stats[1, 3]) and not torch.isnan(stats[0]).any() and not torch.isnan(y[0]).any()
    assert torch.isnan(y[1]).any()
    dx, dg = OPS.pooled_gate_train_backward(torch.ones_like(x), x, stats, g, *weights)
    assert torch.isnan(dg[1, 3]) and not torch.isnan(dx[0]).any()


def test_errors():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 3, 3)
    _, w1, b1, w2, b2, _ = gate_weights("mlp", 8, 3, 3, gen)
    conv = torch.randn(3)
    fwd, bwd = OPS.pooled_gate_train_forward, OPS.pooled_gate_train_backward
    with pytest.raises(ValueError, match=r"pass either 'conv_w' \(ECA\) or 'w1' and 'w2' \(an MLP\), got both"):
        fwd(x, None, w1, b1, w2, b2, conv)
    with pytest.raises(ValueError, match=r"got neither"):
        fwd(x, None, None, None, None, None, None)
    with pytest.raises(ValueError, match=r"the MLP gate needs both 'w1' and 'w2'"):
        fwd(x, None, w1, None, None, None, None)
    with pytest.raises(ValueError, match=r"argument 'conv_w' must be 1-D with an odd number of taps"):
        fwd(x, None, None, None, None, None, torch.randn(4))
    with pytest.raises(ValueError, match=r"argument 'w2' must have shape \(8, 2\)"):
        fwd(x, None, w1, None, torch.randn(8, 3), None, None)
    with pytest.raises(TypeError, match=r"argument 'w1' must be float32"):
        fwd(x, None, w1.double(), None, w2, None, None)
    with pytest.raises(ValueError, match=r"argument 'filter' must have shape \(C, H, W\) = \(8, 3, 3\)"):
        fwd(x, torch.randn(8, 3, 2), w1, None, w2, None, None)
    with pytest.raises(TypeError, match=r"argument 'x' must be float32, float16 or bfloat16"):
        fwd(x.double(), None, w1, None, w2, None, None)
    with pytest.raises(ValueError, match=r"argument 'x' must be NCHW-contiguous"):
        fwd(x.to(memory_format=torch.channels_last), None, w1, None, w2, None, None)
    y, stats, g = fwd(x, None, w1, None, w2, None, None)
    with pytest.raises(ValueError, match=r"argument 'stats' must have shape \(2, 8\)"):
        bwd(x, x, stats[:1], g, None, w1, None, w2, None, None)
    with pytest.raises(ValueError, match=r"argument 'dy' must be NCHW-contiguous"):
        bwd(x.to(memory_format=torch.channels_last), x, stats, g, None, w1, None, w2, None, None)
    with pytest.raises(ValueError, match=r"'dy'"):
        bwd(torch.randn(2, 8, 3, 4), x, stats, g, None, w1, None, w2, None, None)


# --- the module path


MODULES = [("SqueezeExcite", (32,), {}), ("SqueezeExcite", (32,), {"bias": False}), ("ECA", (32,), {}),
           ("ECA", (32,), {"k_size": 5}), ("GatherExcite", (32,), {}), ("MultiSpectralAttention", (32, 7, 9), {})]
MODULE_IDS = ["se", "se_nobias", "eca", "eca_k5", "gather_excite", "fca"]


@pytest.mark.parametrize("name,args,kwargs", MODULES, ids=MODULE_IDS)
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "params_only"])
def test_modules_take_the_one_read_kernels(name, args, kwargs, x_grad):
    """fp32 NCHW training with a sample per thread: the one-read kernels (the backward's only when
    x needs a gradient), and output and every gradient as the reference's."""
    torch.manual_seed(0)
    ref, fast = random_pair(name, torch.float32, *args, **kwargs)
    ref.train(), fast.train()
    x = torch.randn(max(3, torch.get_num_threads()), 32, 7, 9) * 2 + 1
    names = op_names(lambda: check_training_step(ref, fast, x, 1e-4, x_grad=x_grad))
    assert "fastattn_C::pooled_gate_train_forward" in names
    assert ("fastattn_C::pooled_gate_train_backward" in names) == x_grad
    assert ("fastattn_C::channel_dot" in names) != x_grad


@pytest.mark.parametrize("name,args,kwargs", MODULES[::2], ids=MODULE_IDS[::2])
def test_non_contiguous_dy_and_backward_twice(name, args, kwargs):
    """A permuted dy takes the two-pass backward from the one-read forward's statistics; the
    gradients of two backward passes through one graph add up."""
    torch.manual_seed(1)
    _, fast = random_pair(name, torch.float32, *args, **kwargs)
    x = torch.randn(max(3, torch.get_num_threads()), 32, 7, 9)
    names = op_names(lambda: check_backward_twice(fast, x))
    assert "fastattn_C::pooled_gate_train_forward" in names and "fastattn_C::channel_dot" in names
    ref, fast = random_pair(name, torch.float32, *args, **kwargs)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(x.shape[0], 9, 7, 32).permute(0, 3, 2, 1)
    ref(xr).backward(dy)
    fast(xf).backward(dy)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,args,kwargs", MODULES[::2], ids=MODULE_IDS[::2])
def test_backward_twice_through_the_one_read_backward(name, args, kwargs):
    """A contiguous dy twice through one graph (retain_graph): the one-read backward both times,
    the gradients add up."""
    torch.manual_seed(3)
    _, fast = random_pair(name, torch.float32, *args, **kwargs)
    x = torch.randn(max(3, torch.get_num_threads()), 32, 7, 9, requires_grad=True)
    dy = torch.randn_like(x)
    y = fast(x)

    def twice():
        y.backward(dy, retain_graph=True)
        once = [x.grad.clone()] + [p.grad.clone() for p in fast.parameters()]
        y.backward(dy)
        for a, b in zip(once, [x.grad] + [p.grad for p in fast.parameters()]):
            torch.testing.assert_close(b, 2 * a, rtol=1e-5, atol=1e-6)
    names = op_names(twice)
    assert "fastattn_C::pooled_gate_train_backward" in names and "fastattn_C::channel_dot" not in names


def _one_read_taken(module, x) -> bool:
    x = x.clone().requires_grad_()
    taken = "fastattn_C::pooled_gate_train_forward" in op_names(lambda: module(x).sum().backward())
    module.zero_grad(set_to_none=True)
    return taken


def test_conditions():
    """The one-read kernels step aside for layers whose math they do not compute, weights that are
    not float32, float64 x, autocast and too few samples; the results still match the reference."""
    torch.manual_seed(2)
    n = max(3, torch.get_num_threads())
    x = torch.randn(n, 16, 5, 5)
    ref, fast = random_pair("SqueezeExcite", torch.float32, 16)
    assert _one_read_taken(fast, x)
    fast.act = ref.act = torch.nn.GELU()                     # not the kernel's ReLU: neither kernel
    assert not fast.one_read(x) and not _one_read_taken(fast, x)
    check_training_step(ref, fast, x, 1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), ref.eval()(x))   # eval: not the one-read inference kernel
    fast.train()

    ref_eca, eca = random_pair("ECA", torch.float32, 16)
    assert _one_read_taken(eca, x)
    for m in (ref_eca, eca):                                 # a conv with a bias: neither kernel
        m.conv = torch.nn.Conv1d(1, 1, 3, padding=1, bias=True)
    eca.conv.load_state_dict(ref_eca.conv.state_dict())
    assert eca._kernel_weights() is None and not eca.one_read(x) and not _one_read_taken(eca, x)
    with torch.no_grad():
        torch.testing.assert_close(eca.eval()(x), ref_eca.eval()(x))

    ref_ge, ge = random_pair("GatherExcite", torch.float32, 16)
    ref_ge.mlp.act = ge.mlp.act = torch.nn.GELU()           # not the kernels' ReLU
    assert not _one_read_taken(ge, x)
    with torch.no_grad():
        torch.testing.assert_close(ge.eval()(x), ref_ge.eval()(x))

    _, se64 = random_pair("SqueezeExcite", torch.float64, 16)
    assert not _one_read_taken(se64, x.double())

    _, se = random_pair("SqueezeExcite", torch.float32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ch._one_read_train_ok(x, ch._conv_mlp_weights(se.fc1, se.act, se.fc2))
    if torch.get_num_threads() > 1:
        assert not _one_read_taken(se, x[:1])               # fewer samples than threads
    assert _one_read_taken(se, x)
