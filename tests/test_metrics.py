"""The equivariance score: exact for an equivariant model, lower for a broken one, per layer, restores state."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_timm
from test_loss import PatchMeanViT

from ser_plugin import SERError, attach_ser, equivariance_score


def test_all_layers_and_keys():
    model = tiny_timm(depth=3)
    scores = equivariance_score(model, torch.rand(4, 3, 32, 32))
    assert sorted(scores) == [1, 2, 3]
    for s in scores.values():
        assert set(s) == {"raw", "centred"} and -1 <= s["centred"] <= s["raw"] + 1 and s["raw"] <= 1


def test_exactly_equivariant_model_scores_one_and_pos_embed_breaks_it():
    x = torch.rand(4, 3, 32, 32)
    eq = equivariance_score(PatchMeanViT(pos=False), x, layers=[1, 2])
    neq = equivariance_score(PatchMeanViT(pos=True), x, layers=[1, 2])
    for L in (1, 2):
        assert eq[L]["raw"] == pytest.approx(1.0, abs=1e-5) and eq[L]["centred"] == pytest.approx(1.0, abs=1e-5)
        assert neq[L]["centred"] < 0.95


def test_restores_training_mode_and_hooks_and_works_with_attached_ser():
    model = tiny_timm(depth=2).train()
    ser = attach_ser(model, layer=1, late_cls=True)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    s = equivariance_score(model, torch.rand(2, 3, 32, 32), layers=2)
    assert model.training and 2 in s
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert ser.captures == []


def test_errors():
    with pytest.raises(SERError, match="square"):
        equivariance_score(tiny_timm(), torch.rand(2, 3, 32, 16))
    with pytest.raises(SERError, match="out of range"):
        equivariance_score(tiny_timm(depth=2), torch.rand(2, 3, 32, 32), layers=5)


def test_score_is_the_protocol_summary_keyed_as_given():
    """equivariance_score is measure_equivariance's D4 summary (one measurement, two names): same numbers, and
    the layers keyed as the caller gave them (negative ones counted from the end)."""
    from ser_plugin.protocol import measure_equivariance

    model, x = tiny_timm(depth=3), torch.rand(3, 3, 32, 32)
    s = equivariance_score(model, x, layers=[-1, 1])
    res = measure_equivariance(model, x, scales=(), controls=False, layers=[1, 3])
    assert sorted(s) == [-1, 1] and res.blocks == [1, 3]
    for given, block in ((-1, 3), (1, 1)):
        for key, metric in (("raw", "one_minus_cos"), ("centred", "one_minus_cos_centred")):
            mean_err = sum(res.errors[e][metric][res.blocks.index(block)] for e in res.errors) / len(res.errors)
            assert s[given][key] == pytest.approx(1.0 - mean_err, abs=1e-9)
    assert s[1]["centred"] < 0.999  # an untrained ViT is not equivariant: the check is not vacuous
