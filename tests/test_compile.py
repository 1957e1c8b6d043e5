"""torch.compile: attach first, then compile (hooks are traced); attaching to a compiled model is refused.

One compile of a tiny ViT (about 45 s cold on 2 CPU cores), kept in CI on purpose.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers.common import LAYER, make_images, make_pair, make_vit  # noqa: E402

from ser_plugin import SERError, attach_ser  # noqa: E402


def _loss_and_grads(call, vit, ser, pair):
    vit.zero_grad()
    with ser.capture():
        o1, o2 = call(pair.x1), call(pair.x2)
    loss = ser.loss(pair) + (o1 - o2).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in vit.named_parameters()}


def test_attach_then_compile_inductor_loss_equals_eager():
    """Default backend (inductor): the compiled forward records the same maps, so the same loss as eager.

    Run under no_grad: compiling the backward too costs minutes on 2 shared cores; the gradient path is
    checked with the aot_eager backend below (same dynamo trace of the hook, same AOT autograd graph).
    """
    torch._dynamo.reset()
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    pair = make_pair(make_images(4, seed=1), seed=2)
    with torch.no_grad():
        with ser.capture():
            vit(pair.x1), vit(pair.x2)
        eager = ser.loss(pair)
        compiled = torch.compile(vit, dynamic=False)
        with ser.capture():
            compiled(pair.x1), compiled(pair.x2)
        got = ser.loss(pair)
        assert torch.allclose(got, eager, rtol=1e-4, atol=1e-5), (got, eager)
        # outside ser.capture() the compiled model must not record (the armed flag is not baked into the graph)
        compiled(pair.x1)
        assert ser.captures == [], "a compiled forward outside ser.capture() recorded a map"
        with ser.capture():
            compiled(pair.x1), compiled(pair.x2)
        assert len(ser.captures) == 2, "the compiled model, armed again, must record again"
        ser.clear()
    # attaching to the compiled wrapper is refused (a hook added after compiling would be silently ignored)
    ser.remove()
    with pytest.raises(SERError, match="compiled"):
        attach_ser(compiled, LAYER)


def test_attach_then_compile_gradients_equal_eager():
    """Training step through a compiled model (aot_eager backend): same loss and same gradients as eager."""
    torch._dynamo.reset()
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    pair = make_pair(make_images(4, seed=1), seed=2)
    eager_loss, eager_grads = _loss_and_grads(vit, vit, ser, pair)
    compiled = torch.compile(vit, backend="aot_eager", dynamic=False)
    c_loss, c_grads = _loss_and_grads(compiled, vit, ser, pair)
    assert torch.allclose(c_loss, eager_loss, rtol=1e-5, atol=1e-6), (c_loss, eager_loss)
    for n in eager_grads:
        assert torch.allclose(c_grads[n], eager_grads[n], rtol=1e-4, atol=1e-6), n
    assert eager_grads["blocks.0.attn.qkv.weight"].abs().sum() > 0


def test_attach_after_module_compile_is_refused():
    """``model.compile()`` (in place) is detected too; nothing is compiled until a forward, so this is fast."""
    vit = make_vit(0)
    vit.compile()
    with pytest.raises(SERError, match="Attach SER first, then compile"):
        attach_ser(vit, LAYER)
    with pytest.raises(SERError, match="compiled"):
        attach_ser(torch.compile(make_vit(0)), LAYER)
