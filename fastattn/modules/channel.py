"""Fast channel attention modules: pool once, gate once."""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .. import _ext, reference
from ..reference.channel import _ConvMlp
from ..ops import _dispatch
from ..ops.bins import bin_mean
from ..ops.gate import channel_affine_gate, channel_scale
from ..ops.pool import channel_mean, channel_pool, dct_pool
from ..reference._checks import check_feature_map, check_same_shape, check_tensor, like_input


class SqueezeExcite(reference.SqueezeExcite):
    """`fastattn.reference.SqueezeExcite` with a fused pool and gate (+ residual add).

    Two passes over x: the channel mean, then ``x * g (+ residual)`` in one pass. In CPU
    inference, one read of x from memory (see `one_read`).
    """

    backend: str | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        check_feature_map("SqueezeExcite", x, channels=self.channels)
        if residual is not None:
            check_tensor("SqueezeExcite", "residual", residual, dim=4, shape_hint="(B, C, H, W)")
            check_same_shape("SqueezeExcite", "residual", residual, "x", x)
        if self.one_read(x, residual):
            return _se_one_read(x, self.fc1, self.fc2, residual)
        if self.train_fused(x, residual):
            excite, plain = _mlp_gate(self.fc1, self.act, self.fc2, self.gate)
            return _pooled_gate(self, x, excite, one_read=plain if type(self.gate) is torch.nn.Sigmoid else None)
        s = _mean(x, self.backend)[:, :, None, None]
        g = self.gate(self.fc2(self.act(self.fc1(s)))).flatten(1)
        return channel_scale(x, g, residual, backend=self.backend)

    def one_read(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
        """Whether forward runs the one-read C++ inference kernel (`fastattn_C::se_forward`: one
        sample per thread, its means, its MLP and its scale while it is in that core's cache)
        instead of the channel_mean + channel_scale pair: see `_one_read_ok`; the layers must be
        the constructor's (1x1 convs, ReLU, sigmoid: the kernel's math)."""
        return (type(self.gate) is torch.nn.Sigmoid and _conv_mlp_weights(self.fc1, self.act, self.fc2) is not None
                and _one_read_ok(self, "se_forward", x, residual))

    def train_fused(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
        """Whether forward runs the two-pass CPU training path (`_PooledGate`) instead of the op
        path: see `_train_fused_ok`; without a residual."""
        return residual is None and _train_fused_ok(self, x)


_CHANNELS_LAST_KERNELS = ("se_forward", "eca_forward")


def _hooked_submodules(module: torch.nn.Module) -> bool:
    """Whether a submodule has forward (pre-)hooks. The whole-module kernels read the layers'
    weights without calling the layers, so such hooks would not run: pruning's pre-hook, which
    recomputes the weight from its mask, would leave a stale weight (wrong outputs after an
    optimizer step; a second backward through a freed graph in training)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module)


def _one_read_ok(module: torch.nn.Module, raw_op: str, x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """The conditions of the one-read inference kernels (csrc/cpu/se.cpp): backend "auto" or "cpu"
    on CPU tensors, 16/32-bit NCHW x (channels_last too for SE's and ECA's kernels; a residual in
    x's layout and dtype), no gradient recorded (eager, no tensor
    subclass or mode), no forward hooks on the layers, at least one sample per thread (they run a
    sample per thread), and one sample per thread fits twice over in the last-level cache."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if _hooked_submodules(module):
        return False
    # NCHW, or channels_last for the kernels with a channels_last loop (the mean-gated ones)
    fmt = torch.contiguous_format
    if not x.is_contiguous():
        if raw_op not in _CHANNELS_LAST_KERNELS or not x.is_contiguous(memory_format=torch.channels_last):
            return False
        fmt = torch.channels_last
    if residual is not None and (not residual.is_contiguous(memory_format=fmt) or residual.dtype != x.dtype):
        return False         # (the two-op path converts a residual of another dtype, as the reference promotes)
    if (module.backend or _dispatch.get_backend()) not in ("auto", "cpu") or _RAW_CHECKS[raw_op](x) is not None:
        return False
    if not _dispatch.direct("cpu", x, residual):
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        return False         # the parameters' gradients need the autograd path
    threads = torch.get_num_threads()
    return x.shape[0] >= threads and 2 * threads * x[0].numel() * x.element_size() <= _llc_bytes()


def _se_one_read(x: torch.Tensor, fc1: torch.nn.Conv2d, fc2: torch.nn.Conv2d,
                 residual: torch.Tensor | None) -> torch.Tensor:
    """x * sigmoid(fc2(relu(fc1(mean(x))))) (+ residual) by `fastattn_C::se_forward` (fp32 weights)."""
    def flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().float().reshape(t.shape[0], -1).contiguous()

    b1, b2 = flat(fc1.bias), flat(fc2.bias)
    return torch.ops.fastattn_C.se_forward(x, flat(fc1.weight), None if b1 is None else b1.reshape(-1),
                                           flat(fc2.weight), None if b2 is None else b2.reshape(-1), residual)


_RAW_CHECKS = {op: _dispatch.cpu_kernel(op)
               for op in ("se_forward", "eca_forward", "srm_forward", "cbam_forward", "fca_forward", "scse_forward")}
_RAW_CHECKS["train"] = _dispatch.cpu_kernel("channel_dot", "channel_scale_affine_backward", "channel_pool",
                                            "channel_scale")
_RAW_CHECKS["train_one_read"] = _dispatch.cpu_kernel("pooled_gate_train_forward", "pooled_gate_train_backward")
_RAW_CHECKS["nam_train"] = _dispatch.cpu_kernel("nam_train_forward", "nam_train_backward")
_RAW_CHECKS["srm_train"] = _dispatch.cpu_kernel("srm_train_forward", "srm_train_backward")
_RAW_CHECKS["cbam_train"] = _dispatch.cpu_kernel("cbam_backward_sums", "cbam_backward_pool_grad", "cbam_backward_dx",
                                                 "spatial_pool", "spatial_scale", "gate_conv", "gate_conv_backward")


def _train_fused_ok(module: torch.nn.Module, x: torch.Tensor, raw_op: str = "train",
                    channels_last: bool = False) -> bool:
    """The conditions of `_PooledGate`, the CPU training path of the pooled-gate modules (and of
    the other training paths built the same way, with their kernels `_RAW_CHECKS[raw_op]`):
    backend "auto" or "cpu" on a CPU tensor of NCHW planes (its passes run plane by plane; or
    channels_last, where `channels_last`), a gradient to record (of x or of a parameter), eager
    mode with plain tensors, no forward hooks on the layers (`_hooked_submodules`), and not
    compiling (torch.compile traces the op path)."""
    if torch.compiler.is_compiling():
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return False
    if not (x.is_contiguous() or (channels_last and x.is_contiguous(memory_format=torch.channels_last))):
        return False
    if not torch.is_grad_enabled():
        return False
    if (module.backend or _dispatch.get_backend()) not in ("auto", "cpu") or _RAW_CHECKS[raw_op](x) is not None:
        return False
    params = list(module.parameters())
    if not (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    if type(x) not in (torch.Tensor, torch.nn.Parameter) or not _dispatch._no_modes() or _hooked_submodules(module):
        return False
    return all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in params)


def _cpu_path_ok(module: torch.nn.Module, x: torch.Tensor, raw_op: str) -> bool:
    """The conditions shared by the whole-module CPU paths of the modules with a `cpu_fused`
    (TripletAttention, ShuffleAttention, TiledSqueezeExcite, SpatialPyramidAttention, BAM), with or
    without a gradient: backend "auto" or "cpu" on a non-empty NCHW-contiguous CPU tensor of a float
    dtype whose raw kernels (`_RAW_CHECKS[raw_op]`) are built, eager mode with plain tensors
    (torch.compile traces the op path), no forward hooks on the layers (`_hooked_submodules`)."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or not x.is_contiguous() or x.numel() == 0:
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return False
    if (module.backend or _dispatch.get_backend()) not in ("auto", "cpu") or _RAW_CHECKS[raw_op](x) is not None:
        return False
    if type(x) not in (torch.Tensor, torch.nn.Parameter) or not _dispatch._no_modes() or _hooked_submodules(module):
        return False
    return all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in module.parameters())


class _PooledGate(torch.autograd.Function):
    """y = x * gate(stats(x)) on CPU in training, its backward in two passes over x.

    stats are per-plane means (and, for SRM, standard deviations sqrt(unbiased var + eps)), or
    FcaNet's DCT pool (the sum of x * filter[c] per plane: `filt`);
    gate maps them to a (B, C) gate with the module's own layers, recorded by autograd at forward
    (so a BatchNorm updates its running statistics once). Backward: pass 1 sums dy * x per plane
    (the gate's gradient), autograd takes it through the gate to the statistics and parameters,
    pass 2 writes dx = dy * g + (the statistics' gradient terms) in one go. The op path instead
    writes dy * g, the pooling's gradient and their sum: three full passes more.

    `one_read` (the gate's float32 weights (filter, w1, b1, w2, b2, conv_w): `_conv_mlp_weights`,
    `ECA._kernel_weights`, `MultiSpectralAttention._kernel_weights`): the forward and the backward
    each read x (and dy) from memory once, a sample per thread while it is in that core's cache
    (`fastattn_C::pooled_gate_train_*`: the kernel computes the gate of y and the statistics'
    gradient of dx itself; autograd's graph of the gate gives the parameters' gradients).
    """

    @staticmethod
    def forward(ctx, x, with_std, eps, gate_fn, filt, one_read, *params):
        ctx.one_read = one_read is not None
        if one_read is not None:
            y, stat, g_acc = torch.ops.fastattn_C.pooled_gate_train_forward(x, *one_read)
            with torch.enable_grad():
                leaves = [stat.to(x.dtype).requires_grad_()]
                g = gate_fn(*leaves)
            ctx.save_for_backward(x, g_acc, stat, *one_read)
            ctx.graph = (g, leaves, params)
            ctx.with_std, ctx.filt = False, filt
            return y
        if filt is not None:
            stats, saved = [torch.ops.fastattn_C.dct_pool(x, filt)], []
        elif with_std:   # mean and std in x's dtype (for the gate), then in the accumulation dtype
            mean, std, mean_acc, std_acc = torch.ops.fastattn_C.channel_pool(x, ["mean", "std"], eps)
            stats, saved = [mean, std], [mean_acc, std_acc]
        else:
            stats, saved = [torch.ops.fastattn_C.channel_mean(x)], []
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in stats]
            g = gate_fn(*leaves)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        g_acc = g.detach().to(acc).contiguous()
        ctx.save_for_backward(x, g_acc, *saved)
        ctx.graph = (g, leaves, params)
        ctx.with_std = with_std
        ctx.filt = filt
        return torch.ops.fastattn_C.channel_scale(x, g_acc, None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, g_acc, *saved = ctx.saved_tensors
        g, leaves, params = ctx.graph
        want = [p for p in params if p.requires_grad]
        need_x = ctx.needs_input_grad[0]
        if ctx.one_read and need_x and dy.is_contiguous():
            dx, dg = torch.ops.fastattn_C.pooled_gate_train_backward(dy, x, saved[0], g_acc, *saved[1:])
            grads = torch.autograd.grad(g, want, dg.to(g.dtype), allow_unused=True, retain_graph=True) if want else []
            return (dx, None, None, None, None, None, *_per_param(params, grads))
        dg = torch.ops.fastattn_C.channel_dot(dy, x)
        # retain_graph: the outer graph may be run again (backward(retain_graph=True)); the gate's
        # small graph is freed with it
        grads = torch.autograd.grad(g, (leaves if need_x else []) + want, dg.to(g.dtype), allow_unused=True,
                                    retain_graph=True)
        dx = None
        if need_x:
            hw = x.shape[2] * x.shape[3]
            dstat = grads[0].to(g_acc.dtype) if grads[0] is not None else torch.zeros_like(g_acc)
            k, a, filt, e = None, dstat / hw, None, None    # d mean / dx = 1 / HW (k None: no x term, x unread)
            if ctx.filt is not None:       # d sum(x * filter) / dx = filter
                a, filt, e = torch.zeros_like(g_acc), ctx.filt.to(g_acc.dtype).contiguous(), dstat
            if ctx.with_std and grads[1] is not None:
                mean, std = saved[:2]      # d std / dx = (x - mean) / ((HW - 1) std)
                k = (grads[1].to(g_acc.dtype) / ((hw - 1) * std)).contiguous()
                a = a - k * mean
            dx = torch.ops.fastattn_C.channel_scale_affine_backward(dy, x, g_acc, k, a.contiguous(), filt, e)
        return (dx, None, None, None, None, None, *_per_param(params, grads[len(leaves) if need_x else 0:]))


def _conv_mlp_weights(fc1: torch.nn.Module, act: torch.nn.Module, fc2: torch.nn.Module) -> tuple | None:
    """fc2(relu(fc1(s))) by two plain 1x1 convs as the one-read kernels' MLP weights
    (filter, w1, b1, w2, b2, conv_w) = (None, (hidden, C), (hidden,), (C, hidden), (C,), None),
    views of the parameters; None for other layers."""
    def plain(c: torch.nn.Module) -> bool:
        return (type(c) is torch.nn.Conv2d and c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0)
                and c.dilation == (1, 1) and c.groups == 1)

    if not (plain(fc1) and plain(fc2) and type(act) is torch.nn.ReLU):
        return None

    def flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().reshape(t.shape[0], -1)

    b1, b2 = (None if b is None else b.detach() for b in (fc1.bias, fc2.bias))
    return None, flat(fc1.weight), b1, flat(fc2.weight), b2, None


def _mlp_gate(fc1: torch.nn.Module, act: torch.nn.Module, fc2: torch.nn.Module, gate) -> tuple:
    """(excite, plain): excite maps (B, C) statistics to the (B, C) gate gate(fc2(act(fc1(m))));
    plain is `_conv_mlp_weights` of the layers (None unless two plain 1x1 convs around a ReLU).
    For plain layers excite runs two F.linear on views of the convs' weights: the same math
    without the 1x1 convolutions' (oneDNN's) per-call cost (0.3 ms forward and 0.6 ms backward at
    B = 32, C = 1024, a sixth of SE's training step)."""
    plain = _conv_mlp_weights(fc1, act, fc2)
    if plain is None:
        return (lambda m: gate(fc2(act(fc1(m[..., None, None])))).flatten(1)), None

    def excite(m: torch.Tensor) -> torch.Tensor:
        h = F.linear(m, fc1.weight.flatten(1), fc1.bias).relu()
        return gate(F.linear(h, fc2.weight.flatten(1), fc2.bias))
    return excite, plain


def _per_param(params, grads) -> list:
    """The gradients of `params` in order: the next of `grads` for those that require one, else None."""
    it = iter(grads)
    return [next(it) if p.requires_grad else None for p in params]


def _pooled_gate(module: torch.nn.Module, x: torch.Tensor, gate_fn, with_std: bool = False,
                 eps: float = 1e-5, filt: torch.Tensor | None = None,
                 one_read: tuple[torch.Tensor | None, ...] | None = None) -> torch.Tensor:
    if one_read is not None and not _one_read_train_ok(x, one_read):
        one_read = None
    return _PooledGate.apply(x, with_std, eps, gate_fn, filt, one_read, *module.parameters())


def _one_read_train_ok(x: torch.Tensor, weights: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether `_PooledGate` takes its one-read kernels (on top of `_train_fused_ok`): 16/32-bit
    x, no autocast, the gate's weights float32 and contiguous (no copies: autograd checks that
    they are not modified before backward; so through the modules, whose gates need x's dtype,
    float32 x), at least one sample per thread, and two samples per thread (x, or dy and x) fit
    twice over in the last-level cache."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or torch.is_autocast_enabled("cpu"):
        return False
    if _RAW_CHECKS["train_one_read"](x) is not None:
        return False
    if any(w is not None and (w.dtype != torch.float32 or not w.is_contiguous()) for w in weights):
        return False
    threads = torch.get_num_threads()
    return x.shape[0] >= threads and 4 * threads * x[0].numel() * x.element_size() <= _llc_bytes()


@functools.lru_cache(maxsize=None)
def _llc_bytes() -> int:
    return int(_ext.build_info().get("llc_bytes", 0))


class ECA(reference.ECA):
    """`fastattn.reference.ECA` with a fused pool and gate; in CPU inference, one read of x
    (see `one_read`)."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("ECA", x, channels=self.channels)
        if self.one_read(x):
            return torch.ops.fastattn_C.eca_forward(x, self.conv.weight.detach().float().reshape(-1).contiguous())
        if self.train_fused(x):
            return _pooled_gate(self, x, lambda m: torch.sigmoid(self.conv(m.unsqueeze(1)).squeeze(1)),
                                one_read=self._kernel_weights())
        y = self.conv(_mean(x, self.backend).unsqueeze(1)).squeeze(1)
        return channel_scale(x, torch.sigmoid(y), backend=self.backend)

    def one_read(self, x: torch.Tensor) -> bool:
        """Whether forward runs the one-read C++ inference kernel (`fastattn_C::eca_forward`, as
        SqueezeExcite's) instead of channel_mean + channel_scale: see `_one_read_ok`; the conv
        must be the constructor's (`_kernel_weights`: odd k, zero padding, no bias)."""
        return self._kernel_weights() is not None and _one_read_ok(self, "eca_forward", x)

    def train_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the two-pass CPU training path (`_PooledGate`) instead of the op
        path: see `_train_fused_ok`."""
        return _train_fused_ok(self, x)

    def _kernel_weights(self) -> tuple | None:
        """The conv's taps for `_PooledGate`'s one-read kernels (filter, w1, b1, w2, b2, conv_w),
        or None unless it is the constructor's conv (odd k, zero padding (k - 1) / 2, no bias)."""
        c = self.conv
        k = c.kernel_size[0]
        plain = (type(c) is torch.nn.Conv1d and c.in_channels == 1 and c.out_channels == 1 and c.bias is None
                 and k % 2 == 1 and c.padding == ((k - 1) // 2,) and c.stride == (1,) and c.dilation == (1,)
                 and c.padding_mode == "zeros")
        return (None, None, None, None, None, c.weight.detach().reshape(-1)) if plain else None


class NAM(reference.NAM):
    """`fastattn.reference.NAM` as one gate pass: the BatchNorm and the channel weights fold into
    a per-channel affine map inside the sigmoid, ``x * sigmoid(alpha_c x + beta_c)``.

    Train mode reads x once more for the batch statistics (`plane_var_mean`) and updates the
    running statistics as nn.BatchNorm2d does; on the CPU (see `train_fused`) one C++ kernel
    per direction does it channel by channel, reading x (and dy) from memory once.
    """

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("NAM", x, channels=self.channels)
        bn = self.bn2
        gamma = bn.weight.detach().abs()
        w = gamma / gamma.sum()
        if self.train_fused(x):
            y, mean, var = _NAMTrain.apply(x, w, bn.eps, bn.weight, bn.bias)
            _update_running_stats(bn, mean, var, x.numel() // x.shape[1])
            return y
        mean, var = _batch_norm_stats(bn, x, self.backend)
        scale = bn.weight * torch.rsqrt(var + bn.eps)
        alpha = (w * scale).expand(x.shape[0], -1)
        beta = (w * (bn.bias - mean * scale)).expand(x.shape[0], -1)
        return channel_affine_gate(x, alpha, beta, backend=self.backend)

    def train_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the CPU training kernels (`fastattn_C::nam_train_forward` /
        `_backward`, `_NAMTrain`) instead of the op path: the BatchNorm normalises with the batch
        statistics (train mode, or no running statistics), float32 affine parameters, 16/32-bit
        x, and the conditions of `_cpu_path_ok`."""
        return (_batch_stats_bn_ok(self.bn2, x) and x.shape[0] * x.shape[2] * x.shape[3] > 1
                and _cpu_path_ok(self, x, "nam_train"))


def _batch_stats_bn_ok(bn: torch.nn.Module, x: torch.Tensor, *more: torch.Tensor) -> bool:
    """The BatchNorm conditions of NAM's and SRM's training kernels: an nn.BatchNorm2d that
    normalises with the batch statistics (train mode, or no running statistics), affine, with
    float32 parameters (and float32 `more`), and 16/32-bit x."""
    if type(bn) is not torch.nn.BatchNorm2d or not (bn.training or bn.running_mean is None):
        return False
    if bn.weight is None or bn.bias is None or x.dtype == torch.float64:
        return False
    return all(p.dtype == torch.float32 for p in (bn.weight, bn.bias, *more))


class _NAMTrain(torch.autograd.Function):
    """(y, mean, var) of NAM's training forward, y = x * sigmoid(w * batchnorm(x)) with w a
    constant: the batch statistics, the gate and its backward channel by channel in C++."""

    @staticmethod
    def forward(ctx, x, w, eps, gamma, bias):
        w = w.float().contiguous()
        y, mean, var = torch.ops.fastattn_C.nam_train_forward(x, gamma.detach(), bias.detach(), w, eps)
        ctx.save_for_backward(x, gamma, bias, w, mean, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        x, gamma, bias, w, mean, var = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        dx, dgamma, dbias = torch.ops.fastattn_C.nam_train_backward(
            dy.contiguous(), x, gamma.detach(), bias.detach(), w, ctx.eps, mean, var, need_x)
        return (dx if need_x else None), None, None, dgamma, dbias


def _update_running_stats(bn: torch.nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """bn's running statistics after a training batch of n values per channel with these batch
    statistics (var the population variance), as nn.BatchNorm2d updates them."""
    if not (bn.training and bn.track_running_stats):
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
        unbiased = var * (n / max(n - 1, 1))
        bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)


def plane_var_mean(x: torch.Tensor, eps: float, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(var, mean) of every (b, c) plane of x (B, C, H, W): the population variance and the mean,
    (B, C) each, for a caller that normalises with ``rsqrt(var + eps)``.

    fp32 / fp64 x with eps > 0 and H * W >= 2: one read of x by `channel_pool` (mean, std) with
    std = sqrt(unbiased var + eps), so var = (std^2 - eps) (HW - 1) / HW: its rounding error is
    relative to var + eps, and eps > 0 keeps the gradient through std finite on constant planes.
    Otherwise torch.var_mean on an fp32 copy (channel_pool returns 16-bit statistics for 16-bit x),
    which on CPU is several times slower than a pass over memory.
    """
    hw = x.shape[2] * x.shape[3]
    if x.dtype in (torch.float32, torch.float64) and eps > 0 and hw >= 2:
        mean, std = channel_pool(x, ("mean", "std"), eps=eps, backend=backend)
        return ((std * std - eps) * ((hw - 1) / hw)).clamp_min(0), mean
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.var_mean(x.to(acc), dim=(2, 3), unbiased=False)


def _batch_norm_stats(bn: torch.nn.BatchNorm2d, x: torch.Tensor,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) that bn would normalise x with, updating its running statistics in train mode
    exactly as nn.BatchNorm2d does (momentum, or a cumulative average when momentum is None)."""
    use_batch = bn.training or bn.running_mean is None
    if not use_batch:
        return bn.running_mean, bn.running_var
    # per-plane statistics, then the law of total variance over the batch (equal plane sizes)
    var_p, mean_p = plane_var_mean(x, bn.eps, backend)
    mean = mean_p.mean(0)
    var = var_p.mean(0) + (mean_p - mean).square().mean(0)
    _update_running_stats(bn, mean.detach(), var.detach(), x.numel() // x.shape[1])
    return mean, var


class GatherExcite(reference.GatherExcite):
    """`fastattn.reference.GatherExcite` with a fused gate whenever the gathered map is 1 x 1
    (``extent=0``: the global mean, or the feature-size depthwise conv): two passes over x.

    With ``extent > 0`` the gate varies over H x W (a nearest upsample of a strided pool) and
    the module runs the reference forward; `fused` says which.
    """

    backend: str | None = None

    @property
    def fused(self) -> bool:
        return self.extent == 0

    def train_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the two-pass CPU training path (`_PooledGate`) instead of the op
        path: see `_train_fused_ok`; the global mean gathered (extent 0, no depthwise gather)."""
        return self.fused and self.gather is None and _train_fused_ok(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        check_feature_map("GatherExcite", x, channels=self.channels)
        if self.gather is not None:
            if self.feat_size is not None and tuple(x.shape[-2:]) != self.feat_size:
                raise ValueError(
                    f"GatherExcite: argument 'x' must have spatial size feat_size={self.feat_size} "
                    f"(global gather with extra_params=True), got {tuple(x.shape[-2:])}"
                )
            g = self.gather_act(self.gather(x))
        elif (type(self.mlp) is _ConvMlp and _conv_mlp_weights(self.mlp.fc1, self.mlp.act, self.mlp.fc2) is not None
              and _one_read_ok(self, "se_forward", x)):
            return _se_one_read(x, self.mlp.fc1, self.mlp.fc2, None)    # SE's math: one read in CPU inference
        elif self.train_fused(x):
            if type(self.mlp) is _ConvMlp:
                excite, plain = _mlp_gate(self.mlp.fc1, self.mlp.act, self.mlp.fc2, torch.sigmoid)
            else:
                excite, plain = (lambda m: torch.sigmoid(self.mlp(m[:, :, None, None])).flatten(1)), None
            return _pooled_gate(self, x, excite, one_read=plain)
        else:
            g = _mean(x, self.backend)[:, :, None, None]
        return channel_scale(x, torch.sigmoid(self.mlp(g)).flatten(1), backend=self.backend)


class SpatialPyramidAttention(reference.SpatialPyramidAttention):
    """`fastattn.reference.SpatialPyramidAttention` in two passes over x: the 1 + 4 + 16 adaptive
    bins in one read, then the gate in one pass.

    On the CPU path (`cpu_fused`: NCHW, eager) the bins come from `fastattn_C::pyramid_mean`
    straight in the layout of the reference's concatenated pooled vector (no cat, and in training
    no slicing of its gradient); with a gradient recorded, `_BinGateCPU`, whose backward is two
    passes: the sums of dy * x per plane (the gate's gradient), then dx = dy * g + the bins'
    gradient in one write (`fastattn_C::pyramid_scale_backward_dx`). The op path writes dy * g and
    the bins' gradient, then adds them: two passes more.
    """

    backend: str | None = None
    _LEVELS = (1, 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SpatialPyramidAttention", x, channels=self.channels)
        if self.cpu_fused(x):
            params = list(self.parameters())
            if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
                return _BinGateCPU.apply(x, _pyramid_kernels(self._LEVELS), self.fc, *params)
            g = self.fc(torch.ops.fastattn_C.pyramid_mean(x, self._LEVELS))        # fc ends in a sigmoid
            return torch.ops.fastattn_C.channel_scale(x, g.to(_acc_dtype(x)).contiguous(), None)
        bins = bin_mean(x, self._LEVELS, mode="adaptive", backend=self.backend)   # (B, C, 21)
        b = x.shape[0]
        # each level flattened channel-major, as the reference's adaptive_avg_pool2d(x, n).flatten(1)
        pooled = torch.cat([bins[:, :, :1].reshape(b, -1), bins[:, :, 1:5].reshape(b, -1),
                            bins[:, :, 5:].reshape(b, -1)], dim=1)
        return channel_scale(x, self.fc(pooled), backend=self.backend)

    def cpu_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the CPU pyramid kernels (`_BinGateCPU` when a gradient is
        recorded): see `_cpu_path_ok`. Channels_last takes the op path."""
        return _cpu_path_ok(self, x, "pyramid")


_RAW_CHECKS["pyramid"] = _dispatch.cpu_kernel("pyramid_mean", "channel_scale", "channel_dot",
                                              "pyramid_scale_backward_dx")


class TiledSqueezeExcite(reference.TiledSqueezeExcite):
    """`fastattn.reference.TiledSqueezeExcite`: the tile means in one read, then the gate in one
    pass.

    On the CPU path (`cpu_fused`: NCHW, eager) the tile means are `fastattn_C::tile_mean` (rows
    summed down each tile row: faster than bin_mean's cells on these planes), the gate
    `fastattn_C::tile_scale` (each tile's gate widened over its columns once per tile row), and
    the backward (`_BinGateCPU`) is two passes: the tile sums of dy * x (the gate's gradient),
    then dx = dy * g + the tile means' gradient in one write. Elsewhere the means are `bin_mean`;
    a map of one tile is gated by `channel_scale`; when H and W are multiples of ``pool_kernel``
    the gate, widened along W only, is broadcast over each tile's rows (one read and one write of
    x); else the reference's fully upsampled gate.
    """

    backend: str | None = None

    def _gate(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.bn(self.fc1(s)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("TiledSqueezeExcite", x, channels=self.channels)
        k = self.pool_kernel
        b, c, h, w = x.shape
        nh, nw = -(-h // k), -(-w // k)
        if self.cpu_fused(x):
            params = list(self.parameters())
            if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
                return _BinGateCPU.apply(x, _tile_kernels(k), self._gate, *params)
            g = self._gate(torch.ops.fastattn_C.tile_mean(x, k))
            return torch.ops.fastattn_C.tile_scale(x, g.to(_acc_dtype(x)).contiguous(), k)
        s = bin_mean(x, (k,), mode="tiles", backend=self.backend).reshape(b, c, nh, nw)
        g = self._gate(s)                                                    # (B, C, nh, nw)
        if nh == 1 and nw == 1:                                              # one tile: an SE gate
            return channel_scale(x, g.flatten(1), backend=self.backend)
        if h % k or w % k:
            g = g.repeat_interleave(k, dim=2)[:, :, :h].repeat_interleave(k, dim=3)[:, :, :, :w]
            return like_input(x * g, x)
        # The gate widened along W only (1/k of x), broadcast over the k rows of each tile: the
        # multiply's inner loop runs over whole rows (a (.., k, .., k) broadcast view of x ran
        # 7-element inner loops, 2-4x slower than the reference's fully upsampled gate).
        gw = g.repeat_interleave(k, dim=3)                                   # (B, C, nh, W)
        y = x.unflatten(2, (nh, k)) * gw[:, :, :, None, :]                   # (B, C, nh, k, W)
        return like_input(y.flatten(2, 3), x)

    def cpu_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the CPU tile kernels (`_BinGateCPU` when a gradient is recorded):
        see `_cpu_path_ok`. Channels_last takes the op path."""
        return _cpu_path_ok(self, x, "tiles")


_RAW_CHECKS["tiles"] = _dispatch.cpu_kernel("tile_mean", "tile_scale", "tile_dot", "tile_scale_backward_dx")


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _BinKernels(NamedTuple):
    """The CPU kernels of a gate computed from bin means of x (`_BinGateCPU`); g and the means'
    gradient in x's accumulation dtype."""
    pool: Callable[[torch.Tensor], torch.Tensor]                              # x -> bin means
    scale: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]               # (x, g) -> y
    dot: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]                 # (dy, x) -> dL/dg
    dx: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]    # (dy, g, dL/dmeans) -> dx


def _tile_kernels(k: int) -> _BinKernels:
    """TiledSqueezeExcite's: (B, C, nh, nw) means of k x k tiles and their gates."""
    C = torch.ops.fastattn_C

    def dx(dy, g, ds):
        h, w = dy.shape[2:]
        rows = torch.clamp(h - torch.arange(0, h, k, dtype=ds.dtype), max=k)     # the tiles' clipped sizes
        cols = torch.clamp(w - torch.arange(0, w, k, dtype=ds.dtype), max=k)
        return C.tile_scale_backward_dx(dy, g, (ds / (rows[:, None] * cols)).contiguous(), k)

    return _BinKernels(lambda x: C.tile_mean(x, k), lambda x, g: C.tile_scale(x, g, k),
                       lambda dy, x: C.tile_dot(dy, x, k), dx)


def _pyramid_kernels(levels: tuple[int, ...]) -> _BinKernels:
    """SpatialPyramidAttention's: the pooled vector of the adaptive means of `levels` (B, C * sum
    of n^2), a (B, C) gate."""
    C = torch.ops.fastattn_C
    return _BinKernels(lambda x: C.pyramid_mean(x, levels), lambda x, g: C.channel_scale(x, g, None),
                       C.channel_dot, lambda dy, g, ds: C.pyramid_scale_backward_dx(dy, g, ds, levels))


class _BinGateCPU(torch.autograd.Function):
    """y = x * gate(bin means of x) on CPU (NCHW), x (B, C, H, W): TiledSqueezeExcite's tiles and
    SpatialPyramidAttention's pyramid, by `kernels` (`_BinKernels`).

    gate maps the bin means to the gate with the module's layers, recorded by autograd at forward
    (so a BatchNorm updates its running statistics once). Backward, two passes: `kernels.dot`
    sums dy * x (the gate's gradient), autograd takes it through the gate, then `kernels.dx`
    writes dx = dy * g + the bin means' gradient in one go.
    """

    @staticmethod
    def forward(ctx, x, kernels, gate_fn, *params):
        s = kernels.pool(x)
        with torch.enable_grad():
            leaf = s.detach().requires_grad_()
            g = gate_fn(leaf)
        g_acc = g.detach().to(_acc_dtype(x)).contiguous()
        ctx.save_for_backward(x, g_acc)
        ctx.graph = (g, leaf, params)
        ctx.kernels = kernels
        return kernels.scale(x, g_acc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, g_acc = ctx.saved_tensors
        g, leaf, params = ctx.graph
        dy = dy.to(x.dtype).contiguous()
        dg = ctx.kernels.dot(dy, x)
        want = [p for p in params if p.requires_grad]
        need_x = ctx.needs_input_grad[0]
        # retain_graph: the outer graph may be run again (backward(retain_graph=True))
        grads = torch.autograd.grad(g, ([leaf] if need_x else []) + want, dg.to(g.dtype), allow_unused=True,
                                    retain_graph=True)
        dx = None
        if need_x:
            ds = grads[0].to(g_acc.dtype).contiguous() if grads[0] is not None else \
                torch.zeros(leaf.shape, dtype=g_acc.dtype)
            dx = ctx.kernels.dx(dy, g_acc, ds)
        param_grads = iter(grads[1 if need_x else 0:])
        return (dx, None, None, *[next(param_grads) if p.requires_grad else None for p in params])


def _mean(x: torch.Tensor, backend: str | None) -> torch.Tensor:
    """(B, C) channel mean: the C++ kernel on CPU, the Triton pool on CUDA."""
    if x.device.type == "cpu":
        return channel_mean(x)
    return channel_pool(x, ("mean",), backend=backend)[0]


class SRM(reference.SRM):
    """`fastattn.reference.SRM`: mean and std in one read, then the gate in one pass; in CPU
    inference, one read of x from memory (see `one_read`)."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SRM", x, channels=self.channels)
        if x.shape[2] * x.shape[3] < 2:
            raise ValueError(
                "SRM: argument 'x' must have at least 2 spatial positions (H * W >= 2, for the "
                f"unbiased standard deviation), got H x W = {x.shape[2]} x {x.shape[3]}"
            )
        if self.one_read(x):
            return _srm_one_read(self, x)
        if self.batch_stats_fused(x):
            bn = self.bn
            y, zmean, zvar = _SRMTrain.apply(x, self.cfc, bn.weight, bn.bias, bn.eps)
            _update_running_stats(bn, zmean, zvar, x.shape[0])
            return y
        if self.train_fused(x):
            def gate(mean, std):
                z = mean * self.cfc[:, 0] + std * self.cfc[:, 1]
                return torch.sigmoid(self.bn(z[:, :, None, None])).flatten(1)
            return _pooled_gate(self, x, gate, with_std=True, eps=1e-5)
        mean, std = channel_pool(x, ("mean", "std"), eps=1e-5, backend=self.backend)
        z = mean * self.cfc[:, 0] + std * self.cfc[:, 1]
        return channel_scale(x, torch.sigmoid(self.bn(z[:, :, None, None])).flatten(1), backend=self.backend)

    def one_read(self, x: torch.Tensor) -> bool:
        """Whether forward runs the one-read C++ inference kernel (`fastattn_C::srm_forward`, as
        SqueezeExcite's) instead of channel_pool + channel_scale: see `_one_read_ok`; the
        BatchNorm must use its running statistics (eval mode)."""
        return _bn_frozen(self.bn) and _one_read_ok(self, "srm_forward", x)

    def train_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the two-pass CPU training path (`_PooledGate`) instead of the op
        path: see `_train_fused_ok` (when `batch_stats_fused` does not hold)."""
        return _train_fused_ok(self, x)

    def batch_stats_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs SRM's CPU training kernels (`fastattn_C::srm_train_forward` /
        `_backward`, `_SRMTrain`: channel blocks, x and dy read from memory once): the BatchNorm
        normalises with the batch statistics (train mode, or no running statistics) of at least
        two samples, float32 cfc and affine BatchNorm parameters, 16/32-bit x, and the conditions
        of `_cpu_path_ok`."""
        return (_batch_stats_bn_ok(self.bn, x, self.cfc) and x.shape[0] >= 2
                and _cpu_path_ok(self, x, "srm_train"))


class _SRMTrain(torch.autograd.Function):
    """(y, zmean, zvar) of SRM's training forward: the plane statistics, the style integration,
    the BatchNorm over the batch and the gate, channel block by channel block in C++; zmean and
    zvar (the BatchNorm's batch statistics) for the running statistics."""

    @staticmethod
    def forward(ctx, x, cfc, gamma, beta, bn_eps):
        y, mean, std, g, zmean, zvar = torch.ops.fastattn_C.srm_train_forward(
            x, cfc.detach(), gamma.detach(), beta.detach(), bn_eps, 1e-5)
        ctx.save_for_backward(x, cfc, gamma, mean, std, g, zmean, zvar)
        ctx.bn_eps = bn_eps
        ctx.mark_non_differentiable(zmean, zvar)
        return y, zmean, zvar

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dzmean, _dzvar):
        x, cfc, gamma, mean, std, g, zmean, zvar = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        dx, dcfc, dgamma, dbeta = torch.ops.fastattn_C.srm_train_backward(
            dy.contiguous(), x, cfc.detach(), gamma.detach(), ctx.bn_eps, mean, std, g, zmean, zvar, need_x)
        return (dx if need_x else None), dcfc, dgamma, dbeta, None


def _bn_frozen(bn: torch.nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether `bn` normalises with its running statistics (an affine map that can be folded)."""
    return not bn.training and bn.running_mean is not None and bn.running_var is not None


def _bn_fold(bn: torch.nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float32, of a frozen BatchNorm: bn(z) = z * scale + shift per channel."""
    scale = torch.rsqrt(bn.running_var.detach().float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().float()
    shift = -bn.running_mean.detach().float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().float()
    return scale, shift


def _srm_one_read(m: SRM, x: torch.Tensor) -> torch.Tensor:
    """SRM's eval forward by `fastattn_C::srm_forward`, the BatchNorm folded into the cfc."""
    scale, shift = _bn_fold(m.bn)
    a = (m.cfc.detach().float().t() * scale).contiguous()       # (2, C): rows a_mean, a_std
    return torch.ops.fastattn_C.srm_forward(x, a[0], a[1], shift, 1e-5)


class MultiSpectralAttention(reference.MultiSpectralAttention):
    """`fastattn.reference.MultiSpectralAttention` (FcaNet): the DCT pool in one read (after
    PyTorch's adaptive pool when the map is not dct_h x dct_w), then the gate in one pass; in CPU
    inference on a dct_h x dct_w map, one read of x from memory (see `one_read`)."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("MultiSpectralAttention", x, channels=self.channels)
        if self.one_read(x):
            w = [t.detach().float().contiguous() for t in (self.dct_layer.weight, self.fc[0].weight, self.fc[2].weight)]
            return torch.ops.fastattn_C.fca_forward(x, *w)
        if self.train_fused(x):
            return _pooled_gate(self, x, self.fc, filt=self.dct_layer.weight.detach().to(x.dtype).contiguous(),
                                one_read=self._kernel_weights())
        pooled = x
        if x.shape[-2:] != (self.dct_h, self.dct_w):
            pooled = F.adaptive_avg_pool2d(x, (self.dct_h, self.dct_w))
        y = dct_pool(pooled, self.dct_layer.weight, backend=self.backend)
        return channel_scale(x, self.fc(y), backend=self.backend)   # fc ends in a sigmoid

    def one_read(self, x: torch.Tensor) -> bool:
        """Whether forward runs the one-read C++ inference kernel (`fastattn_C::fca_forward`, as
        SqueezeExcite's, with the DCT pool as the squeeze) instead of dct_pool + channel_scale:
        the conditions of `_one_read_ok`, a dct_h x dct_w map (no adaptive pool) and the official
        fc (Linear, ReLU, Linear, Sigmoid, no biases)."""
        return (self._kernel_weights() is not None and tuple(x.shape[-2:]) == (self.dct_h, self.dct_w)
                and _one_read_ok(self, "fca_forward", x))

    def _kernel_weights(self) -> tuple | None:
        """(filter, w1, b1, w2, b2, conv_w) for `_PooledGate`'s one-read kernels: the DCT filter and
        the official fc's weights (Linear, ReLU, Linear, Sigmoid, no biases), or None for another fc."""
        fc = self.fc
        official = (len(fc) == 4 and type(fc[0]) is torch.nn.Linear and type(fc[1]) is torch.nn.ReLU
                    and type(fc[2]) is torch.nn.Linear and type(fc[3]) is torch.nn.Sigmoid
                    and fc[0].bias is None and fc[2].bias is None)
        if not official:
            return None
        return self.dct_layer.weight.detach(), fc[0].weight.detach(), None, fc[2].weight.detach(), None, None

    def train_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the two-pass CPU training path (`_PooledGate`) instead of the op
        path: see `_train_fused_ok`; the map is the DCT grid (no adaptive pool)."""
        return tuple(x.shape[-2:]) == (self.dct_h, self.dct_w) and _train_fused_ok(self, x)
