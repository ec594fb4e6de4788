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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
