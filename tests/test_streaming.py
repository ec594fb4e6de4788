"""CPU kernels write fp32 outputs larger than twice the last-level cache with streaming stores
(csrc/cpu/stream.h): a separate code path (aligned head, vector body, tail), checked here on
maps just large enough to take it, with odd plane sizes so that planes start unaligned."""
import math

import pytest
import torch

import fastattn
from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")


def _big_shape(planes: int = 5) -> tuple[int, int, int, int]:
    """(2, planes, H, W) with H * W odd, over 2 x LLC bytes in fp32."""
    need = 2 * _ext.build_info()["llc_bytes"] // 4 + 1
    side = math.isqrt(need // (2 * planes)) + 2
    return (2, planes, side | 1, (side + 2) | 1)


@pytest.mark.parametrize("residual", [False, True])
def test_channel_scale_streaming_path(residual):
    shape = _big_shape()
    assert math.prod(shape) * 4 >= 2 * _ext.build_info()["llc_bytes"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    a = torch.rand(shape[:2], generator=g)
    r = torch.randn(shape, generator=g) if residual else None
    y = fastattn.ops.channel_scale(x, a, r, backend="cpu")
    want = x * a[:, :, None, None] + (r if residual else 0)
    torch.testing.assert_close(y, want, rtol=2**-23, atol=2**-23 if residual else 0)
