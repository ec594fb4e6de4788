"""Helpers of the tests of the whole-module CPU paths (test_se_fused.py, test_triplet_cpu.py,
test_shuffle_cpu.py, test_tiles_cpu.py, test_pyramid_cpu.py): count a path's calls, and check one
training step of a fast module against its reference twin (in 16 bits against float32; NCHW
against the channels_last op path)."""
from __future__ import annotations

import torch


def count_calls(monkeypatch, owner, name: str) -> list:
    """Patch owner.name (a function or an autograd.Function's apply) to append 1 to the returned
    list on every call."""
    calls = []
    orig = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a: calls.append(1) or orig(*a))
    return calls


def op_names(fn) -> set:
    """The names of the ops (e.g. "fastattn_C::nam_train_forward") that fn() ran, from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def check_training_step(ref: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor, tol: float,
                        x_grad: bool = True) -> None:
    """One forward and backward of both modules on copies of x with the same random dy: the
    output, x's gradient (when x_grad), every parameter's gradient and every buffer (BatchNorm
    running statistics) must match within tol."""
    xr, xf = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
    dy = torch.randn_like(x)
    yr, yf = ref(xr), fast(xf)
    yr.backward(dy)
    yf.backward(dy)
    torch.testing.assert_close(yf, yr, rtol=tol, atol=tol)
    if x_grad:
        torch.testing.assert_close(xf.grad, xr.grad, rtol=tol, atol=tol)
    for (name, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=tol, atol=tol, msg=lambda m: f"grad of {name}: {m}")
    for (name, br), bf in zip(ref.named_buffers(), fast.buffers()):
        torch.testing.assert_close(bf, br, rtol=tol, atol=tol, msg=lambda m: f"buffer {name}: {m}")


def check_steps_take_ops(ref: torch.nn.Module, fast: torch.nn.Module, shape: tuple, takes_path, ops: tuple,
                        tol: float, x_grad: bool = True, steps: int = 2) -> None:
    """`steps` training steps on fresh random x of `shape`: fast takes its path (takes_path(x)),
    runs `ops` (profiler names) and matches ref (check_training_step); gradients cleared between."""
    for step in range(steps):
        x = torch.randn(shape) * 2 + step
        assert takes_path(x)
        names = op_names(lambda: check_training_step(ref, fast, x, tol, x_grad=x_grad))
        assert set(ops) <= names, names
        for m in (ref, fast):
            m.zero_grad(set_to_none=True)


def check_backward_twice(module: torch.nn.Module, x: torch.Tensor) -> None:
    """A second backward through the same graph (retain_graph) doubles every gradient: the path's
    backward must not free or overwrite what it saved. dy is non-contiguous (a permuted copy)."""
    b, c, h, w = x.shape
    x = x.detach().requires_grad_()
    dy = torch.randn(b, w, h, c, dtype=x.dtype).permute(0, 3, 2, 1)
    y = module(x)
    y.backward(dy, retain_graph=True)
    once = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    y.backward(dy)
    for twice, single in zip([x.grad] + [p.grad for p in module.parameters()], once):
        torch.testing.assert_close(twice, 2 * single)


def random_pair(name: str, dtype: torch.dtype, *args, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """fastattn.reference.<name>(*args, **kwargs) with normal-random parameters (away from their
    zero / one initialisations) and fastattn.<name> loaded with the same state, both in dtype."""
    import fastattn

    ref = getattr(fastattn.reference, name)(*args, **kwargs).to(dtype)
    fast = getattr(fastattn, name)(*args, **kwargs).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def check_training_step_16bit(ref: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor, tol: float,
                              param_tol: float | None = None) -> None:
    """One training step of fast (already in x's 16-bit dtype) against ref run in float32 on the
    same rounded x and dy: the output, and x's gradient relative to its largest magnitude (and,
    with param_tol, every parameter's the same way) within tol."""
    dy = torch.randn(x.shape).to(x.dtype)
    xr, xf = x.float().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fast(xf)
    yr.backward(dy.float())
    yf.backward(dy)
    assert yf.dtype == x.dtype and xf.grad.dtype == x.dtype
    torch.testing.assert_close(yf.float(), yr, rtol=tol, atol=tol)
    scale = xr.grad.abs().max()
    torch.testing.assert_close(xf.grad.float() / scale, xr.grad / scale, rtol=tol, atol=tol)
    if param_tol is not None:
        for pr, pf in zip(ref.parameters(), fast.parameters()):
            s = pr.grad.abs().max().clamp_min(1e-3)
            torch.testing.assert_close(pf.grad.float() / s, pr.grad / s, rtol=param_tol, atol=param_tol)


def check_same_step_channels_last(module: torch.nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    """A training step of module on NCHW x and on a channels_last copy (which takes the op path
    where the fused CPU paths are NCHW only): the same gradients of x and of every parameter."""
    dy = torch.randn_like(x)
    grads = []
    for xx in (x.detach().clone().requires_grad_(), x.detach().to(memory_format=torch.channels_last).requires_grad_()):
        module.zero_grad()
        module(xx).backward(dy)
        grads.append([xx.grad] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
