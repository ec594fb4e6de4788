"""Drop-in fast modules with backend="triton" (Triton interpreter, CPU tensors) against their references."""
import pytest

from cases.dropin import compare, dropin_cases

CASES = dropin_cases()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_triton_matches_reference(case, layout, train):
    compare(case, backend="triton", layout=layout, train=train)
