"""Triton kernels on CPU tensors under TRITON_INTERPRET=1.

The variable must be set before triton JIT-decorates the kernels, so this directory runs in
its own pytest process: `TRITON_INTERPRET=1 python -m pytest tests/interpreter`.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    raise pytest.UsageError("tests/interpreter must run with TRITON_INTERPRET=1 set in the environment")

pytest.importorskip("triton")


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.interpreter)
