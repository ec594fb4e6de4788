"""Fast channel-and-spatial attention modules: the combine of both gates is one pass over x."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..ops.gate import channel_affine_gate, channel_scale, channel_spatial_gate
from ..ops.coord import coord_pool, coord_scale
from ..ops.pool import channel_pool
from ..ops.simam import simam
from ..ops.spatial import spatial_pool, spatial_scale, zpool
from ..ops.pool import channel_mean
from .channel import _bn_fold, _bn_frozen, _one_read_ok, plane_var_mean
from ..reference._checks import check_feature_map, like_input


class SCSE(reference.SCSE):
    """`fastattn.reference.SCSE` with one fused combine: max(x * a, x * s) (or x * a + x * s).

    The channel gate reads x once (mean), the spatial gate once (1x1 conv), the combine once.
    """

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SCSE", x, channels=self.channels)
        cse, sse = self.cSE, self.sSE
        a = torch.sigmoid(cse.fc2(F.relu(cse.fc1(channel_mean(x)))))
        s = torch.sigmoid(sse.conv(x))
        return channel_spatial_gate(x, a, s, self.combine, backend=self.backend)


class BAM(reference.BAM):
    """`fastattn.reference.BAM` with the final ``x * (1 + sigmoid(Mc * Ms))`` fused in one pass
    (the spatial branch's convolutions stay with PyTorch)."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("BAM", x, channels=self.channels)
        if self.training and x.shape[0] < 2:
            raise ValueError(
                "BAM: argument 'x' must have batch size > 1 in training mode "
                f"(the channel branch has a BatchNorm1d), got {x.shape[0]}"
            )
        mc = self.channel_att.gate_c(channel_mean(x))
        ms = self.spatial_att(x)
        mode = "bam" if self.combine == "product" else "bam_sum"
        return channel_spatial_gate(x, mc, ms, mode, backend=self.backend)


class ShuffleAttention(reference.ShuffleAttention):
    """`fastattn.reference.ShuffleAttention` (SA-Net) as one gate pass plus the channel shuffle.

    Both branches are per-channel affine gates once the statistics are known: the channel branch
    ``x * sigmoid(cweight * mean + cbias)`` (alpha = 0), the spatial branch
    ``x * sigmoid(sweight * GN(x) + sbias)`` with a one-channel-per-group GroupNorm folded into
    alpha and beta. Passes: the per-channel statistics (one read), the gate, and the 2-group
    channel shuffle (a copy, as in the reference).
    """

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("ShuffleAttention", x, channels=self.channels)
        b, c, h, w = x.shape
        var, mean = plane_var_mean(x, self.gn.eps, self.backend)      # (B, C) each
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
        y = channel_affine_gate(x, alpha, beta, backend=self.backend)
        # Channel shuffle with 2 groups: channel k of half j goes to position 2k + j.
        out = y.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return like_input(out, x)


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
        gate = self.ChannelGate
        kinds = [_CBAM_FUSED_POOLS[p] for p in gate.pool_types]
        pooled = channel_pool(x, kinds, backend=self.backend)
        att = gate.mlp(pooled[0])
        for p in pooled[1:]:
            att = att + gate.mlp(p)
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
    permuted copies). The three gated products stay in PyTorch (a fused three-gate kernel is
    still to come), so only the pooling side is faster than the reference."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("TripletAttention", x)
        # (B, 1, C, W) -> (B, C, 1, W) and (B, 1, H, C) -> (B, C, H, 1): views, no copies.
        out = x * self.cw(zpool(x, 2, backend=self.backend)).permute(0, 2, 1, 3)
        out = out + x * self.hc(zpool(x, 3, backend=self.backend)).permute(0, 3, 2, 1)
        if self.no_spatial:
            return like_input(out * 0.5, x)
        out = out + x * self.hw(zpool(x, 1, backend=self.backend))
        return like_input(out * (1 / 3), x)


class CoordinateAttention(reference.CoordinateAttention):
    """`fastattn.reference.CoordinateAttention` in two passes over x: both directional means in
    one read, then ``x * a_w * a_h`` in one pass. Saved for backward: x and the small gates."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("CoordinateAttention", x, channels=self.channels)
        h, w = x.shape[-2:]
        x_h, x_w = coord_pool(x, backend=self.backend)                       # (B, C, H), (B, C, W)
        y = self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2).unsqueeze(-1)))  # (B, mip, H + W, 1)
        y = y * (F.relu6(y + 3) / 6)
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h)).squeeze(-1)                   # (B, C, H)
        a_w = torch.sigmoid(self.conv_w(y_w)).squeeze(-1)                   # (B, C, W)
        return coord_scale(x, a_h, a_w, backend=self.backend)


class SimAM(reference.SimAM):
    """`fastattn.reference.SimAM` as one fused op: statistics and gate per plane, backward
    recomputing them from x (the only tensor saved)."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("SimAM", x)
        return simam(x, self.e_lambda, backend=self.backend)
