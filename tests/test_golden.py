"""Parity of fastattn.reference with the authors' official PyTorch code.

Each file in tests/data/golden holds the official module's state, inputs, outputs, gradients
and BatchNorm statistics (float64, CPU) for a fixed random state; see its README.md.
"""
from __future__ import annotations

import pathlib

import pytest
import torch

import fastattn.reference as ref

GOLDEN = sorted((pathlib.Path(__file__).parent / "data" / "golden").glob("*.pt"))


def _close(got, want, what):
    if got.shape != want.shape and got.numel() == want.numel():
        got = got.reshape(want.shape)
    torch.testing.assert_close(
        got, want, rtol=1e-7, atol=1e-7 * max(1.0, want.abs().max().item()), msg=lambda m: f"{what}: {m}"
    )


def _build(g):
    m = getattr(ref, g["fastattn_class"])(**g["fastattn_kwargs"]).double()
    sd = m.state_dict()
    assert len(sd) == len(g["state"]), (
        f"state_dict has {len(sd)} entries, official has {len(g['state'])}: "
        f"{list(sd)} vs {[k for k, _ in g['state']]}"
    )
    for (mine, t), (theirs, v) in zip(sd.items(), g["state"]):
        assert t.shape == v.shape, f"{mine} {tuple(t.shape)} vs official {theirs} {tuple(v.shape)}"
    m.load_state_dict({k: v for k, (_, v) in zip(sd, g["state"])})
    return m


def _run(g, m, inputs):
    cls = g["fastattn_class"]
    if cls == "DIACell":
        y1, s1 = m(inputs[0])
        y2, s2 = m(inputs[1], s1)
        return [y1, *s1, y2, *s2]
    if cls == "DCASqueezeExcite":
        return [*m(inputs[0], None), *m(inputs[0], inputs[1])]
    out = m(*inputs)
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _param_names_in_official_order(g, m):
    """Map official parameter keys to ours through the positional state-dict zip."""
    ours = dict(zip([k for k, _ in g["state"]], m.state_dict().keys()))
    return [ours[k] for k in g["param_keys"]]


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_golden(path, mode):
    g = torch.load(path, weights_only=True)
    m = _build(g)
    m.train(mode == "train")
    want = g[mode]
    inputs = [t.clone().requires_grad_(True) for t in g["inputs"]]
    outs = _run(g, m, inputs)
    assert len(outs) == len(want["outputs"])
    for i, (o, w) in enumerate(zip(outs, want["outputs"])):
        _close(o, w, f"output {i}")

    params = dict(m.named_parameters())
    names = _param_names_in_official_order(g, m)
    wrt = inputs + [params[n] for n in names]
    loss = sum((o * c.reshape(o.shape)).sum() for o, c in zip(outs, g["cotangents"]))
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    for i, (gr, w) in enumerate(zip(grads[: len(inputs)], want["input_grads"])):
        _close(gr, w, f"input grad {i}")
    for n, gr, w in zip(names, grads[len(inputs):], want["param_grads"]):
        if w is None:
            assert gr is None, f"param {n}: official forward does not use it, ours does"
        else:
            assert gr is not None, f"param {n}: no gradient"
            _close(gr, w, f"param grad {n}")
    if mode == "train":
        for (k, v), w in zip(m.state_dict().items(), want["state_after"]):
            if v.dtype == torch.int64:
                assert torch.equal(v, w), f"{k}: {v} vs {w}"
            else:
                _close(v, w, f"state after train forward: {k}")
