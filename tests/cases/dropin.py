"""Shared checks of a drop-in fast module against its reference (CPU tests and interpreter tests)."""
from __future__ import annotations

import torch

import fastattn
import fastattn.reference as ref

from . import Case, channel, flat_outputs, hybrid, other, rand_inputs, randomise, spatial

ALL_CASES = [*channel.CASES, *spatial.CASES, *hybrid.CASES, *other.CASES]


def dropin_cases() -> list[Case]:
    return [c for c in ALL_CASES if c.cls in fastattn.FAST_MODULES]


def pair(case: Case, dtype=torch.float32):
    """(reference, fast) modules with the same random state (independent of the test order)."""
    torch.manual_seed(0)
    r = randomise(getattr(ref, case.cls)(**case.kwargs)).to(dtype)
    f = getattr(fastattn, case.cls)(**case.kwargs).to(dtype)
    f.load_state_dict(r.state_dict())
    assert isinstance(f, type(r))
    return r, f


def run(case: Case, m, inputs):
    args = case.make_inputs(inputs) if case.make_inputs else inputs
    return flat_outputs(case.run(m, *args) if case.run else m(*args))


def compare(case: Case, *, backend: str, dtype=torch.float32, layout="nchw", train=False, rtol=1e-4, atol=1e-4,
            relu=False):
    """Outputs, input gradients, parameter gradients and (train) BN statistics of the fast module
    equal the reference's. fp32 default tolerance: rtol 1e-4 (another summation order, amplified
    by train-mode BatchNorm over a batch of 2 in some modules), atol 1e-4 (a gradient that is exactly
    zero, such as a bias just before a train-mode BatchNorm, comes out as rounding noise of the size
    of the O(1) terms it sums). The float64 run (1e-10) is the strict one."""
    r, f = pair(case, dtype)
    f.backend = backend
    r.train(train)
    f.train(train)
    cl = layout == "channels_last"
    xr = [t.requires_grad_() for t in rand_inputs(case.shapes, dtype=dtype, channels_last=cl, relu=relu)]
    xf = [t.detach().clone().requires_grad_() for t in xr]
    out_r, out_f = run(case, r, xr), run(case, f, xf)
    g = torch.Generator().manual_seed(7)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in out_r]
    for o_r, o_f in zip(out_r, out_f):
        assert o_f.dtype == o_r.dtype and o_f.shape == o_r.shape
        torch.testing.assert_close(o_f, o_r, rtol=rtol, atol=atol)
        if cl and o_r.dim() == 4 and case.keeps_format:
            assert o_f.is_contiguous(memory_format=torch.channels_last)
    sum((o * c).sum() for o, c in zip(out_r, cot)).backward()
    sum((o * c).sum() for o, c in zip(out_f, cot)).backward()
    for a, b in zip(xr, xf):
        # equal_nan: the reference's own NaN gradients (CBAM's lp pool of an all-zero plane) must be matched
        torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=atol, equal_nan=relu,
                                   msg=lambda m: f"input grad: {m}")
    pf = dict(f.named_parameters())
    # Parameter gradients sum many O(scale) terms: their rounding noise is relative to the
    # largest gradient of the module, not to each entry (some are exactly zero in theory).
    scale = max([1.0] + [p.grad.abs().nan_to_num(0).max().item() for p in r.parameters() if p.grad is not None])
    for n, p in r.named_parameters():
        if p.grad is None:
            assert pf[n].grad is None, n
            continue
        torch.testing.assert_close(pf[n].grad, p.grad, rtol=rtol, atol=atol * scale, equal_nan=relu,
                                   msg=lambda m: f"grad {n}: {m}")
    if train:
        for (k, v), w in zip(f.state_dict().items(), r.state_dict().values()):
            torch.testing.assert_close(v, w, rtol=rtol, atol=atol, msg=lambda m: f"state {k}: {m}")
