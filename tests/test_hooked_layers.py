"""The whole-module CPU paths read their layers' weights without calling the layers, so a layer's
forward hooks would not run there. Pruning recomputes a layer's weight from weight_orig and its
mask in a forward pre-hook: after an optimizer step the stored weight is stale until the layer is
called again. Every fast module with a pruned layer must follow its reference through training
steps and an eval forward (the paths step aside for hooked layers)."""
import pytest
import torch
import torch.nn.utils.prune as prune

from cases.paths import random_pair
from fastattn import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastattn._C not built")

# (module, constructor args, a path to a layer with a weight)
CASES = [("SqueezeExcite", (32,), "fc1"), ("ECA", (32,), "conv"), ("SRM", (32,), "bn"),
         ("CBAM", (32,), "SpatialGate.spatial.conv"), ("SCSE", (32,), "sSE.conv"),
         ("MultiSpectralAttention", (32, 7, 7), "fc.0"), ("BAM", (32,), "spatial_att.gate_s.gate_s_conv_reduce0"),
         ("TripletAttention", (), "cw.conv.conv"), ("TiledSqueezeExcite", (32,), "fc1")]


@pytest.mark.parametrize("name,args,layer", CASES, ids=[c[0] for c in CASES])
def test_pruned_layer_is_honoured(name, args, layer):
    torch.manual_seed(0)
    r, f = random_pair(name, torch.float32, *args)
    for m in (r, f):
        prune.l1_unstructured(m.get_submodule(layer), "weight", amount=0.5)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (r, f)]
    x = torch.randn(4, 32, 7, 7)
    for _ in range(2):                      # training steps: weight_orig changes after each
        for m, opt in zip((r, f), opts):
            m.train()
            opt.zero_grad()
            (m(x) ** 2).mean().backward()
            opt.step()
    r.eval(), f.eval()
    with torch.no_grad():
        torch.testing.assert_close(f(x), r(x), rtol=1e-4, atol=1e-4)
