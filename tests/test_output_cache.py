"""The CPU output cache (csrc/bind/output_cache.h): outputs of 8 MiB or more reuse freed blocks of
the same rounded size instead of fresh, page-faulted mappings. Reuse must not change results,
layouts or storage behaviour; the limit and the off switch must hold."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C is not built")

BIG = (2, 64, 256, 260)          # 34 MB of fp32: above the cache's 8 MiB threshold


def _C():
    import fastattn._C as C

    return C


def _scale(x, a):
    return torch.ops.fastattn_C.channel_scale(x, a, None)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "permuted"])
def test_reused_block_gives_the_same_result_and_layout(layout):
    C = _C()
    x = torch.randn(BIG)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":                 # dense, neither NCHW nor channels_last
        x = torch.randn(BIG[0], BIG[2], BIG[1], BIG[3]).transpose(1, 2)
    a = torch.rand(BIG[:2])
    want = x * a[:, :, None, None]
    y = _scale(x, a)
    y.fill_(float("nan"))                      # a freed block full of stale values
    del y
    before = C.output_cache_stats()
    y = _scale(x, a)
    after = C.output_cache_stats()
    assert after["hits"] == before["hits"] + 1, (before, after)
    assert y.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize("shape,cached", [((2, 8, 16, 16), False), ((2, 1024, 32, 31), False),
                                          ((2, 1024, 32, 32), True)], ids=["8KiB", "7.75MiB", "8MiB"])
def test_outputs_under_8_mib_bypass_the_cache(shape, cached):
    C = _C()
    before = C.output_cache_stats()
    _scale(torch.randn(shape), torch.rand(shape[:2]))
    after = C.output_cache_stats()
    used = (after["hits"] + after["misses"]) - (before["hits"] + before["misses"])
    assert used == (1 if cached else 0), (before, after)


def test_cached_output_storage_resizes_and_frees():
    C = _C()
    x, a = torch.randn(BIG), torch.rand(BIG[:2])
    y = _scale(x, a)
    want = y.clone()
    y.resize_(y.numel() + 1000)                # resizable storage: copied into a new block
    torch.testing.assert_close(y[:want.numel()], want.flatten(), rtol=0, atol=0)
    del y
    C.empty_output_cache()
    assert C.output_cache_stats()["kept_bytes"] == 0


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_TWO_OUTPUTS = """
    import torch, fastattn._C as C
    x, a = torch.randn(2, 64, 256, 260), torch.rand(2, 64)
    y1 = torch.ops.fastattn_C.channel_scale(x, a, None)
    y2 = torch.ops.fastattn_C.channel_scale(x, a, None)
    torch.testing.assert_close(y1, x * a[:, :, None, None], rtol=0, atol=0)
    del y1, y2
    print(C.output_cache_stats()["kept_bytes"], C.output_cache_stats()["misses"])
"""


def test_limit_bounds_the_kept_blocks():
    out = _run(_TWO_OUTPUTS, {"FASTATTN_CPU_CACHE_BYTES": str(40 << 20)})
    assert out.returncode == 0, out.stderr
    kept, misses = map(int, out.stdout.split())
    assert misses == 2 and 0 < kept <= 40 << 20        # one of the two freed 34 MB blocks kept


def test_zero_turns_the_cache_off():
    out = _run(_TWO_OUTPUTS, {"FASTATTN_CPU_CACHE_BYTES": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0"]


def test_bad_setting_is_an_error_naming_it():
    out = _run(_TWO_OUTPUTS, {"FASTATTN_CPU_CACHE_BYTES": "1GB"})
    assert out.returncode != 0
    assert "FASTATTN_CPU_CACHE_BYTES must be a non-negative integer (bytes), got '1GB'" in out.stderr


# --- glibc's malloc settings (csrc/bind/malloc_tuning.h)

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_malloc_settings_are_applied_unless_turned_off():
    """mallopt succeeds at load (build_info's malloc_tuned), FASTATTN_MALLOPT=0 leaves glibc's own
    settings. Their effect on page faults depends on the process's memory map (a heap that cannot
    grow in place), so it is shown by the benchmark, not asserted here."""
    code = """
        import fastattn._C as C
        print(C.build_info()["malloc_tuned"])
    """
    assert [_run(code, env).stdout.strip() for env in ({}, {"FASTATTN_MALLOPT": "1"}, {"FASTATTN_MALLOPT": "0"})] == \
        ["True", "True", "False"]


def test_bad_malloc_setting_is_an_error_naming_it():
    code = """
        from fastattn import _ext
        print(_ext.available(), _ext.why_unavailable())
    """
    out = _run(code, {"FASTATTN_MALLOPT": "yes"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False ") and "FASTATTN_MALLOPT must be 0" in out.stdout and "'yes'" in out.stdout
