"""Gradient checkpointing: non-reentrant (timm's default since 1.0.13) works; reentrant is refused loudly."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers.common import LAYER, make_images, make_pair, make_vit  # noqa: E402

from ser_plugin import SERError, attach_ser  # noqa: E402


def _grads(vit, ser, pair):
    vit.zero_grad()
    with ser.capture():
        o1, o2 = vit(pair.x1), vit(pair.x2)
    loss = ser.loss(pair) + (o1 - o2).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in vit.named_parameters()}


@pytest.fixture
def reentrant_timm():
    old = use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    yield
    set_reentrant_ckpt(old)


def test_timm_non_reentrant_checkpointing_same_gradients():
    assert use_reentrant_ckpt() is False
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    pair = make_pair(make_images(6, seed=1), seed=2)
    loss, grads = _grads(vit, ser, pair)
    vit.set_grad_checkpointing(True)
    c_loss, c_grads = _grads(vit, ser, pair)
    assert vit.grad_checkpointing
    assert torch.allclose(c_loss, loss, rtol=1e-6, atol=1e-7)
    for n in grads:
        assert torch.allclose(c_grads[n], grads[n], rtol=1e-5, atol=1e-7), n
    # recomputation in backward ran block L again outside ser.capture(): nothing may be left recorded
    assert ser.captures == []


class _SegmentViT(nn.Module):
    """Blocks 1-2 checkpointed as one segment (like checkpoint_seq(every=2)): backward recomputes block 1 fully."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 16, 4, 4)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True) for _ in range(3))
        self.patch_size = 4
        self.num_prefix_tokens = 0

    def _segment(self, x):
        return self.blocks[1](self.blocks[0](x))

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = checkpoint(self._segment, x, use_reentrant=False)
        return self.blocks[2](x).mean(1)


def test_backward_inside_capture_does_not_record_recomputation():
    """A host that calls backward while still inside ``with ser.capture()`` makes the checkpoint re-run block L
    in backward; that re-run is not a view and must not be recorded (it used to give 4 maps for 2 views)."""
    torch.manual_seed(0)
    vit = _SegmentViT()
    ser = attach_ser(vit, 1, photometric=None)
    pair = make_pair(make_images(4, seed=1), seed=2)
    calls = []
    vit.blocks[0].register_forward_hook(lambda m, a, o: calls.append(1))
    with ser.capture():
        o1, o2 = vit(pair.x1), vit(pair.x2)
        (o1 - o2).pow(2).mean().backward(retain_graph=True)
        n_caps = len(ser.captures)
    assert len(calls) == 4, "the test needs block L to be recomputed in backward"
    assert n_caps == 2, f"{n_caps} maps recorded for 2 forward passes (backward recomputation was recorded)"
    ser.loss(pair).backward()
    assert vit.blocks[0].linear1.weight.grad.abs().sum() > 0


def test_timm_reentrant_checkpointing_is_refused(reentrant_timm):
    vit = make_vit(0)
    vit.set_grad_checkpointing(True)
    ser = attach_ser(vit, LAYER, photometric=None)
    pair = make_pair(make_images(4, seed=1), seed=2)
    with pytest.raises(SERError, match="reentrant"):
        with ser.capture():
            vit(pair.x1)


class _TinyCheckpointedViT(nn.Module):
    """A hand-written ViT-like stack that checkpoints each block with torch.utils.checkpoint (reentrant or not)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 16, 4, 4)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True) for _ in range(3))
        self.reentrant = reentrant
        self.patch_size = 4
        self.num_prefix_tokens = 0

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=self.reentrant)
        return x.mean(1)


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_custom_model(reentrant):
    torch.manual_seed(0)
    vit = _TinyCheckpointedViT(reentrant)
    ser = attach_ser(vit, 2, photometric=None)
    pair = make_pair(make_images(4, seed=1), seed=2)
    if reentrant:
        with pytest.raises(SERError, match="use_reentrant=False"):
            with ser.capture():
                vit(pair.x1)
        return
    with ser.capture():
        vit(pair.x1), vit(pair.x2)
    loss = ser.loss(pair)
    loss.backward()
    assert vit.blocks[0].linear1.weight.grad.abs().sum() > 0


def test_no_grad_pass_inside_capture_is_named():
    """The same detection fires for a plain torch.no_grad() pass inside ser.capture() (e.g. a stop-gradient
    target branch run through the student): the message names no_grad too, not only checkpointing."""
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    pair = make_pair(make_images(4, seed=1), seed=2)
    with pytest.raises(SERError, match=r"torch\.no_grad\(\)"):
        with ser.capture():
            vit(pair.x1)
            with torch.no_grad():
                vit(pair.x2)
    ser.clear()
    with torch.no_grad(), ser.capture():  # armed without grad (e.g. evaluation): recording is allowed
        vit(pair.x1), vit(pair.x2)
    assert len(ser.captures) == 2
    ser.clear()
