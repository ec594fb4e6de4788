"""Construction recipes for every reference class, shared by the generic tests.

Each family file (channel.py, spatial.py, hybrid.py, other.py) defines CASES, a list of Case.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch


@dataclasses.dataclass
class BadInput:
    """One input check: calling the module on `inputs(dtype)` (or constructing it with
    `kwargs` when given) must raise `error` with a message matching `match`."""

    what: str                                   # short id for the test name
    error: type
    match: str                                  # regex on the message: module, argument, expected, given
    inputs: Callable[[], Sequence[Any]] | None = None   # bad call arguments
    kwargs: dict | None = None                  # bad constructor arguments instead


@dataclasses.dataclass
class Case:
    cls: str                                    # name in fastattn.reference
    kwargs: dict
    shapes: Sequence[tuple]                     # input shapes; 4-D ones are feature maps
    id: str = ""
    # Builds the inputs from random tensors of `shapes` (default: the tensors themselves).
    make_inputs: Callable[[Sequence[torch.Tensor]], Sequence[Any]] | None = None
    # Runs the module and returns a flat list of output tensors (default: m(*inputs)).
    run: Callable[..., list] | None = None
    # Parameters that legitimately get no gradient (e.g. IAFF's unused global_att2).
    unused_params: Sequence[str] = ()
    # Shapes for float64 gradcheck (small!); default: `shapes`.
    gradcheck_shapes: Sequence[tuple] | None = None
    # Whether the output keeps the memory format of inputs[0] (False e.g. for logits).
    keeps_format: bool = True
    bad: Sequence[BadInput] = ()
    # gradcheck is skipped only for a stated reason (e.g. argmax ties impossible to avoid).
    skip_gradcheck: str = ""

    @property
    def name(self) -> str:
        return self.id or self.cls


def flat_outputs(out) -> list:
    """Flatten a module's output (tensor, tuple, nested tuple of tensors) into a list."""
    if isinstance(out, torch.Tensor):
        return [out]
    res = []
    for o in out:
        res.extend(flat_outputs(o))
    return res


def rand_inputs(shapes, dtype=torch.float32, channels_last=False, seed=0, relu=False):
    """Random inputs of `shapes`. relu: 4-D maps as a ReLU leaves them (half the values 0), with
    a dead channel (plane 1 all 0) and a dead pixel (0, 0 in every channel): the ties of max pools
    and of max(x a, x s), where torch's gradients split (amax, maximum) or pick one (max_pool)."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for s in shapes:
        t = torch.randn(*s, generator=g, dtype=torch.float64)
        if relu and len(s) == 4:
            t = t.clamp_min(0)
            t[:, min(1, s[1] - 1)] = 0
            t[:, :, 0, 0] = 0
        t = t.to(dtype)
        if channels_last and len(s) == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        xs.append(t)
    return xs


def randomise(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move parameters and BN statistics off their inits (zeros and ones hide errors); fixed
    buffers such as FcaNet's DCT filter are left as built."""
    g = torch.Generator().manual_seed(seed)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if not t.is_floating_point():
                continue
            if "running_var" in name:
                t.copy_(0.5 + 1.5 * torch.rand(t.shape, generator=g, dtype=t.dtype))
            elif name in params or "running_mean" in name:
                t.add_(0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return m
