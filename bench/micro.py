"""Microbenchmarks: each case (op or module) x shape x dtype x layout x provider x mode.

Providers: `eager` (the reference), `compile` (torch.compile of the reference, default mode,
static shapes, a fresh compile per configuration) and fastattn with an explicit backend: on the
CPU `fastattn-cpu` (the C++ kernels of fastattn._C), on CUDA `fastattn-triton` and
`fastattn-cuda` (skipped, with the reason, where the backend is missing or not implemented: never
timed on a silent PyTorch fallback).

Modes: `forward` (inference: no_grad, eval), `backward` (backward only, through graphs recorded
once per input buffer, retain_graph), `forward+backward` (a training step of the case: train
mode, gradients of every input and parameter, those of every input buffer reset to None before
each call as do_bench's grad_to_none: one step's gradients alive at a time, as in training).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import fastattn
from fastattn.ops import _dispatch

from . import harness
from .cases import DTYPES, Case, make_inputs, numel, shape_str


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    backend: Optional[str] = None       # the fastattn backend; None for eager and compile

    @property
    def is_fast(self) -> bool:
        return self.backend is not None


def providers(device: str) -> list[Provider]:
    fast = ([Provider("fastattn-triton", "triton"), Provider("fastattn-cuda", "cuda")]
            if torch.device(device).type == "cuda" else [Provider("fastattn-cpu", "cpu")])
    return [Provider("eager"), Provider("compile"), *fast]


# Device-level reasons a backend cannot run (fastattn.ops._dispatch), before any op is asked.
# Each fastattn provider names its backend explicitly: a case whose op lacks that backend is
# skipped with the reason, never timed on a silent PyTorch fallback.
DEVICE_REASONS = {"triton": _dispatch.triton_reason, "cuda": _dispatch.cuda_ext_reason,
                  "cpu": _dispatch.cpu_ext_reason}


@dataclasses.dataclass
class Settings:
    device: str
    shapes: Sequence[tuple]
    dtypes: Sequence[str]
    layouts: Sequence[str]
    modes: Sequence[str]
    providers: Sequence[Provider]
    budget: harness.Budget


class Skips:
    """Collects 'provider cannot run case' reasons; prints each distinct one once."""

    def __init__(self, stream=sys.stderr):
        self.seen: dict[tuple, str] = {}
        self.stream = stream

    def add(self, provider: str, name: str, reason: str) -> None:
        reason = reason.strip().splitlines()[0][:300] if reason.strip() else "unknown"
        key = (provider, name, reason)
        if key not in self.seen:
            self.seen[key] = reason
            print(f"  skip {provider} for {name}: {reason}", file=self.stream)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o) if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def backend_context(provider: Provider):
    if provider.is_fast:
        with fastattn.use_backend(provider.backend):
            yield
    else:
        yield


def _fast_reason(provider: Provider, case: Case, x: torch.Tensor) -> Optional[str]:
    """Why the fastattn provider cannot run case on x, as far as can be told without running it."""
    check = DEVICE_REASONS.get(provider.backend)
    why = check(x) if check else None
    if why:
        return why
    if case.backends is not None:
        have = case.backends(x)
        if provider.backend not in have:
            has = ", ".join(sorted(have)) or "torch only"
            return f"{case.name} has no {provider.backend} implementation (has: {has})"
    return None


def count(cases: Sequence[Case], s: Settings) -> int:
    return len(cases) * len(s.shapes) * len(s.dtypes) * len(s.layouts) * len(s.providers) * len(s.modes)


class Runner:
    """Runs the microbenchmarks; `emit(row)` receives each result row as soon as it is measured."""

    def __init__(self, settings: Settings, env: dict, copy_gbps: float, emit: Callable[[dict], None],
                 skips: Skips, progress: Callable[..., None]):
        self.s = settings
        self.env = env
        self.copy_gbps = copy_gbps
        self.emit = emit
        self.skips = skips
        self.progress = progress
        self.timer = harness.Timer(torch.device(settings.device), settings.budget)
        self.dev = torch.device(settings.device)

    def run(self, cases: Sequence[Case]) -> None:
        for case in cases:
            for shape in self.s.shapes:
                for dtype in self.s.dtypes:
                    for layout in self.s.layouts:
                        self._config(case, shape, dtype, layout)

    # -- one (case, shape, dtype, layout) ----------------------------------------------------------

    def _config(self, case: Case, shape: tuple, dtype_name: str, layout: str) -> None:
        dtype = DTYPES[dtype_name]
        label = f"{case.name} {dtype_name} {layout} {shape_str(shape)}"
        n_todo = len(self.s.providers) * len(self.s.modes)
        try:
            built = case.build(shape, self.dev, dtype)
        except Exception as e:  # noqa: BLE001 (a case that cannot be built is reported, not fatal)
            self.skips.add("all", case.name, f"cannot build: {type(e).__name__}: {e}")
            self.progress(f"{label}: skipped", n_todo)
            return
        itemsize = torch.empty((), dtype=dtype).element_size()
        in_bytes = sum(numel(s) * itemsize for s in case.input_shapes(shape))
        n = harness.n_buffers(in_bytes, self.s.device)
        bufs = make_inputs(case, shape, self.dev, dtype, layout, n)
        dys = [[torch.randn(s, device=self.dev, dtype=dtype) for s in case.output_shapes(shape)] for _ in range(n)]
        for provider in self.s.providers:
            fn, why = self._callable(provider, case, built, bufs[0][0])
            if fn is None:
                self.skips.add(provider.name, case.name, why)
                self.progress(f"{label} {provider.name}: skipped", len(self.s.modes))
                continue
            with backend_context(provider):
                for mode in self.s.modes:
                    self._measure(case, built, fn, provider, mode, shape, dtype_name, layout, bufs, dys)
        del bufs, dys

    def _callable(self, provider: Provider, case: Case, built, x) -> tuple[Optional[Callable], str]:
        if provider.name == "eager":
            return built.eager, ""
        if provider.name == "compile":
            torch._dynamo.reset()      # a fresh cache: no recompile limit reached across configurations
            return torch.compile(built.eager, dynamic=False), ""
        if built.fast is None:
            return None, built.why_no_fast or f"{case.name} has no fast path"
        why = _fast_reason(provider, case, x)
        return (None, why) if why else (built.fast, "")

    def _measure(self, case, built, fn, provider, mode, shape, dtype_name, layout, bufs, dys) -> None:
        label = f"{case.name} {provider.name} {mode} {dtype_name} {layout} {shape_str(shape)}"
        grad = mode != "forward"
        modules = [m for m in (built.eager, built.fast) if isinstance(m, nn.Module)]
        for m in modules:
            m.train(grad)
        params = [p for m in modules for p in m.parameters()]
        n = len(bufs)

        def clear(k: int) -> None:
            for t in bufs[k]:
                t.grad = None
            for p in params:
                p.grad = None

        try:
            with torch.set_grad_enabled(grad):
                for t in (t for b in bufs for t in b):
                    t.requires_grad_(grad)
                _flat(fn(*bufs[0]))                       # trial call (compiles, for `compile`)
                if mode == "forward":
                    call, before = (lambda k: fn(*bufs[k])), None
                elif mode == "forward+backward":
                    def call(k):
                        torch.autograd.backward(_flat(fn(*bufs[k])), dys[k])

                    def before(k):
                        # A training step frees the previous step's gradients: clear every buffer's
                        # (clearing buffer k's only kept n - 1 sets alive, a working set no training
                        # loop has, so each timed call allocated its gradients cold).
                        for j in range(n):
                            clear(j)
                else:
                    graphs = [_flat(fn(*b)) for b in bufs]

                    def call(k):
                        torch.autograd.backward(graphs[k], dys[k], retain_graph=True)
                    before = clear
                stats = self.timer(call, n, before)
                peak = self._peak(fn, bufs[0], call, before, grad)
        except Exception as e:  # noqa: BLE001
            self.skips.add(provider.name, case.name, f"{mode} failed: {type(e).__name__}: {e}")
            self.progress(f"{label}: failed", 1)
            return
        finally:
            graphs = None
        nbytes = case.bytes(shape, DTYPES[dtype_name], mode, built.param_bytes)
        bw = harness.gbps(nbytes, stats.median_ms)
        row = dict(kind=case.kind, name=case.name, provider=provider.name, mode=mode, dtype=dtype_name,
                   layout=layout, shape=shape_str(shape), median_ms=stats.median_ms, p20_ms=stats.p20_ms,
                   p80_ms=stats.p80_ms, gbps=bw, pct_roofline=100 * bw / self.copy_gbps, peak_mb=peak, **self.env)
        self.emit(row)
        self.progress(f"{label}: {stats.median_ms:.3f} ms, {bw:.1f} GB/s ({row['pct_roofline']:.0f}% of copy)", 1)

    def _peak(self, fn, inputs, call, before, grad) -> Optional[float]:
        """GPU: peak MB allocated by one call on top of what was live. CPU: MB saved for backward
        by one forward (None for inference)."""
        if self.dev.type == "cuda":
            def once():
                if before:
                    before(0)
                call(0)
            return harness.cuda_peak_bytes(once, self.dev) / harness.MiB
        if not grad:
            return None
        return harness.saved_bytes(lambda: fn(*inputs)) / harness.MiB

