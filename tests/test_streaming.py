"""CPU kernels write fp32 outputs of at least half the last-level cache with streaming stores
(csrc/cpu/stream.h): a separate code path (aligned head, vector body, tail), checked here on
maps just large enough to take it, with odd plane sizes so that planes start unaligned."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")


def _big_shape(planes: int = 5) -> tuple[int, int, int, int]:
    """(2, planes, H, W) with H * W odd, over LLC / 2 bytes in fp32."""
    need = _ext.build_info()["llc_bytes"] // 2 // 4 + 1
    side = math.isqrt(need // (2 * planes)) + 2
    return (2, planes, side | 1, (side + 2) | 1)


@pytest.mark.parametrize("residual", [False, True])
def test_channel_scale_streaming_path(residual):
    shape = _big_shape()
    assert 2 * math.prod(shape) * 4 >= _ext.build_info()["llc_bytes"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    a = torch.rand(shape[:2], generator=g)
    r = torch.randn(shape, generator=g) if residual else None
    y = fastattn.ops.channel_scale(x, a, r, backend="cpu")
    want = x * a[:, :, None, None] + (r if residual else 0)
    torch.testing.assert_close(y, want, rtol=2**-23, atol=2**-23 if residual else 0)


@pytest.mark.parametrize("op", ["se", "se_residual", "srm", "cbam", "scse_max", "scse_add"])
def test_one_read_kernels_streaming_path(op):
    """The one-read inference kernels (csrc/cpu/se.cpp) stream their fp32 output too."""
    from test_se_fused import cbam_args, cbam_math, scse_math, se_math, srm_math

    shape = _big_shape(planes=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g) + 1
    C = shape[1]
    if op.startswith("se"):
        w1, w2, b1, b2 = torch.randn(2, C, generator=g), torch.randn(C, 2, generator=g), torch.randn(2), torch.randn(C)
        r = torch.randn(shape, generator=g) if op == "se_residual" else None
        y, want = torch.ops.fastattn_C.se_forward(x, w1, b1, w2, b2, r), se_math(x, w1, b1, w2, b2, r)
    elif op == "srm":
        a = [torch.randn(C, generator=g) for _ in range(3)]
        y, want = torch.ops.fastattn_C.srm_forward(x, *a, 1e-5), srm_math(x, *a)
    elif op == "cbam":
        args = cbam_args(C, 7, g)
        y, want = torch.ops.fastattn_C.cbam_forward(x, *args), cbam_math(x, *args)
    else:
        args = (torch.randn(2, C, generator=g), torch.randn(2, generator=g), torch.randn(C, 2, generator=g),
                torch.randn(C, generator=g), torch.randn(C, generator=g), 0.1, op[5:])
        y, want = torch.ops.fastattn_C.scse_forward(x, *args), scse_math(x, *args)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_channel_scale_affine_backward_streaming_path():
    shape = _big_shape(planes=3)
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    gate, k, a, e = (torch.randn(shape[:2], generator=g) for _ in range(4))
    filt = torch.randn(shape[1:], generator=g)
    dx = torch.ops.fastattn_C.channel_scale_affine_backward(dy, x, gate, k, a, filt, e)
    want = dy.double() * gate.double()[..., None, None] + k.double()[..., None, None] * x.double() \
        + a.double()[..., None, None] + e.double()[..., None, None] * filt.double()
    torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-5)
    dx = torch.ops.fastattn_C.channel_scale_affine_backward(dy, x, gate, None, a, filt, e)
    want = want - k.double()[..., None, None] * x.double()
    torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-5)
    dx = torch.ops.fastattn_C.channel_scale_affine_backward(dy, x, gate, None, a, None, None)
    want = want - e.double()[..., None, None] * filt.double()
    torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_se_forward_channels_last_streaming_path(residual):
    """SE's channels_last loop streams rows of C (a multiple of 16) when the output is large."""
    from test_se_fused import se_math

    B, C, H, W = _big_shape(planes=16)
    shape = (B, C, H, W)
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(shape, generator=g) + 1).to(memory_format=torch.channels_last)
    w1, w2, b1, b2 = torch.randn(4, C, generator=g), torch.randn(C, 4, generator=g), torch.randn(4), torch.randn(C)
    r = torch.randn(shape, generator=g).to(memory_format=torch.channels_last) if residual else None
    y = torch.ops.fastattn_C.se_forward(x, w1, b1, w2, b2, r)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), se_math(x, w1, b1, w2, b2, r), rtol=1e-5, atol=1e-5)


