"""What the microbenchmarks measure: the registry of ops and modules, their shapes, and the bytes
each case must move (the roofline floor).

Modules: every class in `fastattn.FAST_MODULES` (new drop-in modules are picked up as they
appear), plus BASELINE_MODULES (reference-only for now: benchmarked with eager and compile so the
fast versions have a history to beat), plus VARIANTS. A module needs a constructor recipe in
MODULE_KWARGS unless its only required constructor argument is `channels`.

Ops: OPS maps a name to a factory returning an OpCase; add a line there for each new op.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import fastattn
import fastattn.reference as ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("forward", "backward", "forward+backward")

# (C, H, W) of the feature maps the attention modules see.
RESNET50_STAGES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
MOBILENET_MAPS = [(120, 28, 28), (480, 14, 14), (960, 7, 7)]     # MobileNetV3 SE positions
QUICK_MAPS = [(512, 28, 28)]


def feature_shapes(batch: int, quick: bool) -> list[tuple[int, int, int, int]]:
    maps = QUICK_MAPS if quick else RESNET50_STAGES + MOBILENET_MAPS
    return [(batch, *m) for m in maps]


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def parse_shape(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"a shape is BxCxHxW with positive integers, e.g. 8x256x56x56; got {text!r}")
    return tuple(int(p) for p in parts)


# ------------------------------------------------------------------------------------------------
# The roofline floor: bytes that must move. The one place where it is defined.
# ------------------------------------------------------------------------------------------------


def bytes_moved(mode: str, in_bytes: Sequence[int], out_bytes: Sequence[int],
                bwd_reads: Sequence[int], param_bytes: int = 0) -> int:
    """Bytes a perfect implementation moves to or from memory.

    forward:  every input read once + every output written once + the parameters read once.
    backward: dy (one per output) read once + the inputs the gradient formulas need
              (`bwd_reads`, indices into the inputs) read once + one gradient per input written
              once + the parameters read and their gradients written once.
    forward+backward: the sum.
    """
    fwd = sum(in_bytes) + sum(out_bytes) + param_bytes
    bwd = sum(out_bytes) + sum(in_bytes[i] for i in bwd_reads) + sum(in_bytes) + 2 * param_bytes
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Built:
    """One case made concrete for a shape, device and dtype."""

    eager: Callable                  # the reference (nn.Module or function)
    fast: Optional[Callable]         # the fastattn drop-in, or None
    param_bytes: int = 0
    why_no_fast: str = ""


@dataclasses.dataclass
class Case:
    kind: str                                              # "op" or "module"
    name: str
    input_shapes: Callable[[tuple], list[tuple]]           # from x's shape (B, C, H, W)
    output_shapes: Callable[[tuple], list[tuple]]
    bwd_reads: Optional[Sequence[int]]                     # None: the backward reads every input
    build: Callable[[tuple, torch.device, torch.dtype], Built]
    # Concrete fastattn backends this case implements for tensor x ("cpu", "cuda", "triton"),
    # or None when only a trial call can tell (modules compose several ops).
    backends: Optional[Callable[[torch.Tensor], set]] = None

    def bytes(self, shape: tuple, dtype: torch.dtype, mode: str, param_bytes: int = 0) -> int:
        e = torch.empty((), dtype=dtype).element_size()
        ins = [numel(s) * e for s in self.input_shapes(shape)]
        outs = [numel(s) * e for s in self.output_shapes(shape)]
        reads = range(len(ins)) if self.bwd_reads is None else self.bwd_reads
        return bytes_moved(mode, ins, outs, reads, param_bytes)


# ---- ops ---------------------------------------------------------------------------------------


def _op(name: str, fast: Callable, eager: Callable, input_shapes, output_shapes, bwd_reads,
        backends=None) -> Case:
    # backends=None: a trial call under the provider's backend tells (an op without it raises).
    return Case("op", name, input_shapes, output_shapes, bwd_reads,
                lambda shape, device, dtype: Built(eager, fast), backends)


def _ops_module(stem: str):
    return importlib.import_module(f"fastattn.ops.{stem}")


def _channel_scale() -> Case:
    m = _ops_module("gate")
    return _op("channel_scale", m.channel_scale, lambda x, a: x * a[:, :, None, None],
               lambda s: [s, s[:2]], lambda s: [s], (0, 1))


def _channel_mean() -> Case:
    m = _ops_module("pool")
    return _op("channel_mean", m.channel_mean, lambda x: x.mean(dim=(2, 3)),
               lambda s: [s], lambda s: [s[:2]], (), lambda x: {m.channel_mean_backend(x)})


def _channel_pool() -> Case:
    m = _ops_module("pool")
    return _op("channel_pool[mean,max]", lambda x: m.channel_pool(x, ("mean", "max")),
               lambda x: (x.mean(dim=(2, 3)), x.amax(dim=(2, 3))),
               lambda s: [s], lambda s: [s[:2], s[:2]], ())


def _channel_affine_gate() -> Case:
    m = _ops_module("gate")
    return _op("channel_affine_gate", m.channel_affine_gate,
               lambda x, al, be: x * torch.sigmoid(al[:, :, None, None] * x + be[:, :, None, None]),
               lambda s: [s, s[:2], s[:2]], lambda s: [s], (0, 1, 2))


def _spatial_pool() -> Case:
    m = _ops_module("spatial")

    def eager(x, a):
        xa = x * a[:, :, None, None]
        return torch.cat([xa.amax(dim=1, keepdim=True), xa.mean(dim=1, keepdim=True)], dim=1)

    return _op("spatial_pool", m.spatial_pool, eager,
               lambda s: [s, s[:2]], lambda s: [(s[0], 2, s[2], s[3])], (0, 1))


def _spatial_scale() -> Case:
    m = _ops_module("spatial")
    return _op("spatial_scale", m.spatial_scale, lambda x, a, sp: x * a[:, :, None, None] * sp,
               lambda s: [s, s[:2], (s[0], 1, s[2], s[3])], lambda s: [s], (0, 1, 2))


def _coord_pool() -> Case:
    m = _ops_module("coord")
    return _op("coord_pool", m.coord_pool, lambda x: (x.mean(dim=3), x.mean(dim=2)),
               lambda s: [s], lambda s: [s[:3], (*s[:2], s[3])], ())


def _coord_scale() -> Case:
    m = _ops_module("coord")
    return _op("coord_scale", m.coord_scale, lambda x, ah, aw: x * ah[:, :, :, None] * aw[:, :, None, :],
               lambda s: [s, s[:3], (*s[:2], s[3])], lambda s: [s], (0, 1, 2))


def _simam() -> Case:
    m = _ops_module("simam")
    return _op("simam", m.simam, ref.SimAM(1e-4), lambda s: [s], lambda s: [s], (0,))


def _channel_pool_std() -> Case:
    m = _ops_module("pool")
    return _op("channel_pool[mean,std]", lambda x: m.channel_pool(x, ("mean", "std")),
               lambda x: (x.mean(dim=(2, 3)), (x.var(dim=(2, 3)) + 1e-5).sqrt()),
               lambda s: [s], lambda s: [s[:2], s[:2]], (0,))


def _dct_pool() -> Case:
    m = _ops_module("pool")
    return _op("dct_pool", m.dct_pool, lambda x, w: (x * w).sum(dim=(2, 3)),
               lambda s: [s, s[1:]], lambda s: [s[:2]], (0, 1))


PYRAMID = (1, 2, 4)     # SpatialPyramidAttention's levels


def _bin_mean() -> Case:
    m = _ops_module("bins")

    def eager(x):
        return torch.cat([F.adaptive_avg_pool2d(x, n).flatten(2) for n in PYRAMID], dim=2)

    return _op("bin_mean[1,2,4]", lambda x: m.bin_mean(x, PYRAMID, mode="adaptive"), eager,
               lambda s: [s], lambda s: [(*s[:2], sum(n * n for n in PYRAMID))], ())


def _zpool() -> Case:
    m = _ops_module("spatial")

    def eager(x):      # Triplet's cw branch: permute, then max and mean over the new dim 1
        xp = x.permute(0, 2, 1, 3)
        return torch.cat([xp.amax(dim=1, keepdim=True), xp.mean(dim=1, keepdim=True)], dim=1)

    return _op("zpool[dim=2]", lambda x: m.zpool(x, 2), eager,
               lambda s: [s], lambda s: [(s[0], 2, s[1], s[3])], (0,))


def _channel_spatial_gate(mode: str) -> Callable[[], Case]:
    def factory() -> Case:
        m = _ops_module("gate")

        def eager(x, a, sp):
            a = a[:, :, None, None]
            if mode == "add":
                return x * a + x * sp
            return x * (1 + torch.sigmoid(a * sp))

        return _op(f"channel_spatial_gate[{mode}]", lambda x, a, sp: m.channel_spatial_gate(x, a, sp, mode), eager,
                   lambda s: [s, s[:2], (s[0], 1, s[2], s[3])], lambda s: [s], (0, 1, 2))
    return factory


def _sge_groups(c: int) -> int:
    return _largest_divisor(c, min(64, max(1, c // 4)))


def _sge_gate() -> Case:
    m = _ops_module("group")

    def eager(x, weight, bias, eps=1e-5):     # SpatialGroupEnhance after its parameters
        B, C, H, W = x.shape
        g = weight.shape[1]
        xg = x.reshape(B * g, C // g, H, W)
        xn = (xg * xg.mean(dim=(2, 3), keepdim=True)).sum(dim=1).reshape(B * g, H * W)
        t = (xn - xn.mean(dim=1, keepdim=True)) / (xn.std(dim=1, keepdim=True) + eps)
        t = t.reshape(B, g, H, W) * weight + bias
        return (xg * torch.sigmoid(t.reshape(B * g, 1, H, W))).reshape(B, C, H, W)

    def fast(x, weight, bias):
        return m.sge_gate(x, weight, bias, weight.shape[1])

    groups = lambda s: (1, _sge_groups(s[1]), 1, 1)     # noqa: E731
    return _op("sge_gate", fast, eager, lambda s: [s, groups(s), groups(s)], lambda s: [s], (0, 1, 2))


SK_BRANCHES = 2


def _branch_softmax_sum() -> Case:
    m = _ops_module("branch")

    def eager(feats, logits):
        return (feats * torch.softmax(logits, dim=1)[..., None, None]).sum(dim=1)

    return _op("branch_softmax_sum", m.branch_softmax_sum, eager,
               lambda s: [(s[0], SK_BRANCHES, *s[1:]), (s[0], SK_BRANCHES, s[1])], lambda s: [s], (0, 1))


# name -> factory; a factory that raises ImportError / AttributeError (op not there) is skipped.
# Each entry: the fast function, the eager PyTorch equivalent, the input and output shapes from
# x's shape, and which inputs the backward must read (for the roofline, see bytes_moved).
OPS: dict[str, Callable[[], Case]] = {
    "channel_scale": _channel_scale,
    "channel_mean": _channel_mean,
    "channel_pool[mean,max]": _channel_pool,
    "channel_affine_gate": _channel_affine_gate,
    "spatial_pool": _spatial_pool,
    "spatial_scale": _spatial_scale,
    "coord_pool": _coord_pool,
    "coord_scale": _coord_scale,
    "simam": _simam,
    "channel_pool[mean,std]": _channel_pool_std,
    "dct_pool": _dct_pool,
    "bin_mean[1,2,4]": _bin_mean,
    "zpool[dim=2]": _zpool,
    "channel_spatial_gate[add]": _channel_spatial_gate("add"),
    "channel_spatial_gate[bam]": _channel_spatial_gate("bam"),
    "sge_gate": _sge_gate,
    "branch_softmax_sum": _branch_softmax_sum,
}


# ---- modules -----------------------------------------------------------------------------------

def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


# Constructor keyword arguments per module from the feature map's (C, H, W), where the defaults
# (with `channels=C` when the constructor takes it) do not do.
MODULE_KWARGS: dict[str, Callable[[int, int, int], dict]] = {
    "SqueezeExcite": lambda c, h, w: dict(channels=c, reduction=16),
    "ECA": lambda c, h, w: dict(channels=c, k_size=3),
    "CBAM": lambda c, h, w: dict(channels=c, reduction=16),
    "CoordinateAttention": lambda c, h, w: dict(channels=c, reduction=32),
    "SimAM": lambda c, h, w: dict(e_lambda=1e-4),
    "SpatialGroupEnhance": lambda c, h, w: dict(groups=_sge_groups(c)),
    "MultiSpectralAttention": lambda c, h, w: dict(  # FcaNet: the DCT grid is the map (at least 7x7)
        channels=c, dct_h=max(7, h), dct_w=max(7, w),
        freq_sel_method=next(f"top{n}" for n in (16, 8, 4, 2, 1) if c % n == 0)),
    "ShuffleAttention": lambda c, h, w: dict(channels=c, groups=_largest_divisor(c // 2, 64)),
}
BASELINE_MODULES = ("CBAM", "CoordinateAttention", "SimAM")
# name -> (class, number of feature-map inputs, backward reads): SE with the residual add fused.
VARIANTS = {"SqueezeExcite+residual": ("SqueezeExcite", 2, (0,))}


def module_kwargs(cls_name: str, c: int, h: int, w: int) -> Optional[dict]:
    """Constructor kwargs for a (C, H, W) map, or None when there is no recipe."""
    if cls_name in MODULE_KWARGS:
        return MODULE_KWARGS[cls_name](c, h, w)
    params = inspect.signature(getattr(ref, cls_name).__init__).parameters
    required = [n for n, p in list(params.items())[1:]
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if set(required) <= {"channels"}:
        return {"channels": c} if "channels" in params else {}
    return None


def n_feature_inputs(cls_name: str) -> int:
    """Required positional arguments of the forward (each taken to be a map like x)."""
    params = list(inspect.signature(getattr(ref, cls_name).forward).parameters.values())[1:]
    return max(1, sum(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                      for p in params))


def _build_module(cls_name: str, shape: tuple, device, dtype) -> Built:
    _, c, h, w = shape
    kwargs = module_kwargs(cls_name, c, h, w)
    if kwargs is None:
        raise LookupError(f"no constructor recipe for {cls_name}: add it to MODULE_KWARGS in bench/cases.py")
    eager = getattr(ref, cls_name)(**kwargs).to(device=device, dtype=dtype)
    fast, why = None, ""
    if cls_name in fastattn.FAST_MODULES:
        fast = getattr(fastattn, cls_name)(**kwargs).to(device=device, dtype=dtype)
        fast.load_state_dict(eager.state_dict())
    else:
        why = f"no fastattn.{cls_name} yet (not in fastattn.FAST_MODULES)"
    params = sum(p.numel() * p.element_size() for p in eager.parameters())
    return Built(eager, fast, params, why)


def _module(name: str, cls_name: str, n_maps: int, bwd_reads) -> Case:
    return Case("module", name, lambda s: [s] * n_maps, lambda s: [s], bwd_reads,
                lambda shape, device, dtype: _build_module(cls_name, shape, device, dtype))


def module_names() -> list[str]:
    names = list(fastattn.FAST_MODULES) + [m for m in BASELINE_MODULES if m not in fastattn.FAST_MODULES]
    return names + [v for v, (cls, _, _) in VARIANTS.items() if cls in names]


def module_case(name: str) -> Case:
    if name in VARIANTS:
        cls_name, n_maps, reads = VARIANTS[name]
        return _module(name, cls_name, n_maps, reads)
    n = n_feature_inputs(name)
    return _module(name, name, n, (0,) if n == 1 else None)


def op_case(name: str) -> Case:
    return OPS[name]()


def all_cases(ops: Optional[Sequence[str]] = None, modules: Optional[Sequence[str]] = None,
              quick: bool = False) -> tuple[list[Case], list[str]]:
    """The cases to run and notes on those that cannot be built. None selects the default set:
    every op and module (in --quick: the ops and fastattn.FAST_MODULES)."""
    notes, cases = [], []
    if ops is None:
        ops = list(OPS)
    if modules is None:
        modules = list(fastattn.FAST_MODULES) if quick else module_names()
    for name in ops:
        try:
            cases.append(op_case(name))
        except (ImportError, AttributeError) as e:
            notes.append(f"op {name}: not available ({e})")
    for name in modules:
        cases.append(module_case(name))
    return cases, notes


def make_inputs(case: Case, shape: tuple, device, dtype, layout: str, n: int,
                seed: int = 0) -> list[list[torch.Tensor]]:
    """n independent sets of random (normal) inputs for the case, feature maps in `layout`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(n):
        ts = []
        for s in case.input_shapes(shape):
            fmt = LAYOUTS[layout] if len(s) == 4 else torch.contiguous_format
            ts.append(torch.empty(s, device=device, dtype=dtype, memory_format=fmt).normal_(generator=gen))
        sets.append(ts)
    return sets

