"""Drop-in fast modules (fastattn.<Class>) against their references on the CPU.

The same checks run with the Triton kernels under the interpreter in tests/interpreter/test_modules.py.
"""
import pytest
import torch

import fastattn
from cases.dropin import compare, dropin_cases, pair, rand_inputs, run

CASES = dropin_cases()
IDS = [c.name for c in CASES]


def test_every_fast_module_has_a_case():
    assert {c.cls for c in CASES} == set(fastattn.FAST_MODULES)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference(case, layout, train):
    compare(case, backend="auto", layout=layout, train=train)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference_on_relu_outputs(case, layout):
    """Inputs as a ReLU leaves them (zeros, a dead channel, a dead pixel): the ties of max
    pools and of scSE's max(x a, x s), whose gradients torch splits or sends to one element."""
    compare(case, backend="auto", layout=layout, train=True, relu=True)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference_float64(case):
    compare(case, backend="torch", dtype=torch.float64, train=True, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_low_precision_no_further_from_float64_than_reference(case, dtype):
    """fp16/bf16: the fused module is at most 2x as far from the float64 answer as the
    reference module run in the same dtype, plus a small atol (DESIGN.md, Numerics)."""
    r64, _ = pair(case, torch.float64)
    r_lp, f_lp = pair(case, dtype)
    for m in (r64, r_lp, f_lp):
        m.eval()
    xs = rand_inputs(case.shapes, dtype=dtype)
    want = run(case, r64, [x.double() for x in xs])
    ref_err = [(o.double() - w).abs().max().item() for o, w in zip(run(case, r_lp, xs), want)]
    got_err = [(o.double() - w).abs().max().item() for o, w in zip(run(case, f_lp, xs), want)]
    for g, e in zip(got_err, ref_err):
        assert g <= 2 * e + 1e-2, (g, e)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_is_the_reference_one(case):
    r, f = pair(case)
    assert list(r.state_dict()) == list(f.state_dict())


def saved_bytes(case, m, shapes=None) -> int:
    """Bytes of the storages that autograd saves for backward in one train-mode forward."""
    seen = {}

    def pack(t):
        # count storages, not views: a saved view keeps its whole storage alive
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    xs = [t.requires_grad_() for t in rand_inputs(shapes or case.shapes)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(case, m.train(), xs)
    return sum(seen.values())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_saved_for_backward_not_more_than_reference(case):
    """The fast module saves at most what the reference saves, with an allowance of 8 bytes per
    (b, c) for per-channel statistics kept by the fused pools (CBAM's int32 argmax where the
    reference keeps the pooled max itself; SRM's fp32 mean and std): nothing that scales with
    H x W."""
    r, f = pair(case)
    B, C = case.shapes[0][:2]
    assert saved_bytes(case, f) <= saved_bytes(case, r) + 8 * B * C


# Modules whose reference keeps several tensors of the size of x for backward: the fused ones
# keep (about) one.
NOTABLY_LOWER = {"CBAM", "SimAM", "CoordinateAttention"}


@pytest.mark.parametrize("case", [c for c in CASES if c.cls in NOTABLY_LOWER and "no_spatial" not in c.name],
                         ids=lambda c: c.name)
def test_saved_for_backward_notably_lower(case):
    """At a 32 x 32 map (where the tensors of the size of x dominate, as in a real network)."""
    r, f = pair(case)
    if not getattr(f, "fused", True):
        pytest.skip(f"{case.name} runs the reference forward (no fused path for its configuration)")
    shapes = [(*case.shapes[0][:2], 32, 32)]
    assert saved_bytes(case, f, shapes) <= 0.6 * saved_bytes(case, r, shapes)


def test_compile_fullgraph_small_network():
    """A chain of every single-input fast module (1x1 convs adapt the channel counts) compiles
    with no graph break and matches eager."""
    layers, width = [], 3
    for name in fastattn.FAST_MODULES:
        case = next(c for c in CASES if c.cls == name)
        if len(case.shapes) != 1 or case.make_inputs or case.run:
            continue
        channels = case.shapes[0][1]
        layers += [torch.nn.Conv2d(width, channels, 1), getattr(fastattn, name)(**case.kwargs)]
        width = channels
    net = torch.nn.Sequential(*layers).eval()
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    torch._dynamo.reset()
    # aot_eager traces forward and backward through the fake implementations and autograd formulas.
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, net(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(net(x).sum(), x)
    torch.testing.assert_close(g, want)


@pytest.mark.parametrize("cls", ["NAM", "ShuffleAttention"])
def test_plane_statistics_constant_and_offset_planes(cls):
    """NAM and ShuffleAttention take their per-plane variance from channel_pool's std
    (plane_var_mean): a constant plane (variance 0) must keep finite gradients, and a plane far
    from zero (mean 300, std 1) its digits; train mode, fp32, against the reference."""
    torch.manual_seed(3)
    c = 16
    kwargs = {"groups": 2} if cls == "ShuffleAttention" else {}
    r = getattr(fastattn.reference, cls)(c, **kwargs).train()
    f = getattr(fastattn, cls)(c, **kwargs).train()
    f.load_state_dict(r.state_dict())
    with torch.no_grad():          # parameters away from their zero / one initialisation
        for p in (*r.parameters(), *f.parameters()):
            torch.manual_seed(p.numel())
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, c, 5, 7)
    x[0, 3] = 0.25                  # constant planes
    x[1, 10] = -2.0
    x[:, 5] += 300.0                # offset planes
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = r(xr), f(xf)
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-4)
    cot = torch.randn_like(out_r)
    (out_r * cot).sum().backward()
    (out_f * cot).sum().backward()
    assert torch.isfinite(xf.grad).all()
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-3, atol=1e-3)
    for (n, p), q in zip(r.named_parameters(), f.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-3, msg=lambda m: f"grad {n}: {m}")
