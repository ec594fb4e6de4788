"""fastattn::channel_mean: the C++ CPU kernel (and its fallback) against the reference math."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import _ext
from fastattn.ops.pool import channel_mean_backend, channel_mean_reference

DTYPES = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(1, 1, 1, 1), (2, 3, 7, 7), (3, 37, 13, 17), (2, 300, 5, 3), (1, 513, 1, 1), (4, 8, 1, 33)]


def _views(x):
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    # a non-contiguous view: every other channel of a wider tensor, then a transposed plane
    wide = torch.cat([x, x], 1)[:, ::2]
    yield "channel_slice", wide
    yield "transposed", x.transpose(2, 3).contiguous().transpose(2, 3)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).replace("torch.", ""))
def test_forward_matches_reference(shape, dtype):
    x64 = torch.randn(shape, dtype=torch.float64)
    for layout, x in _views(x64.to(dtype)):
        got = fastattn.channel_mean(x)
        want = x.double().mean((2, 3))
        assert got.dtype == dtype and got.shape == shape[:2] and got.is_contiguous()
        tol = DTYPES[dtype]
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{layout}: {m}")


def test_uses_the_extension_on_cpu():
    if not _ext.available():
        pytest.fail(f"fastattn._C should be built in the test environment: {_ext.why_unavailable()}")
    assert channel_mean_backend(torch.empty(1, 1, 1, 1)) == "cpu"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck(layout):
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(fastattn.channel_mean, (x.requires_grad_(True),))


def test_backward_value():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    dy = torch.randn(2, 3)
    (fastattn.channel_mean(x) * dy).sum().backward()
    torch.testing.assert_close(x.grad, (dy / 20)[:, :, None, None].expand(2, 3, 4, 5))


def test_opcheck():
    for x in (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(torch.ops.fastattn.channel_mean.default, (x.requires_grad_(True),))


def test_compile_fullgraph():
    def f(x):
        return x * torch.sigmoid(fastattn.channel_mean(x))[:, :, None, None]

    x = torch.randn(2, 8, 5, 5)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, f(x))


def test_empty_inputs():
    assert fastattn.channel_mean(torch.empty(0, 3, 4, 4)).shape == (0, 3)
    assert fastattn.channel_mean(torch.empty(2, 0, 4, 4)).shape == (2, 0)
    # mean over an empty plane is NaN, as in torch
    assert torch.isnan(fastattn.channel_mean(torch.empty(2, 3, 0, 4))).all()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_more_than_2_31_elements(layout):
    """Offsets past 2**31 (4 GiB of fp16): a 32-bit index would wrap and miss the marked tail."""
    shape = (1, 2, 2**15, 2**15 + 1)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(shape, dtype=torch.float16, memory_format=fmt).fill_(1.0)
    x[:, :, -1, -8:] = 1024.0   # elements beyond 2**31 in memory for both layouts
    n = shape[2] * shape[3]
    got = fastattn.channel_mean(x).double()
    del x
    want = (n - 8 + 8 * 1024.0) / n
    torch.testing.assert_close(got, torch.full((1, 2), want, dtype=torch.float64), rtol=2e-3, atol=0)


@pytest.mark.parametrize("bad,err,match", [
    (torch.randn(2, 3, 4), ValueError, r"channel_mean: argument 'x' must be 4-D"),
    (torch.ones(2, 3, 4, 4, dtype=torch.int32), TypeError, r"channel_mean: argument 'x' must be a floating-point"),
    ([1.0], TypeError, r"channel_mean: argument 'x' must be a torch.Tensor"),
])
def test_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        fastattn.channel_mean(bad)


def test_raw_kernel_checks():
    if not _ext.available():
        pytest.skip("extension not built")
    with pytest.raises(ValueError, match="argument 'x' must be 4-D"):
        torch.ops.fastattn_C.channel_mean(torch.randn(3, 4))
    with pytest.raises(TypeError, match="argument 'x' must be float32"):
        torch.ops.fastattn_C.channel_mean(torch.ones(1, 2, 3, 4, dtype=torch.int64))


def test_reference_math_accumulates_in_fp32():
    x = torch.full((1, 1, 64, 64), 1.0 + 2**-7, dtype=torch.bfloat16)
    assert channel_mean_reference(x).item() == x[0, 0, 0, 0].item()


@pytest.mark.parametrize("disable", ["0", "1"])
def test_info_runs_with_and_without_extension(disable):
    env = dict(os.environ, FASTATTN_NO_EXTENSION=disable)
    out = subprocess.run([sys.executable, "-m", "fastattn", "info"], env=env, capture_output=True, text=True,
                         check=True).stdout
    if disable == "1":
        assert "fastattn._C    missing: disabled by FASTATTN_NO_EXTENSION" in out
        assert "cpu (C++ kernels)          no" in out
    else:
        assert "fastattn._C    loaded" in out


def test_check_without_extension_uses_torch():
    env = dict(os.environ, FASTATTN_NO_EXTENSION="1")
    res = subprocess.run([sys.executable, "-m", "fastattn", "check"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^channel_mean +torch ", res.stdout, re.M) and "0 failed" in res.stdout
