"""Fast channel-and-spatial attention modules: the combine of both gates is one pass over x."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..ops import _dispatch
from ..ops.gate import channel_affine_gate, channel_scale, channel_spatial_gate
from ..ops.coord import coord_pool, coord_scale
from ..ops.pool import channel_pool
from ..ops.simam import check_args as check_simam_args, simam
from ..ops.spatial import spatial_pool, spatial_scale, zpool
from ..ops.pool import channel_mean
from .channel import (_acc_dtype, _bn_fold, _bn_frozen, _cpu_path_ok, _llc_bytes, _one_read_ok, _per_param,
                      _RAW_CHECKS, _train_fused_ok, plane_var_mean)
from ..reference._checks import check_feature_map, like_input


class SCSE(reference.SCSE):
    """`fastattn.reference.SCSE` with one fused combine: max(x * a, x * s) (or x * a + x * s).

    The channel gate reads x once (mean), the spatial gate once (1x1 conv), the combine once. In
    CPU inference, one read of x from memory (see `one_read`); in CPU training, one read of x
    forward and one of dy and x backward (see `train_fused`).
    """

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SCSE", x, channels=self.channels)
        cse, sse = self.cSE, self.sSE
        if self.one_read(x):
            w = [t.detach().float().reshape(t.shape[0], -1).contiguous() if t.dim() > 1 else t.detach().float()
                 for t in (cse.fc1.weight, cse.fc1.bias, cse.fc2.weight, cse.fc2.bias)]
            conv_w = sse.conv.weight.detach().float().reshape(-1).contiguous()
            conv_b = float(sse.conv.bias) if sse.conv.bias is not None else 0.0
            return torch.ops.fastattn_C.scse_forward(x, *w, conv_w, conv_b, self.combine)
        if self.train_fused(x):
            return _SCSETrain.apply(x, self, *self.parameters())
        a = torch.sigmoid(cse.fc2(F.relu(cse.fc1(channel_mean(x)))))
        s = torch.sigmoid(_conv_to_one(x, sse.conv))
        return channel_spatial_gate(x, a, s, self.combine, backend=self.backend)

    def one_read(self, x: torch.Tensor) -> bool:
        """Whether forward runs the one-read C++ inference kernel (`fastattn_C::scse_forward`: one
        sample per thread; its means and the 1x1 conv's sums in one read, the gates, the combine
        from that core's cache) instead of the three-pass path: the conditions of SqueezeExcite's
        (`fastattn.modules.channel._one_read_ok`)."""
        return _one_read_ok(self, "scse_forward", x)

    def train_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the CPU training kernels (`_SCSETrain`: x and dy read from memory
        once each, groups of samples per thread) instead of the op path: the conditions of
        `_train_fused_ok`, float32 x and layers (the constructor's Linear and 1x1 conv, with
        biases), at least one sample per thread, one sample's dy and x per thread twice over in the
        last-level cache; not empty."""
        if x.dtype != torch.float32 or x.numel() == 0 or not _train_fused_ok(self, x):
            return False
        if _RAW_CHECKS["scse_train"](x) is not None:
            return False
        if torch.is_autocast_enabled("cpu"):
            return False
        cse, conv = self.cSE, self.sSE.conv
        if not (type(cse.fc1) is torch.nn.Linear and type(cse.fc2) is torch.nn.Linear and type(conv) is torch.nn.Conv2d
                and conv.kernel_size == (1, 1) and conv.out_channels == 1 and conv.groups == 1
                and all(b is not None for b in (cse.fc1.bias, cse.fc2.bias, conv.bias))):
            return False
        if any(p.dtype != torch.float32 or not p.is_contiguous() for p in self.parameters()):
            return False
        threads = torch.get_num_threads()
        return x.shape[0] >= threads and 4 * threads * x[0].numel() * x.element_size() <= _llc_bytes()


_RAW_CHECKS["scse_train"] = _dispatch.cpu_kernel("scse_train_forward", "scse_train_backward")


class _SCSETrain(torch.autograd.Function):
    """scSE's CPU training step (`fastattn_C::scse_train_forward` / `_backward`, groups of samples
    per thread, the MLP run per group). Forward: one read of x for the means and the 1x1 conv's
    sums, the gates, y from the core's cache; the cSE MLP is recorded by autograd on the saved
    means (its parameters' gradients). Backward: one read of dy and x for the gates' gradients,
    then dx (every path to x) and the conv's gradients from the cache. The op path writes dx in
    three passes more (the combine's, the mean's, the conv's) and reads x twice more for the
    conv's weight gradient and the spatial sums."""

    @staticmethod
    def forward(ctx, x, module, *params):
        cse, conv = module.cSE, module.sSE.conv
        w = (cse.fc1.weight.detach(), cse.fc1.bias.detach(), cse.fc2.weight.detach(), cse.fc2.bias.detach(),
             conv.weight.detach().view(-1))
        y, mean, g, s = torch.ops.fastattn_C.scse_train_forward(x, *w, conv.bias.item(), module.combine)
        with torch.enable_grad():      # the MLP's graph, for its parameters' gradients
            gate = torch.sigmoid(cse.fc2(F.relu(cse.fc1(mean))))
        ctx.save_for_backward(x, mean, g, s, *w)
        ctx.graph = (gate, params, (cse.fc1.weight, cse.fc1.bias, cse.fc2.weight, cse.fc2.bias), conv)
        ctx.combine = module.combine
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, mean, g, s, *w = ctx.saved_tensors
        gate, params, mlp, conv = ctx.graph
        dx, dg, dconv_w, dconv_b = torch.ops.fastattn_C.scse_train_backward(dy.contiguous(), x, mean, g, s, *w,
                                                                            ctx.combine)
        want = [p for p in mlp if p.requires_grad]
        grads = dict(zip(want, torch.autograd.grad(gate, want, dg, retain_graph=True))) if want else {}
        grads[conv.weight] = dconv_w.sum(0).view(conv.weight.shape)
        grads[conv.bias] = dconv_b.sum().view(conv.bias.shape)
        dx = dx if ctx.needs_input_grad[0] else None
        return (dx, None, *[grads.get(p) if p.requires_grad else None for p in params])


def _conv_to_one(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """conv(x) for a 1x1 conv C -> 1 (sSE's squeeze): `_PointwiseToOne` on NCHW CPU tensors in eager
    mode, else (or when the conv has forward hooks) the conv itself."""
    if x.device.type != "cpu" or not x.is_contiguous() or torch.compiler.is_compiling():
        return conv(x)
    if conv._forward_hooks or conv._forward_pre_hooks:     # e.g. pruning's, which recomputes the weight
        return conv(x)
    return _PointwiseToOne.apply(x, conv.weight, conv.bias)


class _PointwiseToOne(torch.autograd.Function):
    """A 1x1 conv C -> 1 with optional bias, (B, C, H, W) -> (B, 1, H, W), as one (1, C) x (C, H W)
    product per sample; backward: dx = w[c] ds[b, p] in one broadcast multiply, dw = sum over b of
    x ds^T. Profiled in an SCSE training step at 8x256x56x56 on the 2-core dev machine: PyTorch's
    conv, 2.5 ms forward and 16 ms backward; these, two bmm of about 0.6 ms and the dx multiply
    (3.5-4 ms)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        B, C = x.shape[:2]
        # bmm: matmul would fold the batch into one mm over a transposed copy of x
        s = torch.bmm(weight.reshape(1, 1, C).expand(B, 1, C), x.reshape(B, C, -1))   # (B, 1, HW)
        if bias is not None:
            s = s + bias.view(1, 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return s.view(B, 1, *x.shape[2:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ds):
        x, weight = ctx.saved_tensors
        B, C = x.shape[:2]
        ds3 = ds.reshape(B, 1, -1)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (weight.reshape(1, C, 1) * ds3).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = torch.bmm(x.reshape(B, C, -1), ds3.transpose(1, 2)).sum(0).view(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = ds3.sum((0, 2))
        return dx, dw, db


class BAM(reference.BAM):
    """`fastattn.reference.BAM` with the final ``x * (1 + sigmoid(Mc * Ms))`` fused in one pass.

    On the CPU path (`cpu_fused`), the spatial branch's 1x1 reduce conv and the channel branch's
    mean come from one read of x (`fastattn_C::pointwise_reduce_mean`, a register-tiled product
    on NCHW memory; PyTorch's conv reorders NCHW x first), and the backward writes x's gradient
    (the gate's, the mean's and the conv's) in one pass (`_ReduceAndMean`). The rest of the
    spatial branch (BatchNorms, dilated convs on C/r channels) stays with PyTorch, on a
    channels_last copy of the reduced map.
    """

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("BAM", x, channels=self.channels)
        if self.training and x.shape[0] < 2:
            raise ValueError(
                "BAM: argument 'x' must have batch size > 1 in training mode "
                f"(the channel branch has a BatchNorm1d), got {x.shape[0]}"
            )
        mode = "bam" if self.combine == "product" else "bam_sum"
        if self.cpu_fused(x):
            reduce, *rest = self.spatial_att.gate_s
            if torch.is_grad_enabled():
                z, mean, x = _ReduceAndMean.apply(x, reduce.weight, reduce.bias)
            else:
                z, mean = torch.ops.fastattn_C.pointwise_reduce_mean(x, reduce.weight, reduce.bias)
            # oneDNN's dilated convs run faster on channels_last (3.0 -> 2.1 ms at 32x1024x14x14; z is C/r wide)
            z = z.contiguous(memory_format=torch.channels_last)
            for layer in rest:
                z = layer(z)
            return channel_spatial_gate(x, self.channel_att.gate_c(mean), z, mode, backend=self.backend)
        mc = self.channel_att.gate_c(channel_mean(x))
        ms = self.spatial_att(x)
        return channel_spatial_gate(x, mc, ms, mode, backend=self.backend)

    def cpu_fused(self, x: torch.Tensor) -> bool:
        """Whether forward takes the CPU path of the class docstring: `_cpu_path_ok`'s conditions
        (`fastattn.modules.channel`) with float32 x and reduce-conv parameters (the kernels are
        fp32 only; other dtypes and channels_last take the op path)."""
        reduce = self.spatial_att.gate_s[0]
        params = [reduce.weight] + ([reduce.bias] if reduce.bias is not None else [])
        return (x.dtype == torch.float32 and all(p.dtype == torch.float32 for p in params)
                and _cpu_path_ok(self, x, "bam"))


_RAW_CHECKS["bam"] = _dispatch.cpu_kernel("pointwise_reduce_mean", "pointwise_reduce_dx", "pointwise_reduce_dw")


class _ReduceAndMean(torch.autograd.Function):
    """(x, weight, bias) -> (z, mean, x): z = conv1x1(x, weight, bias) (B, O, H, W), mean = the
    (B, C) channel means, in one read of NCHW float32 x (`fastattn_C::pointwise_reduce_mean`).

    x passes through (as a view), so that the module's other use of x (the final gate) hands its
    gradient g to this backward, which writes dx = g + dmean / (H W) + weight^T dz in one pass
    (`pointwise_reduce_dx`) instead of three gradients and their sum; dweight by
    `pointwise_reduce_dw` (a second read of x)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        z, mean = torch.ops.fastattn_C.pointwise_reduce_mean(x, weight, bias)
        ctx.set_materialize_grads(False)     # an unused output's gradient comes as None, not a zero map
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x_out = x.view_as(x)
        if not x.requires_grad:     # no gradient for x: the gate then skips its dx pass too
            ctx.mark_non_differentiable(x_out)
        return z, mean, x_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz, dmean, g):
        x, weight = ctx.saved_tensors
        if dz is None:
            dz = torch.zeros((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device)
        dz = dz.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            g = None if g is None else g.contiguous()
            dmean = None if dmean is None else dmean.contiguous()
            dx = torch.ops.fastattn_C.pointwise_reduce_dx(dz, weight, g, dmean)
        if ctx.needs_input_grad[1]:
            dw = torch.ops.fastattn_C.pointwise_reduce_dw(dz, x).view(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dz.sum((0, 2, 3))
        return dx, dw, db


class ShuffleAttention(reference.ShuffleAttention):
    """`fastattn.reference.ShuffleAttention` (SA-Net) as one gate pass plus the channel shuffle.

    Both branches are per-channel affine gates once the statistics are known: the channel branch
    ``x * sigmoid(cweight * mean + cbias)`` (alpha = 0), the spatial branch
    ``x * sigmoid(sweight * GN(x) + sbias)`` with a one-channel-per-group GroupNorm folded into
    alpha and beta. Passes: the per-channel statistics (one read), then the gate and the 2-group
    channel shuffle. On the CPU path (`cpu_fused`) the gate writes each channel straight to its
    shuffled place (`fastattn_C::shuffle_affine_gate`), and in training `_ShuffleTrainCPU`'s
    backward reads dy and x once for all of x's gradient. Elsewhere the shuffle is a copy, as in
    the reference.
    """

    backend: str | None = None

    def _alpha_beta(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) plane means and population variances -> the gate's (B, C) alpha and beta."""
        b, c = mean.shape
        g, half = self.groups, c // (2 * self.groups)
        mean, var = mean.reshape(b, g, 2, half), var.reshape(b, g, 2, half)
        flat = lambda p: p.reshape(half)  # noqa: E731  (1, half, 1, 1) parameters -> (half,)
        # channel branch: alpha = 0, beta = cweight * mean + cbias
        beta_c = flat(self.cweight) * mean[:, :, 0] + flat(self.cbias)
        # spatial branch: sweight * (gn_w (x - mu) / sigma + gn_b) + sbias
        scale = flat(self.gn.weight) * torch.rsqrt(var[:, :, 1] + self.gn.eps)
        alpha_s = flat(self.sweight) * scale
        beta_s = flat(self.sweight) * (flat(self.gn.bias) - mean[:, :, 1] * scale) + flat(self.sbias)
        alpha = torch.stack([torch.zeros_like(alpha_s), alpha_s], dim=2).reshape(b, c)
        beta = torch.stack([beta_c, beta_s], dim=2).reshape(b, c)
        return alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("ShuffleAttention", x, channels=self.channels)
        b, c, h, w = x.shape
        fused = self.cpu_fused(x)
        params = list(self.parameters())
        if fused and torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _ShuffleTrainCPU.apply(x, self._alpha_beta, self.gn.eps, *params)
        var, mean = plane_var_mean(x, self.gn.eps, self.backend)      # (B, C) each
        alpha, beta = self._alpha_beta(mean, var)
        if fused:
            return torch.ops.fastattn_C.shuffle_affine_gate(x, alpha.contiguous(), beta.contiguous(), 2)
        y = channel_affine_gate(x, alpha, beta, backend=self.backend)
        # Channel shuffle with 2 groups: channel k of half j goes to position 2k + j.
        out = y.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return like_input(out, x)

    def cpu_fused(self, x: torch.Tensor) -> bool:
        """Whether forward writes the gate in shuffled order in one pass (and trains through
        `_ShuffleTrainCPU`): see `fastattn.modules.channel._cpu_path_ok`. Channels_last takes the
        op path (its shuffled channels would not be contiguous)."""
        return _cpu_path_ok(self, x, "shuffle")


_RAW_CHECKS["shuffle"] = _dispatch.cpu_kernel("shuffle_affine_gate", "shuffle_gate_train_backward", "channel_pool")


class _ShuffleTrainCPU(torch.autograd.Function):
    """ShuffleAttention's training step on CPU: y = channel_shuffle(x * sigmoid(alpha x + beta), 2)
    with (alpha, beta) = alpha_beta(mean, var) of x's planes, x (B, C, H, W) NCHW.

    Forward: the plane statistics in one read (`channel_pool`'s mean and std for fp32 / fp64 x,
    as `plane_var_mean`), alpha_beta recorded by autograd on them, the gate
    (`shuffle_affine_gate`). Backward, one read of dy and x (`shuffle_gate_train_backward`): each
    alpha and beta depends on its own plane's statistics only, so x's gradient through them is,
    per plane, k x + a with k and a linear in the plane's dalpha and dbeta; the coefficients come
    from two autograd passes over the small (B, C) graph, the kernel sums dalpha and dbeta over the
    plane and writes dx = dy g + u alpha + k (x - mean) + a from cache. The op path writes the gate's dx,
    the statistics' dx and their sum: three passes more. The parameters' gradients: autograd on
    the small graph with the kernel's dalpha and dbeta.
    """

    @staticmethod
    def forward(ctx, x, alpha_beta, eps, *params):
        hw = x.shape[2] * x.shape[3]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        with_std = x.dtype in (torch.float32, torch.float64) and eps > 0 and hw >= 2
        if with_std:                        # as plane_var_mean: var from std = sqrt(unbiased var + eps)
            mean, stat = torch.ops.fastattn_C.channel_pool(x, ["mean", "std"], eps)[:2]
        else:
            stat, mean = torch.var_mean(x.to(acc), dim=(2, 3), unbiased=False)
        with torch.enable_grad():
            m, s = mean.detach().requires_grad_(), stat.detach().requires_grad_()
            var = ((s * s - eps) * ((hw - 1) / hw)).clamp_min(0) if with_std else s
            alpha, beta = alpha_beta(m, var)
        alpha_d, beta_d = alpha.detach().contiguous(), beta.detach().contiguous()
        ctx.save_for_backward(x, alpha_d, beta_d, mean, stat)
        ctx.graph = (alpha, beta, m, s, params)
        ctx.with_std = with_std
        return torch.ops.fastattn_C.shuffle_affine_gate(x, alpha_d, beta_d, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, alpha_d, beta_d, mean, stat = ctx.saved_tensors
        alpha, beta, m, s, params = ctx.graph
        hw = x.shape[2] * x.shape[3]
        need_x = ctx.needs_input_grad[0]
        dy = dy.to(x.dtype).contiguous()
        coef = torch.zeros(*alpha_d.shape, 4, dtype=alpha_d.dtype)
        if need_x:
            ones, zeros = torch.ones_like(alpha_d), torch.zeros_like(alpha_d)
            for j, go in enumerate(((ones, zeros), (zeros, ones))):     # d(mean, stat) / d(alpha or beta)
                dm, ds = torch.autograd.grad((alpha, beta), (m, s), go, retain_graph=True, allow_unused=True)
                dm = zeros if dm is None else dm.to(alpha_d.dtype)
                ds = zeros if ds is None else ds.to(alpha_d.dtype)
                # x's gradient through the plane's statistics: k (x - mean) + dm / hw, with
                # k = ds / ((hw - 1) std) through std = sqrt(unbiased var + eps), 2 ds / hw through var
                coef[:, :, j] = ds / ((hw - 1) * stat) if ctx.with_std else ds * (2 / hw)
                coef[:, :, 2 + j] = dm / hw
        mean = mean.to(alpha_d.dtype).contiguous()
        dx, dalpha, dbeta = torch.ops.fastattn_C.shuffle_gate_train_backward(dy, x, alpha_d, beta_d, mean, coef, 2)
        want = [p for p in params if p.requires_grad]
        grads = iter(torch.autograd.grad((alpha, beta), want, (dalpha, dbeta), allow_unused=True, retain_graph=True)
                     if want else [])
        return (dx if need_x else None, None, None, *[next(grads) if p.requires_grad else None for p in params])


_CBAM_FUSED_POOLS = {"avg": "mean", "max": "max"}


class CBAM(reference.CBAM):
    """`fastattn.reference.CBAM` in three passes over x (the reference makes about eight):

    1. the channel pools (mean and max) in one read;
    2. [max, mean] over the channels of ``x * Mc`` without materialising it;
    3. ``x * Mc * Ms`` in one pass (one write).

    In CPU inference the three passes run per sample in one C++ kernel, so that x is read from
    memory once (see `one_read`).

    The official "lp" and "lse" channel pools have no fused kernel: a module using them runs
    the reference forward (say so in `fused`).
    """

    backend: str | None = None

    @property
    def fused(self) -> bool:
        return all(p in _CBAM_FUSED_POOLS for p in self.ChannelGate.pool_types)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        check_feature_map("CBAM", x, channels=self.channels)
        if self.one_read(x):
            return _cbam_one_read(self, x)
        if self.train_fused(x):
            return _CBAMTrain.apply(x, self, *self.parameters())
        gate = self.ChannelGate
        kinds = [_CBAM_FUSED_POOLS[p] for p in gate.pool_types]
        distinct = list(dict.fromkeys(kinds))             # a pool named twice is computed once
        pooled = dict(zip(distinct, channel_pool(x, distinct, backend=self.backend)))
        att = gate.mlp(pooled[kinds[0]])
        for k in kinds[1:]:
            att = att + gate.mlp(pooled[k])
        a = torch.sigmoid(att)
        if self.no_spatial:
            return channel_scale(x, a, backend=self.backend)
        s = torch.sigmoid(self.SpatialGate.spatial(spatial_pool(x, a, backend=self.backend)))
        return spatial_scale(x, a, s, backend=self.backend)

    def one_read(self, x: torch.Tensor) -> bool:
        """Whether forward runs the one-read C++ inference kernel (`fastattn_C::cbam_forward`: one
        sample per thread, its channel pools, MLP, spatial pool, 7x7 conv and scale while it is in
        that core's cache) instead of the three-pass path: the conditions of SqueezeExcite's
        (`fastattn.modules.channel._one_read_ok`), pools among "avg" and "max" without repeats,
        and the spatial gate's BatchNorm with its running statistics (eval mode)."""
        pools = self.ChannelGate.pool_types
        if not self.fused or len(set(pools)) != len(pools):
            return False
        if not self.no_spatial and not _bn_frozen(self.SpatialGate.spatial.bn):
            return False
        return _one_read_ok(self, "cbam_forward", x)

    def train_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the CPU training path `_CBAMTrain` (backward in three passes over
        memory) instead of the op path: the conditions of the pooled-gate modules' training path
        (`fastattn.modules.channel._train_fused_ok`), the spatial gate present, pools among "avg"
        and "max" without repeats, and at least one sample per thread (its passes run a sample
        per thread)."""
        pools = self.ChannelGate.pool_types
        if torch.compiler.is_compiling() or self.no_spatial or not self.fused or len(set(pools)) != len(pools):
            return False
        if x.shape[0] < torch.get_num_threads() or _RAW_CHECKS["cbam_train"](x) is not None:
            return False
        return _train_fused_ok(self, x)


class _CBAMTrain(torch.autograd.Function):
    """CBAM with a gradient to record, on CPU: the forward's three passes (channel pools, spatial
    pool, scale), the gates' layers recorded by autograd in between; the backward in three passes
    over memory (fastattn_C::cbam_backward_sums, _pool_grad, _dx) with autograd through the
    recorded gates in between. The op path's backward writes dx three times (scale, spatial pool,
    channel pools) and adds them up: about 17 tensor passes against 5. The spatial gate's conv runs
    by `_gate_conv` (PyTorch's conv to one channel: 1.9 ms forward + backward on an 8x2x56x56 map).
    """

    @staticmethod
    def forward(ctx, x, module, *params):
        gate = module.ChannelGate
        kinds = [_CBAM_FUSED_POOLS[p] for p in gate.pool_types]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        pooled = torch.ops.fastattn_C.channel_pool(x, kinds, 1e-5)
        stats, idx_p = pooled[:len(kinds)], (pooled[len(kinds)] if "max" in kinds else None)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in stats]
            att = gate.mlp(leaves[0])
            for leaf in leaves[1:]:
                att = att + gate.mlp(leaf)
            a = torch.sigmoid(att)
        a_acc = a.detach().to(acc).contiguous()
        sp, idx_c = torch.ops.fastattn_C.spatial_pool(x, a_acc, 1)
        with torch.enable_grad():
            sp_leaf = sp.detach().requires_grad_()
            s = torch.sigmoid(_conv_bn(module.SpatialGate.spatial, sp_leaf))
        s_acc = s.detach().to(acc).reshape(x.shape[0], -1).contiguous()
        ctx.save_for_backward(x, a_acc, s_acc, idx_c, idx_p)
        spatial_ids = {id(p) for p in module.SpatialGate.parameters()}
        ctx.graph = (a, leaves, kinds, s, sp_leaf, params, spatial_ids)
        return torch.ops.fastattn_C.spatial_scale(x, a_acc, s_acc.view(x.shape[0], 1, *x.shape[2:]))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, a_acc, s_acc, idx_c, idx_p = ctx.saved_tensors
        a, leaves, kinds, s, sp_leaf, params, spatial_ids = ctx.graph
        dy = dy.contiguous()
        B, C, HW = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
        need_x = ctx.needs_input_grad[0]
        spatial_params = [p for p in params if p.requires_grad and id(p) in spatial_ids]
        channel_params = [p for p in params if p.requires_grad and id(p) not in spatial_ids]
        da1, ds = torch.ops.fastattn_C.cbam_backward_sums(dy, x, a_acc, s_acc)
        # retain_graph: the outer graph may be run again; the gates' small graphs are freed with it
        g = torch.autograd.grad(s, [sp_leaf] + spatial_params, ds.view(s.shape).to(s.dtype), allow_unused=True,
                                retain_graph=True)
        dsp = g[0].to(a_acc.dtype).reshape(B, 2, HW)
        dpmax, dpmean = dsp[:, 0].contiguous(), dsp[:, 1].contiguous()
        da = da1 + torch.ops.fastattn_C.cbam_backward_pool_grad(x, dpmax, dpmean, idx_c)
        h = torch.autograd.grad(a, leaves + channel_params, da.to(a.dtype), allow_unused=True, retain_graph=True)
        dx = None
        if need_x:
            zeros = torch.zeros_like(a_acc)
            dstats = {k: (d.to(a_acc.dtype).contiguous() if d is not None else zeros) for k, d in zip(kinds, h)}
            dx = torch.ops.fastattn_C.cbam_backward_dx(
                dy, a_acc, s_acc, dpmax, dpmean, idx_c, dstats.get("mean", zeros), dstats.get("max", zeros),
                idx_p if idx_p is not None else torch.zeros(B, C, dtype=torch.int64))
        grads = dict(zip(map(id, spatial_params), g[1:]))
        grads.update(zip(map(id, channel_params), h[len(leaves):]))
        return (dx, None, *[grads.get(id(p)) for p in params])


def _cbam_one_read(m: CBAM, x: torch.Tensor) -> torch.Tensor:
    """CBAM's eval forward by `fastattn_C::cbam_forward`, the spatial BatchNorm folded into the conv."""
    mlp = m.ChannelGate.mlp
    fc1, fc2 = mlp[1], mlp[3]
    w = [t.detach().float().contiguous() for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
    pools = m.ChannelGate.pool_types
    conv_weight, conv_bias = None, 0.0
    if not m.no_spatial:
        scale, shift = _bn_fold(m.SpatialGate.spatial.bn)          # (1,) each
        conv_weight = (m.SpatialGate.spatial.conv.weight.detach().float()[0] * scale).contiguous()
        conv_bias = float(shift)
    return torch.ops.fastattn_C.cbam_forward(x, *w, "avg" in pools, "max" in pools, conv_weight, conv_bias)


class TripletAttention(reference.TripletAttention):
    """`fastattn.reference.TripletAttention` with the three Z-pools read straight from x (no
    permuted copies).

    On CPU (see `cpu_fused`): the three Z-pools in one read of x (`fastattn_C::triplet_pools`),
    the gates' 2 -> 1 k x k convolutions by `fastattn_C::gate_conv` (PyTorch's conv is slow for
    one output channel: 51-94 ms forward + backward for the cw gate at 32x1024x14x14), the gated
    average ``x * (g_cw + g_hc + g_hw) / 3`` in one pass, and in training a backward of two passes
    over memory. Elsewhere the three products stay in PyTorch.
    """

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("TripletAttention", x)
        if self.cpu_fused(x):
            return _triplet_cpu(self, x)
        # (B, 1, C, W) -> (B, C, 1, W) and (B, 1, H, C) -> (B, C, H, 1): views, no copies.
        out = x * self.cw(zpool(x, 2, backend=self.backend)).permute(0, 2, 1, 3)
        out = out + x * self.hc(zpool(x, 3, backend=self.backend)).permute(0, 3, 2, 1)
        if self.no_spatial:
            return like_input(out * 0.5, x)
        out = out + x * self.hw(zpool(x, 1, backend=self.backend))
        return like_input(out * (1 / 3), x)

    def cpu_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the CPU path (`_TripletCPU` when a gradient is recorded): the
        conditions of `fastattn.modules.channel._cpu_path_ok`, and at least one sample per thread
        (the pools and the backward's sums run a sample per thread). Channels_last takes the op
        path."""
        return _cpu_path_ok(self, x, "triplet") and x.shape[0] >= torch.get_num_threads()


_RAW_CHECKS["triplet"] = _dispatch.cpu_kernel("triplet_pools", "triplet_scale", "triplet_backward_sums",
                                              "triplet_backward_dx", "gate_conv", "gate_conv_backward")


class _GateConv(torch.autograd.Function):
    """conv2d(inp, weight, padding=(k - 1) // 2) to one channel, no bias, by fastattn_C::gate_conv
    (float32 / float64 CPU tensors)."""

    @staticmethod
    def forward(ctx, inp, weight):
        inp, weight = inp.contiguous(), weight.contiguous()
        ctx.save_for_backward(inp, weight)
        return torch.ops.fastattn_C.gate_conv(inp, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        inp, weight = ctx.saved_tensors
        need_in, need_w = ctx.needs_input_grad
        d_in, d_w = torch.ops.fastattn_C.gate_conv_backward(grad.contiguous(), inp, weight, need_in, need_w)
        return (d_in if need_in else None), (d_w if need_w else None)


def _gate_conv(pooled: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """conv(pooled) for a Z-pool gate's conv (2 -> 1, k x k, no bias, zero padding (k - 1) / 2):
    by `_GateConv` for float32 / float64, along the longer side of the map (a conv of the
    transposed map with the transposed kernel is the transposed conv), else by PyTorch."""
    w = conv.weight
    if pooled.dtype not in (torch.float32, torch.float64) or w.dtype != pooled.dtype or conv.bias is not None:
        return conv(pooled)
    if pooled.shape[-1] < pooled.shape[-2]:
        return _GateConv.apply(pooled.transpose(2, 3), w.transpose(2, 3)).transpose(2, 3)
    return _GateConv.apply(pooled, w)


def _conv_bn(layer: torch.nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """A `reference._ConvBN` (CBAM's and Triplet attention's 2 -> 1 conv + BatchNorm) on pooled,
    its conv by `_gate_conv`."""
    return layer.bn(_gate_conv(pooled, layer.conv))


def _triplet_gates(m: TripletAttention, maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """The branches' gates sigmoid(BN(conv(map))), (B, 1, ., .) each, in the parameters' dtype."""
    gates = [m.cw, m.hc] + ([] if m.no_spatial else [m.hw])
    return [torch.sigmoid(_conv_bn(g.conv, p)) for g, p in zip(gates, maps)]


def _triplet_cpu(m: TripletAttention, x: torch.Tensor) -> torch.Tensor:
    """TripletAttention's CPU path: `_TripletCPU` when a gradient is to be recorded, else the pools,
    the gates and the gated average directly."""
    params = list(m.parameters())
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _TripletCPU.apply(x, m, *params)
    spatial = not m.no_spatial
    pooled = torch.ops.fastattn_C.triplet_pools(x, spatial)
    dtype = m.cw.conv.conv.weight.dtype
    gates = _triplet_gates(m, [t.to(dtype) for t in pooled[0:2 * (2 + spatial):2]])
    g = [t.to(pooled[0].dtype).reshape(t.shape[0], t.shape[2], t.shape[3]).contiguous() for t in gates]
    return torch.ops.fastattn_C.triplet_scale(x, g[0], g[1], g[2] if spatial else None, 1 / (2 + spatial))


class _TripletCPU(torch.autograd.Function):
    """TripletAttention with a gradient to record, on CPU. Forward: the three Z-pools in one read,
    the gates' layers recorded by autograd, the gated average in one pass. Backward: the gates'
    gradients (sums of dy * x over H, W and C) in one read of dy and x, autograd through the
    recorded gates to the pooled maps and the parameters, then dx = dy * (gates) + the pools'
    gradients in one pass. The op path's backward writes three products, their sum and three
    pool gradients.
    """

    @staticmethod
    def forward(ctx, x, module, *params):
        spatial = not module.no_spatial
        scale = 1 / (2 + spatial)
        m_cw, i_cw, m_hc, i_hc, m_hw, i_hw = torch.ops.fastattn_C.triplet_pools(x, spatial)
        maps = [m_cw, m_hc] + ([m_hw] if spatial else [])
        dtype = module.cw.conv.conv.weight.dtype
        with torch.enable_grad():
            leaves = [t.to(dtype).detach().requires_grad_() for t in maps]
            gates = _triplet_gates(module, leaves)
        acc = m_cw.dtype
        g = [t.detach().to(acc).reshape(t.shape[0], t.shape[2], t.shape[3]).contiguous() for t in gates]
        g_hw = g[2] if spatial else None
        ctx.save_for_backward(x, g[0], g[1], g_hw, i_cw, i_hc, i_hw if spatial else None)
        ctx.graph = (gates, leaves, params, spatial, scale)
        return torch.ops.fastattn_C.triplet_scale(x, g[0], g[1], g_hw, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, g_cw, g_hc, g_hw, i_cw, i_hc, i_hw = ctx.saved_tensors
        gates, leaves, params, spatial, scale = ctx.graph
        dy = dy.contiguous()
        sums = torch.ops.fastattn_C.triplet_backward_sums(dy, x, scale, spatial)
        need = [p for p in params if p.requires_grad]
        d_gates = [d.view(t.shape).to(t.dtype) for d, t in zip(sums, gates)]
        # retain_graph: the outer graph may be run again; the gates' small graphs are freed with it
        grads = torch.autograd.grad(gates, leaves + need, d_gates, allow_unused=True, retain_graph=True)
        dx = None
        if ctx.needs_input_grad[0]:
            dm = [d.to(g_cw.dtype).contiguous() for d in grads[:len(leaves)]]
            dx = torch.ops.fastattn_C.triplet_backward_dx(
                dy, g_cw, g_hc, g_hw, scale, dm[0], i_cw, dm[1], i_hc, dm[2] if spatial else None, i_hw)
        by_id = dict(zip(map(id, need), grads[len(leaves):]))
        return (dx, None, *[by_id.get(id(p)) for p in params])


class CoordinateAttention(reference.CoordinateAttention):
    """`fastattn.reference.CoordinateAttention` in two passes over x: both directional means in
    one read, then ``x * a_w * a_h`` in one pass. Saved for backward: x and the small gates. In
    CPU training the backward is two passes too (see `train_fused`)."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("CoordinateAttention", x, channels=self.channels)
        if self.train_fused(x):
            return _CoordTrain.apply(x, self, *self.parameters())
        x_h, x_w = coord_pool(x, backend=self.backend)                       # (B, C, H), (B, C, W)
        a_h, a_w = self._gates(x_h, x_w)
        return coord_scale(x, a_h, a_w, backend=self.backend)

    def _gates(self, x_h: torch.Tensor, x_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_h (B, C, H), a_w (B, C, W)) from the means x_h (B, C, H) and x_w (B, C, W)."""
        h, w = x_h.shape[-1], x_w.shape[-1]
        y = self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2).unsqueeze(-1)))  # (B, mip, H + W, 1)
        y = y * (F.relu6(y + 3) / 6)
        y_h, y_w = torch.split(y, [h, w], dim=2)
        return torch.sigmoid(self.conv_h(y_h)).squeeze(-1), torch.sigmoid(self.conv_w(y_w)).squeeze(-1)

    def train_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the CPU training path (`_CoordTrain`: backward reads dy and x once
        for the gates' gradients, then writes dx once) instead of the op path, whose backward
        writes the scale's dx and the pool's dx and adds them (three more passes): the conditions
        of `_train_fused_ok`, NCHW or channels_last, not empty."""
        return x.numel() > 0 and _train_fused_ok(self, x, "coord_train", channels_last=True)


_RAW_CHECKS["coord_train"] = _dispatch.cpu_kernel("coord_pool", "coord_scale", "coord_scale_grads",
                                                  "coord_backward_dx")


class _CoordTrain(torch.autograd.Function):
    """Coordinate attention's CPU training step. Forward: the op path's two passes (means, scale),
    the gates' layers recorded by autograd on the means (a BatchNorm updates its statistics
    once). Backward: one read of dy and x for d a_h and d a_w (`coord_scale_grads`), autograd
    through the gates' layers to the means and parameters, then the whole dx in one write
    (`coord_backward_dx`: dy * a_w * a_h plus the means' gradients)."""

    @staticmethod
    def forward(ctx, x, module, *params):
        x_h, x_w = torch.ops.fastattn_C.coord_pool(x)
        with torch.enable_grad():
            leaves = [x_h.requires_grad_(), x_w.requires_grad_()]
            gates = module._gates(*leaves)
        acc = _acc_dtype(x)
        a_h, a_w = (g.detach().to(acc).contiguous() for g in gates)
        ctx.save_for_backward(x, a_h, a_w)
        ctx.graph = (gates, leaves, params)
        return torch.ops.fastattn_C.coord_scale(x, a_h, a_w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, a_h, a_w = ctx.saved_tensors
        gates, leaves, params = ctx.graph
        want = [p for p in params if p.requires_grad]
        need_x = ctx.needs_input_grad[0]
        dy = dy.to(x.dtype)
        if not (dy.is_contiguous() or dy.is_contiguous(memory_format=torch.channels_last)):
            dy = dy.contiguous(memory_format=torch.channels_last if not x.is_contiguous() else torch.contiguous_format)
        da_h, da_w = torch.ops.fastattn_C.coord_scale_grads(dy, x, a_h, a_w)
        # retain_graph: the outer graph may be run again (backward(retain_graph=True))
        grads = torch.autograd.grad(gates, (leaves if need_x else []) + want,
                                    (da_h.to(gates[0].dtype), da_w.to(gates[1].dtype)), allow_unused=True,
                                    retain_graph=True)
        dx = None
        if need_x:
            dxh, dxw = (torch.zeros_like(t) if g is None else g.to(x.dtype) for g, t in zip(grads[:2], leaves))
            dx = torch.ops.fastattn_C.coord_backward_dx(dy, a_h, a_w, dxh, dxw)
        return (dx, None, *_per_param(params, grads[2 if need_x else 0:]))


class SimAM(reference.SimAM):
    """`fastattn.reference.SimAM` as one fused op: statistics and gate per plane, backward
    recomputing them from x (the only tensor saved). In CPU training (see `saves_stats`), the
    forward also saves each plane's mean and gate scale, and the backward skips their passes."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SimAM", x)
        if self.saves_stats(x):
            check_simam_args(x, self.e_lambda)
            return _SimAMTrain.apply(x, float(self.e_lambda))
        return simam(x, self.e_lambda, backend=self.backend)

    def saves_stats(self, x: torch.Tensor) -> bool:
        """Whether forward runs SimAM's CPU training kernels (`fastattn_C::simam_train_forward` /
        `_backward`: the forward saves (mu, r) per plane, B x C x 2 float64, beside x, and the
        backward's arithmetic drops by a fifth at 14 x 14): x requires grad under grad mode, and the
        conditions of `_cpu_path_ok` (NCHW; channels_last takes the op path)."""
        return torch.is_grad_enabled() and x.requires_grad and _cpu_path_ok(self, x, "simam_train")


_RAW_CHECKS["simam_train"] = _dispatch.cpu_kernel("simam_train_forward", "simam_train_backward")


class _SimAMTrain(torch.autograd.Function):
    """SimAM with its plane statistics saved: the backward's dx equals the op path's (the same
    constants, without recomputing them from x)."""

    @staticmethod
    def forward(ctx, x, e_lambda):
        y, stats = torch.ops.fastattn_C.simam_train_forward(x, e_lambda)
        ctx.save_for_backward(x, stats)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, stats = ctx.saved_tensors
        return torch.ops.fastattn_C.simam_train_backward(dy.to(x.dtype), x, stats), None
