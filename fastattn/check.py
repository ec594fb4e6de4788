"""`python -m fastattn check`: parity of every fast path against the reference on this machine.

For each op, dtype and memory format: forward and input gradient on random data, compared with
the reference computed in float64. A row fails when the fast result is further from the float64
answer than the tolerance of its dtype allows.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .ops import pool

# Tolerances against the float64 reference: (rtol, atol).
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (2e-3, 1e-4)}


@dataclasses.dataclass
class ParityCase:
    name: str
    fast: Callable
    reference: Callable
    backend: Callable[[torch.Tensor], str]
    shape: tuple


CASES = [
    ParityCase("channel_mean", pool.channel_mean, pool.channel_mean_reference, pool.channel_mean_backend,
               (3, 37, 13, 17)),
]


def _err(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> tuple[float, bool]:
    diff = (got.double() - want).abs()
    ok = bool((diff <= atol + rtol * want.abs()).all())
    return diff.max().item() if diff.numel() else 0.0, ok


def run(device: str = "cpu") -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for case in CASES:
        x64 = torch.randn(case.shape, generator=gen, dtype=torch.float64)
        for dtype, (rtol, atol) in TOL.items():
            for layout in ("nchw", "channels_last"):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                x = x64.to(device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
                xr = x.detach().double().requires_grad_(True)
                y, yr = case.fast(x), case.reference(xr)
                dy = torch.randn(yr.shape, generator=gen, dtype=torch.float64)
                (y.double() * dy.to(device)).sum().backward()
                (yr * dy).sum().backward()
                fe, fok = _err(y.cpu(), yr, rtol, atol)
                be, bok = _err(x.grad.cpu(), xr.grad, rtol, atol)
                rows.append(dict(op=case.name, backend=case.backend(x), dtype=str(dtype).replace("torch.", ""),
                                 layout=layout, fwd_err=fe, bwd_err=be, ok=fok and bok))
    return rows


# Constructor arguments of each fast module for the check (input: 4 x 64 x 14 x 14).
MODULE_KWARGS = {"ShuffleAttention": {"channels": 64, "groups": 8}, "SpatialGroupEnhance": {"groups": 8},
                 "TripletAttention": {}, "SimAM": {}, "MultiSpectralAttention": {"channels": 64, "dct_h": 7, "dct_w": 7},
                 "TiledSqueezeExcite": {"channels": 64, "reduction": 16, "pool_kernel": 7}}


def _perturb(m: torch.nn.Module, gen: torch.Generator) -> None:
    """Move parameters off their inits (zero-initialised gates would hide errors)."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def run_modules(device: str = "cpu") -> list[dict]:
    """Each fast module in fp32/bf16/fp16 and both layouts against its reference in float64
    (eval mode, forward and input gradient). A row passes when the fast module is at most twice
    as far (L2 norm of the error) from the float64 answer as the reference module run in the
    same dtype (or as the answer rounded to that dtype, whichever is larger), plus atol times
    the answer's norm. Weights are seeded per module, so every run checks the same ones."""
    import fastattn
    from fastattn import reference

    rows = []
    gen = torch.Generator().manual_seed(1)
    for name in fastattn.FAST_MODULES:
        kwargs = MODULE_KWARGS.get(name, {"channels": 64})
        torch.manual_seed(0)        # default inits too: the same weights whatever ran before
        ref64 = getattr(reference, name)(**kwargs)
        _perturb(ref64, gen)
        ref64 = ref64.double().eval().to(device)
        x64 = torch.randn(4, 64, 14, 14, generator=gen, dtype=torch.float64).to(device)
        dy = torch.randn(4, 64, 14, 14, generator=gen, dtype=torch.float64).to(device)
        for dtype, (_, atol) in TOL.items():
            ref_lp = getattr(reference, name)(**kwargs).to(device=device, dtype=dtype).eval()
            fast = getattr(fastattn, name)(**kwargs).to(device=device, dtype=dtype).eval()
            ref_lp.load_state_dict(ref64.state_dict())
            fast.load_state_dict(ref64.state_dict())
            for layout in ("nchw", "channels_last"):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                errs = []
                for m in (ref64, ref_lp, fast):
                    x = x64.to(dtype if m is not ref64 else torch.float64).contiguous(memory_format=fmt)
                    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
                    y = m(x)
                    (y.double() * dy).sum().backward()
                    errs.append((y.double(), x.grad.double()))
                (y_w, g_w), (y_r, g_r), (y_f, g_f) = errs
                fe, be = (y_f - y_w).abs().max().item(), (g_f - g_w).abs().max().item()
                # Judged on norms: a max() gate (scSE, CBAM, Triplet) flips its branch at near-ties
                # under rounding, which moves a few gradient entries by O(1) in any 16-bit run.
                # The floor of "the reference's own error" is the error of rounding the answer itself
                # to the dtype: no implementation in that dtype can do better.
                ok = all((f - w).norm() <= 2 * max((r - w).norm(), (w.to(dtype).double() - w).norm())
                         + atol * w.norm() for f, r, w in ((y_f, y_r, y_w), (g_f, g_r, g_w)))
                rows.append(dict(op=name, backend=getattr(fast, "backend", None) or "auto",
                                 dtype=str(dtype).replace("torch.", ""), layout=layout, fwd_err=fe, bwd_err=be, ok=ok))
    return rows


def print_table(rows: list[dict]) -> int:
    """Print the parity rows; returns the number of failures."""
    head = f"{'op or module':<24} {'backend':<7} {'dtype':<9} {'layout':<13} {'fwd max err':>11} {'bwd max err':>11}  result"
    print("parity of the fast ops and modules against the float64 reference")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:<24} {r['backend']:<7} {r['dtype']:<9} {r['layout']:<13} "
              f"{r['fwd_err']:>11.2e} {r['bwd_err']:>11.2e}  {'ok' if r['ok'] else 'FAIL'}")
    bad = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - bad} passed, {bad} failed")
    return bad


def main() -> int:
    from .info import main as info_main

    info_main()
    print()
    return 1 if print_table(run() + run_modules()) else 0
