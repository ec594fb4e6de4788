"""fastattn::channel_mean on CUDA (CUDA C++ kernel when built): runs only where a GPU is present."""
import pytest
import torch

import fastattn
from fastattn import _ext
from fastattn.ops.pool import channel_mean_backend

pytestmark = pytest.mark.gpu

SHAPES = [(1, 1, 1, 1), (3, 37, 13, 17), (2, 300, 5, 3), (32, 256, 56, 56), (2, 1025, 7, 7)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2),
                                       (torch.float64, 1e-12)], ids=["fp32", "fp16", "bf16", "fp64"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_cuda_matches_reference(shape, dtype, tol, layout):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        x = torch.cat([x, x], 1)[:, ::2]
    got = fastattn.channel_mean(x)
    torch.testing.assert_close(got.double(), x.double().mean((2, 3)), rtol=tol, atol=tol)


def test_cuda_backend_is_the_kernel():
    assert _ext.has_cuda_kernels(), f"fastattn._C has no CUDA kernels: {_ext.why_unavailable() or _ext.build_info()}"
    assert channel_mean_backend(torch.empty(1, 1, 1, 1, device="cuda")) == "cuda"


def test_cuda_gradcheck_and_opcheck():
    x = torch.randn(2, 5, 3, 4, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fastattn.channel_mean, (x,))
    torch.library.opcheck(torch.ops.fastattn.channel_mean.default, (x,))
