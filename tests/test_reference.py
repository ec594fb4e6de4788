"""Generic tests of every reference class, driven by the recipes in tests/cases/.

For each case: forward on NCHW and channels_last (shape, dtype, memory format), float16/bfloat16
forward, a gradient reaches every parameter, float64 gradcheck, train and eval modes, a state-dict
round trip, and every input check fires with its message.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

import fastattn.reference as ref
from cases import Case, flat_outputs, rand_inputs, randomise
from cases import channel, hybrid, other, spatial

ALL_CASES: list[Case] = [*channel.CASES, *spatial.CASES, *hybrid.CASES, *other.CASES]
IDS = [c.name for c in ALL_CASES]
BAD = [(c, b) for c in ALL_CASES for b in c.bad]


def build(case: Case, dtype=torch.float32, seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomise(getattr(ref, case.cls)(**case.kwargs).to(dtype), seed)


def call(case: Case, m, inputs) -> list[torch.Tensor]:
    args = case.make_inputs(inputs) if case.make_inputs else inputs
    out = case.run(m, *args) if case.run else m(*args)
    return flat_outputs(out)


def test_catalogue_is_complete():
    """Every public reference class has at least one case, and all 32 catalogue entries exist."""
    classes = {n for n in ref.__all__ if isinstance(getattr(ref, n), type)}
    assert classes <= {c.cls for c in ALL_CASES}, f"no test case for {classes - {c.cls for c in ALL_CASES}}"
    assert len(classes) >= 32


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_forward_layout(case: Case, layout):
    m = build(case).eval()
    cl = layout == "channels_last"
    inputs = rand_inputs(case.shapes, channels_last=cl)
    outs = call(case, m, inputs)
    ref_outs = call(case, m, rand_inputs(case.shapes))  # same values, NCHW
    for o, r in zip(outs, ref_outs):
        assert o.dtype == torch.float32
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    main = outs[0]
    if case.keeps_format and main.dim() == 4 and cl:
        assert main.is_contiguous(memory_format=torch.channels_last), "channels_last input, output not channels_last"
    if case.keeps_format and main.dim() == 4 and not cl:
        assert main.is_contiguous(), "NCHW input, output not contiguous"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_forward_low_precision(case: Case, dtype):
    m = build(case).eval()
    want = call(case, m, rand_inputs(case.shapes))
    got = call(case, m.to(dtype), rand_inputs(case.shapes, dtype=dtype))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert torch.isfinite(g).all()
        # Loose: a whole module run in 16-bit, compared with fp32; catches wrong math, not rounding.
        scale = w.abs().max().clamp_min(1.0)
        assert (g.float() - w).abs().max() <= 0.1 * scale


@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_gradient_reaches_every_parameter(case: Case):
    m = build(case).train()
    inputs = [t.requires_grad_(True) for t in rand_inputs(case.shapes)]
    outs = call(case, m, inputs)
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    for name, p in m.named_parameters():
        if name in case.unused_params or any(name.startswith(u + ".") for u in case.unused_params):
            assert p.grad is None, f"{name} is declared unused but got a gradient"
            continue
        assert p.grad is not None, f"parameter {name} got no gradient"
        assert torch.isfinite(p.grad).all()
    assert inputs[0].grad is not None and torch.isfinite(inputs[0].grad).all()


@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_gradcheck_float64(case: Case):
    if case.skip_gradcheck:
        pytest.skip(case.skip_gradcheck)
    m = build(case, torch.float64).eval()
    shapes = case.gradcheck_shapes or case.shapes
    inputs = [t.requires_grad_(True) for t in rand_inputs(shapes, dtype=torch.float64, seed=1)]
    params = [p for n, p in m.named_parameters()
              if not any(n == u or n.startswith(u + ".") for u in case.unused_params)]
    names = [n for n, _ in m.named_parameters()
             if not any(n == u or n.startswith(u + ".") for u in case.unused_params)]

    class Runner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, *xs):
            return tuple(call(case, self.m, list(xs)))

    runner = Runner()

    def f(*args):
        xs, ps = args[: len(inputs)], args[len(inputs):]
        return torch.func.functional_call(runner, {f"m.{n}": p for n, p in zip(names, ps)}, xs, strict=False)

    assert torch.autograd.gradcheck(f, (*inputs, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_train_and_eval(case: Case):
    m = build(case)
    inputs = rand_inputs(case.shapes)
    m.eval()
    a = call(case, m, inputs)
    b = call(case, m, inputs)
    for x, y in zip(a, b):
        assert torch.equal(x, y), "eval mode is not deterministic"
    m.train()
    before = copy.deepcopy(m.state_dict())
    t = call(case, m, inputs)
    for x in t:
        assert torch.isfinite(x).all()
    # A module with BatchNorm must move its running statistics in train mode, and not in eval.
    has_bn = any(isinstance(s, torch.nn.modules.batchnorm._BatchNorm) for s in m.modules())
    moved = any(not torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert moved == has_bn


@pytest.mark.parametrize("case", ALL_CASES, ids=IDS)
def test_state_dict_round_trip(case: Case):
    m = build(case, seed=0).eval()
    fresh = getattr(ref, case.cls)(**case.kwargs).eval()
    fresh.load_state_dict(m.state_dict())
    inputs = rand_inputs(case.shapes)
    for x, y in zip(call(case, m, inputs), call(case, fresh, inputs)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("case,bad", BAD, ids=[f"{c.name}-{b.what}" for c, b in BAD])
def test_input_check(case: Case, bad):
    with pytest.raises(bad.error) as info:
        if bad.kwargs is not None:
            getattr(ref, case.cls)(**bad.kwargs)
        else:
            m = build(case)
            args = bad.inputs()
            case.run(m, *args) if case.run else m(*args)
    assert re.search(bad.match, str(info.value)), f"message {str(info.value)!r} does not match {bad.match!r}"
    assert case.cls in str(info.value) or "fastattn" in str(info.value), "the message must name the module"
