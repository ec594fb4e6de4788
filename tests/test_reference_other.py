"""Closed-form checks of fastattn.reference.other (MODULES.md section 6), beyond the generic tests."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn.reference as ref
from cases import randomise


def _x(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- DCA ---------------------------------------------------------------------------------------------------------


def test_dca_prev_none_is_plain_se():
    m = randomise(ref.DCASqueezeExcite(in_channels=6, channels=12, reduction=4).double()).eval()
    x = _x(2, 12, 5, 7)
    out, att = m(x)
    gap = x.mean(dim=(2, 3))
    fc1, fc2 = m.fc[0], m.fc[2]
    a = torch.sigmoid(F.linear(F.relu(F.linear(gap, fc1.weight, fc1.bias)), fc2.weight, fc2.bias))
    _close(out, x * a[:, :, None, None])
    _close(att, gap * a)
    out2, att2 = m(x, None)
    _close(out2, out)
    _close(att2, att)


def test_dca_prev_path_formula():
    m = randomise(ref.DCASqueezeExcite(in_channels=6, channels=12, reduction=4).double()).eval()
    x, prev = _x(2, 12, 5, 7), _x(2, 6, seed=2)
    out, att = m(x, prev)
    gap = x.mean(dim=(2, 3))
    p = F.relu(F.layer_norm(F.linear(prev, m.att_fc[0].weight, m.att_fc[0].bias), (12,),
                            m.att_fc[1].weight, m.att_fc[1].bias))
    conv = m.conv[0]
    mixed = conv.weight[0, 0, 0, 0] * gap + conv.weight[0, 1, 0, 0] * p + conv.bias[0]
    mixed = F.relu(F.layer_norm(mixed, (12,), m.conv[1].weight, m.conv[1].bias))
    a = m.fc(mixed)
    _close(out, x * a[:, :, None, None])
    _close(att, gap * a)
    # Without a projection, prev is used as is.
    same = randomise(ref.DCASqueezeExcite(in_channels=12, channels=12, reduction=4).double()).eval()
    assert not hasattr(same, "att_fc")
    prev12 = _x(2, 12, seed=3)
    mixed = same.conv[0].weight[0, 0, 0, 0] * gap + same.conv[0].weight[0, 1, 0, 0] * prev12 + same.conv[0].bias[0]
    a = same.fc(F.relu(F.layer_norm(mixed, (12,), same.conv[1].weight, same.conv[1].bias)))
    _close(same(x, prev12)[0], x * a[:, :, None, None])


# --- Weight excitation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=6, out_channels=10, kernel_size=3, padding=1, reduction=2),
    dict(in_channels=6, out_channels=8, kernel_size=(3, 2), stride=2, padding=2, dilation=2, groups=2, bias=False,
         padding_mode="reflect"),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", groups=4, lwe=False),
    dict(in_channels=5, out_channels=3, kernel_size=1, mwe=False),
], ids=["plain", "groups_reflect", "depthwise_same_mwe_only", "lwe_only"])
def test_weight_excitation_fold_is_equivalent(kwargs):
    m = randomise(ref.WeightExcitedConv2d(**kwargs).double()).eval()
    x = _x(2, kwargs["in_channels"], 7, 6)
    folded = m.fold()
    assert type(folded) is torch.nn.Conv2d
    assert folded.weight.dtype == torch.float64 and folded.weight.requires_grad
    _close(folded(x), m(x))
    assert len(list(folded.parameters())) == (2 if kwargs.get("bias", True) else 1)


def test_weight_excitation_formulas():
    m = randomise(ref.WeightExcitedConv2d(6, 4, 3, reduction=3, eps_a=0.1).double())
    w = m.weight
    v = w.mean(dim=(2, 3))
    fc1, fc2 = m.lwe_fc[0], m.lwe_fc[2]
    w1 = w * torch.sigmoid(fc2(F.relu(fc1(v))))[:, :, None, None]
    m_a = 1.1 * w1.abs().flatten(1).max(dim=1).values[:, None, None, None]
    w2 = m_a * 0.5 * torch.log((1 + w1 / m_a) / (1 - w1 / m_a))
    _close(m.excited_weight(), w2)
    # The paper's MWE gradient holds M_A constant: dL/dW1 = M_A^2 / (M_A^2 - W1^2) * dL/dW2, every weight included.
    mwe = randomise(ref.WeightExcitedConv2d(6, 4, 3, lwe=False, eps_a=0.15).double())
    g2 = _x(4, 6, 3, 3, seed=5)
    (mwe.excited_weight() * g2).sum().backward()
    m_a = 1.15 * mwe.weight.detach().abs().flatten(1).max(dim=1).values[:, None, None, None]
    _close(mwe.weight.grad, m_a ** 2 / (m_a ** 2 - mwe.weight.detach() ** 2) * g2)
    # paper_grad=False: same forward, exact derivative (M_A differentiated too), so it differs at each filter's max.
    exact = ref.WeightExcitedConv2d(6, 4, 3, lwe=False, eps_a=0.15, paper_grad=False).double()
    exact.load_state_dict(mwe.state_dict())
    _close(exact.excited_weight(), mwe.excited_weight())
    (exact.excited_weight() * g2).sum().backward()
    at_max = mwe.weight.detach().abs() == mwe.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
    _close(exact.weight.grad[~at_max], mwe.weight.grad[~at_max])
    assert not torch.allclose(exact.weight.grad[at_max], mwe.weight.grad[at_max])
    # Both mechanisms off: a plain convolution.
    plain = ref.WeightExcitedConv2d(6, 4, 3, lwe=False, mwe=False).double()
    x = _x(2, 6, 5, 5)
    _close(plain(x), F.conv2d(x, plain.weight, plain.bias))


# --- MS-CAM, AFF, iAFF -------------------------------------------------------------------------------------------


def test_aff_output_from_mscam_parts():
    aff = randomise(ref.AFF(channels=12, reduction=3).double()).eval()
    mscam = ref.MSCAM(channels=12, reduction=3).double().eval()
    mscam.load_state_dict(aff.state_dict())  # same layout: local_att, global_att
    x, r = _x(2, 12, 5, 7), _x(2, 12, 5, 7, seed=2)
    xa = x + r
    w = torch.sigmoid(mscam.local_att(xa) + mscam.global_att(xa))
    _close(mscam(xa), xa * w)
    _close(aff(x, r), 2 * x * w + 2 * r * (1 - w))


def test_iaff_official_bug_false_uses_global_att2():
    bug = randomise(ref.IAFF(channels=12, reduction=4, official_bug=True).double())
    fixed = ref.IAFF(channels=12, reduction=4, official_bug=False).double()
    fixed.load_state_dict(bug.state_dict())
    x, r = _x(2, 12, 5, 7), _x(2, 12, 5, 7, seed=2)

    bug.eval()
    fixed.eval()
    xa = x + r
    w1 = torch.sigmoid(bug.local_att(xa) + bug.global_att(xa))
    xi = x * w1 + r * (1 - w1)
    w2_bug = torch.sigmoid(bug.local_att2(xi) + bug.global_att(xi))
    w2_fixed = torch.sigmoid(bug.local_att2(xi) + bug.global_att2(xi))
    _close(bug(x, r), x * w2_bug + r * (1 - w2_bug))
    _close(fixed(x, r), x * w2_fixed + r * (1 - w2_fixed))
    assert not torch.allclose(bug(x, r), fixed(x, r))

    # Train mode: which branches get gradients, and how often each BN updates.
    for m, uses_g2 in ((bug, False), (fixed, True)):
        m.train()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        m(x, r).sum().backward()
        after = m.state_dict()
        g2_grads = [p.grad for p in m.global_att2.parameters()]
        assert all((g is not None) == uses_g2 for g in g2_grads)
        steps_g1 = int(after["global_att.2.num_batches_tracked"] - before["global_att.2.num_batches_tracked"])
        steps_g2 = int(after["global_att2.2.num_batches_tracked"] - before["global_att2.2.num_batches_tracked"])
        assert (steps_g1, steps_g2) == ((1, 1) if uses_g2 else (2, 0))


def test_global_bn_needs_batch_two_in_training_only():
    m = ref.MSCAM(channels=8, reduction=2)
    with pytest.raises(ValueError, match=r"MSCAM: argument 'x' must have batch size > 1 in training mode"):
        m(torch.randn(1, 8, 3, 3))
    m.eval()(torch.randn(1, 8, 3, 3))


# --- AW-convolution ----------------------------------------------------------------------------------------------


def test_awconv_zero_attention_is_plain_conv():
    m = randomise(ref.AWConv2d(6, 8, 3, stride=2, padding=1, groups=2, num_maps=4).double())
    with torch.no_grad():
        m.att[2].weight.zero_()
        m.att[2].bias.zero_()
    x = _x(3, 6, 7, 5)
    _close(m(x), F.conv2d(x, m.weight, m.bias, stride=2, padding=1, groups=2))


@pytest.mark.parametrize("num_maps", [1, 2, 8])
def test_awconv_per_sample_kernels(num_maps):
    """Each sample is convolved with its own kernel W * (1 + A_b); A_b's filter o uses map o // (O / num_maps)."""
    m = randomise(ref.AWConv2d(4, 8, (3, 2), padding=1, groups=2, num_maps=num_maps).double())
    x = _x(3, 4, 6, 5)
    out = m(x)
    a = m.att(F.adaptive_avg_pool2d(x, (3, 2))).view(3, num_maps, 4, 3, 2)
    for b in range(3):
        per_filter = []
        for o in range(8):
            group = o // 4
            per_filter.append(a[b, o // (8 // num_maps), 2 * group: 2 * group + 2])
        wb = m.weight * (1 + torch.stack(per_filter))
        _close(out[b: b + 1], F.conv2d(x[b: b + 1], wb, m.bias, padding=1, groups=2))


def test_awconv_defaults_one_map_per_filter_and_plain_product():
    """Default num_maps = out_channels (A has the weight's full shape); residual=False convolves with K * A_b."""
    m = randomise(ref.AWConv2d(4, 6, 3, padding=1, groups=2, reduction=2, residual=False).double())
    assert m.num_maps == 6 and m.att[2].out_channels == 6 * 4
    x = _x(2, 4, 5, 6)
    out = m(x)
    a = m.att(F.adaptive_avg_pool2d(x, 3)).view(2, 6, 4, 3, 3)
    for b in range(2):
        a_b = torch.stack([a[b, o, 2 * (o // 3): 2 * (o // 3) + 2] for o in range(6)])  # filter o, its group's inputs
        _close(out[b: b + 1], F.conv2d(x[b: b + 1], m.weight * a_b, m.bias, padding=1, groups=2))


# --- BA^2M -------------------------------------------------------------------------------------------------------


def test_ba2m_cross_entropy_equals_cross_entropy_with_unit_weights():
    logits, target = _x(5, 7), torch.tensor([0, 3, 6, 2, 2])
    ones = torch.ones(5, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        _close(ref.ba2m_cross_entropy(logits, target, ones, reduction=reduction),
               F.cross_entropy(logits, target, reduction=reduction))


def test_ba2m_cross_entropy_formula():
    logits, target, w = _x(4, 6), torch.tensor([5, 0, 1, 1]), _x(4, seed=3).abs() + 0.5
    want = -(torch.log_softmax(w[:, None] * logits, dim=1)[torch.arange(4), target]).mean()
    _close(ref.ba2m_cross_entropy(logits, target, w), want)


@pytest.mark.parametrize("args,error,match", [
    ((torch.randn(5), torch.zeros(5, dtype=torch.long), torch.ones(5)), ValueError, r"'logits' must be 2-D"),
    ((torch.ones(5, 3, dtype=torch.long), torch.zeros(5, dtype=torch.long), torch.ones(5)), TypeError,
     r"'logits' must be a floating-point tensor.*torch.int64"),
    ((torch.randn(5, 3), torch.zeros(5), torch.ones(5)), TypeError,
     r"'target' must be an int64 tensor of class indices, got torch.float32"),
    ((torch.randn(5, 3), [0, 1, 2, 0, 1], torch.ones(5)), TypeError, r"'target' must be a torch.Tensor, got list"),
    ((torch.randn(5, 3), torch.zeros(4, dtype=torch.long), torch.ones(5)), ValueError,
     r"'target' must have shape \(N,\) = \(5,\), got \(4,\)"),
    ((torch.randn(5, 3), torch.zeros(5, 1, dtype=torch.long), torch.ones(5)), ValueError,
     r"'target' must have shape \(N,\) = \(5,\), got \(5, 1\)"),
    ((torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.ones(5, 1)), ValueError, r"'weights' must be 1-D"),
    ((torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.ones(6)), ValueError,
     r"'weights' must have shape \(N,\) = \(5,\), got \(6,\)"),
    ((torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)), TypeError,
     r"'weights' must be a floating-point tensor"),
], ids=["logits_rank", "logits_int", "target_float", "target_list", "target_len", "target_rank", "weights_rank",
        "weights_len", "weights_int"])
def test_ba2m_cross_entropy_checks(args, error, match):
    with pytest.raises(error, match=r"^ba2m_cross_entropy: argument " + match):
        ref.ba2m_cross_entropy(*args)


def test_ba2m_cross_entropy_bad_reduction():
    with pytest.raises(ValueError, match=r"ba2m_cross_entropy: argument 'reduction' must be .*got 'avg'"):
        ref.ba2m_cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2), reduction="avg")


def _ba2m_weights(m, x):
    """The BA^2M formulas written out: A_C, A_LS, A_GS, A_i = mean(max(...)), softmax over the batch."""
    b, _, h, w = x.shape
    fc0, fc1, bn_c = m.channel_att[1], m.channel_att[2], m.channel_att[3]
    a_c = bn_c(fc1(fc0(x.mean(dim=(2, 3), keepdim=True))))
    g0, g1, g2, bn_l = m.local_att
    a_ls = bn_l(g2(g1(g0(x))))
    f, g, hh = m.query(x).flatten(2).transpose(1, 2), m.key(x).flatten(2).transpose(1, 2), m.value(x).flatten(2)
    a_gs = (torch.softmax(f @ g.transpose(1, 2), dim=2) @ hh.transpose(1, 2)).view(b, 1, h, w)
    sar = torch.stack([torch.maximum(torch.maximum(a_c[i], a_ls[i]), a_gs[i]).mean() for i in range(b)])
    return torch.exp(sar) / torch.exp(sar).sum()


@pytest.mark.parametrize("train", [True, False])
def test_batch_aware_attention_weights(train):
    m = randomise(ref.BatchAwareAttention(channels=12, reduction=4, dilation=2).double()).train(train)
    x = _x(4, 12, 5, 6)
    w = m(x)
    assert w.shape == (4,) and (w > 0).all()
    _close(w, _ba2m_weights(m, x))
    _close(w.sum(), torch.tensor(1.0, dtype=torch.float64))  # the paper's softmax over the batch
    # Identical samples have identical SARs: equal weights 1/B.
    _close(m(x[:1].expand(4, -1, -1, -1)), torch.full((4,), 0.25, dtype=torch.float64))
    scaled = ref.BatchAwareAttention(channels=12, reduction=4, dilation=2, scale_by_batch=True).double().train(train)
    scaled.load_state_dict(m.state_dict())
    _close(scaled(x), w * 4)


# --- Interflow ---------------------------------------------------------------------------------------------------


def test_interflow_formula():
    """out = sum_i a_i * p_i + c: one learned weight per stage branch (the 1 x S conv), shared by all classes."""
    m = randomise(ref.Interflow([6, 10, 3], num_classes=4).double())
    feats = [_x(3, 6, 5, 4), _x(3, 10, 2, 3, seed=2), _x(3, 3, 1, 1, seed=3)]
    preds = [head(f.mean(dim=(2, 3))) for head, f in zip(m.heads, feats)]
    a, c = m.attention.weight.view(3), m.attention.bias
    assert m.attention.weight.shape == (1, 1, 1, 3)
    _close(m(feats), a[0] * preds[0] + a[1] * preds[1] + a[2] * preds[2] + c)
    _close(m(tuple(feats)), m(feats))


# --- CSRA --------------------------------------------------------------------------------------------------------


def _csra_score(m, x):
    w = m.head.weight  # (K, C, 1, 1)
    return torch.einsum("bchw,kc->bkhw", x, w[:, :, 0, 0] / w[:, :, 0, 0].norm(dim=1, keepdim=True)).flatten(2)


def test_csra_t99_is_base_plus_lam_max():
    m = randomise(ref.CSRA(input_dim=12, num_classes=5, T=99, lam=0.3).double())
    x = _x(2, 12, 4, 5)
    s = _csra_score(m, x)
    _close(m(x), s.mean(dim=2) + 0.3 * s.amax(dim=2))


def test_csra_finite_temperature():
    m = randomise(ref.CSRA(input_dim=12, num_classes=5, T=3, lam=0.2).double())
    x = _x(2, 12, 4, 5)
    s = _csra_score(m, x)
    _close(m(x), s.mean(dim=2) + 0.2 * (s * torch.softmax(3 * s, dim=2)).sum(dim=2))


@pytest.mark.parametrize("num_heads,temps", [
    (1, [1]), (2, [1, 99]), (4, [1, 2, 4, 99]), (6, [1, 2, 3, 4, 5, 99]), (8, [1, 2, 3, 4, 5, 6, 7, 99]),
])
def test_multihead_csra_temperatures(num_heads, temps):
    m = randomise(ref.MultiHeadCSRA(num_heads=num_heads, lam=0.1, input_dim=6, num_classes=3).double())
    assert [h.T for h in m.multi_head] == temps
    assert all(h.lam == 0.1 for h in m.multi_head)
    x = _x(2, 6, 3, 4)
    _close(m(x), sum(h(x) for h in m.multi_head))


@pytest.mark.parametrize("num_heads", [0, 3, 5, 7, 9, 16])
def test_multihead_csra_invalid_num_heads(num_heads):
    with pytest.raises(ValueError, match=rf"MultiHeadCSRA: argument 'num_heads' must be one of .*got {num_heads}$"):
        ref.MultiHeadCSRA(num_heads=num_heads, lam=0.1, input_dim=6, num_classes=3)


# --- Attentional activation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_global,use_relu", [(False, True), (True, False)])
def test_attentional_activation_formula(use_global, use_relu):
    m = randomise(ref.AttentionalActivation(12, reduction=3, use_global=use_global, use_relu=use_relu).double())
    m.eval()
    x = _x(2, 12, 4, 5)
    convs = [s for s in m.att if isinstance(s, torch.nn.Conv2d)]
    bns = [s for s in m.att if isinstance(s, torch.nn.BatchNorm2d)]
    assert all(c.bias is None for c in convs)
    p = x.mean(dim=(2, 3), keepdim=True) if use_global else x
    h = bns[0](convs[0](p))
    h = F.relu(h) if use_relu else h
    _close(m(x), x * torch.sigmoid(bns[1](convs[1](h))))