def test_sge_streaming_path():
    """SGE's forward and backward stream fp32 y and dx (NCHW): against the same kernels in float64
    (no streaming)."""
    shape = _big_shape(planes=8)
    g = torch.Generator().manual_seed(8)
    x, dy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w, b = torch.randn(2, generator=g), torch.randn(2, generator=g)
    ops = torch.ops.fastattn_C
    y, m, mu, sd = ops.sge_gate(x, w, b, 2, 1e-5)
    dx, dw, db = ops.sge_gate_backward(dy, x, w, b, m, mu, sd, 2, 1e-5)
    x64, w64, b64 = x.double(), w.double(), b.double()
    y64, m64, mu64, sd64 = ops.sge_gate(x64, w64, b64, 2, 1e-5)
    want, dw64, db64 = ops.sge_gate_backward(dy.double(), x64, w64, b64, m64, mu64, sd64, 2, 1e-5)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db.double(), db64, rtol=1e-4, atol=1e-4)


def test_simam_backward_streaming_path():
    """SimAM's backward streams fp32 dx for NCHW planes that keep their gates (<= 16384 positions):
    against the same kernel in float64 (no streaming); odd planes start unaligned."""
    H, W = 45, 47
    planes = _ext.build_info()["llc_bytes"] // 2 // 4 // (H * W) + 1
    shape = (2, (planes + 1) // 2, H, W)
    g = torch.Generator().manual_seed(10)
    x, dy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    ops = torch.ops.fastattn_C
    want = ops.simam_backward(dy.double(), x.double(), 0.1)
    torch.testing.assert_close(ops.simam_backward(dy, x, 0.1).double(), want, rtol=1e-5, atol=1e-5)
    _, stats = ops.simam_train_forward(x, 0.1)
    torch.testing.assert_close(ops.simam_train_backward(dy, x, stats).double(), want, rtol=1e-5, atol=1e-5)


def test_srm_train_streaming_path():
    """SRM's training kernels stream fp32 y and dx: against float64 autograd (test_srm_train_cpu's
    math); odd planes start unaligned, each plane has its own scale (a well-conditioned BatchNorm)."""
    from test_srm_train_cpu import BN_EPS, STD_EPS, srm_math

    B, H, W = 4, 63, 63
    C = _ext.build_info()["llc_bytes"] // 2 // 4 // (B * H * W) + 1
    g = torch.Generator().manual_seed(12)
    x = torch.randn(B, C, H, W, generator=g) * (torch.rand(B, C, 1, 1, generator=g) + 0.5) \
        + torch.randn(B, C, 1, 1, generator=g)
    dy = torch.randn(B, C, H, W, generator=g)
    cfc, gamma, beta = torch.randn(C, 2, generator=g), torch.randn(C, generator=g), torch.randn(C, generator=g)
    y, mean, std, gate, zmean, zvar = torch.ops.fastattn_C.srm_train_forward(x, cfc, gamma, beta, BN_EPS, STD_EPS)
    xd = x.double().requires_grad_()
    yd = srm_math(xd, cfc.double(), gamma.double(), beta.double())[0]
    yd.backward(dy.double())
    torch.testing.assert_close(y.double(), yd.detach(), rtol=5e-5, atol=5e-5)
    dx = torch.ops.fastattn_C.srm_train_backward(dy, x, cfc, gamma, BN_EPS, mean, std, gate, zmean, zvar, True)[0]
    torch.testing.assert_close(dx.double(), xd.grad, rtol=5e-5, atol=5e-5)


def test_nam_train_backward_streaming_path():
    """NAM's training backward streams fp32 dx from its kept gates: against float64 autograd
    (test_nam_train_cpu's math); odd planes start unaligned."""
    from test_nam_train_cpu import EPS, nam_math, random_args

    B, H, W = 4, 63, 63
    C = _ext.build_info()["llc_bytes"] // 2 // 4 // (B * H * W) + 1
    g = torch.Generator().manual_seed(14)
    x, gamma, bias, w = random_args((B, C, H, W), torch.float32, g)
    dy = torch.randn(B, C, H, W, generator=g)
    _, mean, var = torch.ops.fastattn_C.nam_train_forward(x, gamma, bias, w, EPS)
    xd = x.double().requires_grad_()
    nam_math(xd, gamma.double(), bias.double(), w.double())[0].backward(dy.double())
    dx = torch.ops.fastattn_C.nam_train_backward(dy, x, gamma, bias, w, EPS, mean, var, True)[0]
    torch.testing.assert_close(dx.double(), xd.grad, rtol=5e-5, atol=5e-5)


def test_llc_override_is_used():
    """tests/conftest.py pins FASTATTN_LLC_BYTES: the kernels plan with exactly that."""
    info = _ext.build_info()
    assert info["llc_source"] == "FASTATTN_LLC_BYTES"
    assert info["llc_bytes"] == int(os.environ["FASTATTN_LLC_BYTES"])


def _sysfs_llc() -> tuple[int, int] | None:
    """(bytes, CPUs sharing it) of cpu0's largest cache of level 2 or more in sysfs."""
    best = None
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            level = int(open(f"{d}/level").read())
            size = open(f"{d}/size").read().strip()
            n = int(size[:-1]) << {"K": 10, "M": 20}[size[-1]] if size[-1] in "KM" else int(size)
        except (OSError, ValueError):
            continue
        try:   # unknown (0) when unreadable: then the size is taken uncapped
            cpus = open(f"{d}/shared_cpu_list").read().strip()
            shared = sum(int(b) - int(a) + 1 if "-" in r else 1
                         for r in cpus.split(",") for a, _, b in [r.partition("-")])
        except (OSError, ValueError):
            shared = 0
        if level >= 2 and (best is None or n > best[0]):
            best = (n, shared)
    return best


def test_llc_without_override_is_sysfs_capped_per_cpu():
    """Without FASTATTN_LLC_BYTES: sysfs's size, at most 16 MiB per CPU sharing the cache (a VM
    may be shown its host's whole L3: 480 MiB for 2 vCPUs on the dev machine)."""
    found = _sysfs_llc()
    if found is None:
        pytest.skip("no cache sizes in sysfs")
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_LLC_BYTES"}
    code = "import json; from fastattn import _ext; i = _ext.build_info(); " \
           "print(json.dumps([i['llc_bytes'], i['llc_reported_bytes'], i['llc_shared_cpus'], i['llc_source']]))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    bytes_, reported, shared, source = json.loads(out.stdout.strip().splitlines()[-1])
    size, cpus = found
    assert (reported, shared) == (size, cpus)
    capped = cpus > 0 and size > cpus * (16 << 20)
    assert bytes_ == (cpus * (16 << 20) if capped else size)
    assert source == ("sysfs-capped" if capped else "sysfs")


@pytest.mark.parametrize("value", ["32MiB", "0", "99999999999999999999"])
def test_bad_llc_setting_is_an_error_naming_it(value):
    """A FASTATTN_LLC_BYTES that is not a positive integer keeps the extension from loading,
    with the reason (a silently ignored value would plan with sysfs's size instead)."""
    code = "from fastattn import _ext; print(_ext.available(), _ext.why_unavailable())"
    env = dict(os.environ, FASTATTN_LLC_BYTES=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False ")
    assert "FASTATTN_LLC_BYTES must be a positive integer" in out.stdout and f"'{value}'" in out.stdout
