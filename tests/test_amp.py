"""Mixed precision: SER's similarities are fp32 whatever the encoder's precision.

Tolerance (stated in docs/scale.md, "Mixed precision"): under CPU bf16 autocast the loss is within 2% (relative)
of fp32 on the same weights and views, and the encoder gradients point the same way (cosine > 0.99).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers.common import LAYER, make_images, make_pair, make_vit  # noqa: E402

from ser_plugin import GroupElement, SERError, TokenInfoNCE, attach_ser  # noqa: E402

BF16_RTOL = 2e-2
BF16_GRAD_COS = 0.99


def _step(vit, ser, pair, dtype=None):
    vit.zero_grad()
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        with ser.capture():
            vit(pair.x1), vit(pair.x2)
        loss = ser.loss(pair)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in vit.parameters() if p.grad is not None])
    return loss, grad


def test_bf16_autocast_matches_fp32():
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    pair = make_pair(make_images(8, seed=1), seed=2)
    l32, g32 = _step(vit, ser, pair)
    l16, g16 = _step(vit, ser, pair, torch.bfloat16)
    assert l16.item() != l32.item(), "the test must really run the encoder's matmuls in bf16"
    assert l16.dtype == torch.float32, "L_equiv is computed in fp32 under autocast"
    assert torch.isfinite(l16) and torch.isfinite(g16).all()
    assert abs(l16.item() - l32.item()) <= BF16_RTOL * abs(l32.item()), (l16.item(), l32.item())
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0).item()
    assert cos > BF16_GRAD_COS, cos


@pytest.mark.parametrize("magnitude", [1.0, 300.0, 6e4])
def test_fp16_token_maps_do_not_overflow(magnitude):
    """fp16 maps whose squared norms overflow fp16 (|x| up to 6e4, fp16 max 65504): the loss is finite and
    equals the fp32 loss of the same values; gradients come back finite, in fp16."""
    g = torch.Generator().manual_seed(0)
    f1 = (torch.randn(4, 64, 3, 3, generator=g) * magnitude).clamp(-6e4, 6e4)
    f2 = (torch.randn(4, 64, 3, 3, generator=g) * magnitude).clamp(-6e4, 6e4)
    h1, h2 = f1.half().requires_grad_(), f2.half().requires_grad_()
    assert torch.isfinite(h1).all()
    rel = GroupElement.from_d4([0, 1, 2, 3], [0, 1, 0, 1])
    crit = TokenInfoNCE(tau=0.05)  # small tau: logits up to 20, exp would overflow fp16 (max 65504)
    loss16 = crit(h1, h2, rel)
    loss32 = crit(h1.detach().float(), h2.detach().float(), rel)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert torch.allclose(loss16, loss32, rtol=1e-5), (loss16, loss32)
    loss16.backward()
    assert h1.grad.dtype == torch.float16 and torch.isfinite(h1.grad).all() and torch.isfinite(h2.grad).all()


def test_fp16_encoder_through_the_handle():
    """A half-precision encoder (model.half()) on CPU: captured fp16 maps give a finite fp32 loss close to fp32."""
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    pair = make_pair(make_images(6, seed=3), seed=4)
    with ser.capture():
        vit(pair.x1), vit(pair.x2)
    l32 = ser.loss(pair).item()
    vit.half()
    with ser.capture():
        vit(pair.x1.half()), vit(pair.x2.half())
    assert ser.captures[0].dtype == torch.float16
    l16 = ser.loss(pair)
    assert l16.dtype == torch.float32 and torch.isfinite(l16)
    assert abs(l16.item() - l32) < 1e-2 * abs(l32), (l16.item(), l32)


def test_overflowing_encoder_is_reported():
    """An encoder that overflowed to inf in fp16 is reported as SERError naming the bad view, not a silent NaN."""
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    pair = make_pair(make_images(4, seed=5), seed=6)
    with ser.capture():
        vit(pair.x1), vit(pair.x2)
    ser._captures[1] = ser._captures[1].half() * torch.tensor(float("inf"), dtype=torch.float16)
    with pytest.raises(SERError, match="non-finite"):
        ser.loss(pair)


def test_fp16_autocast_with_gradscaler_cpu():
    """fp16 autocast + GradScaler (the CUDA recipe, here on CPU): 3 steps, no step skipped for inf/NaN
    gradients (the scale never drops), finite losses, first loss within 2% of fp32."""
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    pair0 = make_pair(make_images(4, seed=0), seed=1)
    with ser.capture():
        o1, o2 = vit(pair0.x1), vit(pair0.x2)
    ref = ((o1 - o2).pow(2).mean() + ser.loss(pair0)).item()
    opt = torch.optim.SGD(vit.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    losses, scales = [], []
    for step in range(3):
        pair = pair0 if step == 0 else make_pair(make_images(4, seed=step), seed=step + 1)
        with torch.autocast("cpu", dtype=torch.float16):
            with ser.capture():
                o1, o2 = vit(pair.x1), vit(pair.x2)
            loss = (o1 - o2).float().pow(2).mean() + ser.loss(pair)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    assert all(map(torch.isfinite, torch.tensor(losses))), losses
    assert scales == sorted(scales) and scales[0] == 65536.0, f"GradScaler skipped steps (scale dropped): {scales}"
    assert abs(losses[0] - ref) <= BF16_RTOL * abs(ref), (losses[0], ref)
