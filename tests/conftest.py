import os
import sys

import pytest
import torch

# tests/ holds helper modules (cases/) imported by the test files.
sys.path.insert(0, os.path.dirname(__file__))

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
