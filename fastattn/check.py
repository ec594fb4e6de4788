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


def main() -> int:
    from .info import main as info_main

    info_main()
    print()
    rows = run()
    head = f"{'op':<14} {'backend':<7} {'dtype':<9} {'layout':<13} {'fwd max err':>11} {'bwd max err':>11}  result"
    print("parity of the fast paths against the float64 reference")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:<14} {r['backend']:<7} {r['dtype']:<9} {r['layout']:<13} "
              f"{r['fwd_err']:>11.2e} {r['bwd_err']:>11.2e}  {'ok' if r['ok'] else 'FAIL'}")
    bad = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - bad} passed, {bad} failed")
    return 1 if bad else 0
