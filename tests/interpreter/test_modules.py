"""Drop-in fast modules with backend="triton" (Triton interpreter, CPU tensors) against their references."""
import pytest

from cases.dropin import compare, dropin_cases

CASES = dropin_cases()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_triton_matches_reference(case, layout, train):
    compare(case, backend="triton", layout=layout, train=train)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_triton_matches_reference_on_relu_outputs(case):
    """Inputs with a ReLU's ties (see tests/test_modules.py): max pools and scSE's max(x a, x s)."""
    compare(case, backend="triton", layout="nchw", train=True, relu=True)
