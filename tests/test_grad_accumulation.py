"""Gradient accumulation: several micro-batches, each with its own capture and loss, then one optimizer step.

The accumulated gradient must equal the sum of the micro-batches' gradients computed one at a time on fresh
gradients: nothing of one micro-batch (captures, checks) leaks into the next.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_helpers.common import LAYER, make_images, make_pair, make_vit  # noqa: E402

from ser_plugin import attach_ser  # noqa: E402


def _micro_loss(ser, vit, pair, scale: float) -> torch.Tensor:
    with ser.capture():
        o1, o2 = vit(pair.x1), vit(pair.x2)
    host = -torch.nn.functional.cosine_similarity(o1, o2).mean()
    return scale * (host + ser.loss(pair))


def test_accumulated_gradients_equal_the_sum_of_micro_batch_gradients():
    vit = make_vit(seed=0)
    ser = attach_ser(vit, LAYER, photometric=None, head=True)
    pairs = [make_pair(make_images(4, seed=10 + i), seed=20 + i) for i in range(3)]
    params = list(vit.parameters()) + list(ser.parameters())

    separate = []
    for pair in pairs:  # one micro-batch at a time, fresh gradients
        for p in params:
            p.grad = None
        _micro_loss(ser, vit, pair, 1 / 3).backward()
        separate.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
    expected = [sum(gs) for gs in zip(*separate)]

    for p in params:
        p.grad = None
    for pair in pairs:  # accumulated: backward after each micro-batch, no zero_grad in between
        _micro_loss(ser, vit, pair, 1 / 3).backward()
    got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    assert any(float(g.abs().sum()) > 0 for g in got[: len(list(vit.parameters()))]), "no gradient reached the ViT"
    assert any(float(g.abs().sum()) > 0 for g in got[len(list(vit.parameters())) :]), "no gradient reached the head"
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert ser.captures == [], "each micro-batch's loss consumes its captures"
    ser.remove()


def test_one_forward_over_all_micro_batches_then_losses_is_refused_or_equal():
    """Capturing two micro-batches' views in one open capture and calling loss once per micro-batch would pair the
    wrong maps; the handle refuses it (more than two captures for one pair) instead of computing a wrong number."""
    from ser_plugin import SERError

    vit = make_vit(seed=0)
    ser = attach_ser(vit, LAYER, photometric=None)
    pairs = [make_pair(make_images(4, seed=10 + i), seed=20 + i) for i in range(2)]
    with ser.capture():
        for pair in pairs:
            vit(pair.x1), vit(pair.x2)
    try:
        ser.loss(pairs[0])
    except SERError as err:
        assert "capture" in str(err)
    else:  # pragma: no cover - the handle must not silently pair four captures with one pair
        raise AssertionError("four captures for one pair were accepted")
    ser.remove()
