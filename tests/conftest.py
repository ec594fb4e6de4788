import os
import sys

import pytest
import torch

# tests/ holds helper modules (cases/) imported by the test files.
sys.path.insert(0, os.path.dirname(__file__))

# The CPU kernels' cache thresholds (streaming stores, samples that fit in cache) follow the
# last-level cache size, and tests size their maps to cross them: pin it (32 MiB), so that the
# same paths run on every machine with maps of tens of MB (a VM shown a 480 MiB L3 made them GBs).
os.environ.setdefault("FASTATTN_LLC_BYTES", str(32 << 20))

# The Triton interpreter tests need TRITON_INTERPRET=1 before any kernel is imported: they run
# in their own process (see tests/interpreter/conftest.py and .ci/run).
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    collect_ignore = ["interpreter"]


# The CUDA emulator tests (tests/test_pool_cuda_emu.py, tests/test_cuda_emu_ops.py): opt-in, the
# extension of tests/cuda_emu/ built once per session, run for a 1-SM and a 132-SM device (the
# launchers' plane splits differ).
CUDA_EMU_MARKS = [pytest.mark.slow,
                  pytest.mark.skipif(os.environ.get("FASTATTN_CUDA_EMU", "0") != "1",
                                     reason="set FASTATTN_CUDA_EMU=1 to build and run the CUDA kernels under the CPU "
                                            "emulator (tests/cuda_emu, a few minutes)")]


@pytest.fixture(scope="session")
def cuda_emu_build():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emu"))
    import build

    return build.build()


@pytest.fixture(params=[1, 132], ids=lambda n: f"sm{n}")
def cuda_emu_ops(cuda_emu_build, request):
    """torch.ops.fastattn_emu (the CUDA kernels on CPU tensors), planning for 1 or 132 SMs."""
    cuda_emu_build.set_sm_count(request.param)
    return cuda_emu_build


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
