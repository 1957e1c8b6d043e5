"""Stateless recipes: timm ``forward_intermediates`` feeding ``SERLoss`` equals the hook path; ``SERLoss`` used
lightly-style inside a lightly-style loop; the comparison with lightly's dense loss (docs/integrations/stateless.md) runs."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed")

from ser_plugin import GroupElement, SERError, SERLoss, attach_ser  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("ser_stateless", os.path.join(ROOT, "examples", "stateless.py"))
ex = importlib.util.module_from_spec(_spec)
sys.modules["ser_stateless"] = ex
_spec.loader.exec_module(ex)

DEPTH = 4


def _vit(registers: int = 0, dynamic: bool = False, seed: int = 0):  # noqa: ANN202
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=0,
                             reg_tokens=registers, dynamic_img_size=dynamic)


def _grads(loss: torch.Tensor, params: list) -> list:  # noqa: ANN001
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]


@pytest.mark.parametrize("layer,registers,scale,head", [(2, 0, None, False), (3, 4, None, True), (1, 0, (0.7, 1.3), True)])
def test_forward_intermediates_equals_the_hook_path(layer: int, registers: int, scale, head: bool) -> None:  # noqa: ANN001
    vit = _vit(registers, dynamic=scale is not None)
    ser = attach_ser(vit, layer, photometric=None, scale=scale, head=head, head_dims=(16, 16))
    x = torch.rand(6, 3, 32, 32)
    pair = ser.views(x, generator=torch.Generator().manual_seed(layer))
    if scale is not None:
        assert pair.x1.shape[-2:] != pair.x2.shape[-2:] or pair.x1.shape[-2:] != (32, 32)  # the scale part is exercised
    params = list(vit.parameters())
    with ser.capture():
        vit(pair.x1), vit(pair.x2)
    hook_f = [c.detach().clone() for c in ser.captures]
    hook_loss = ser.loss(pair)
    hook_grads = _grads(hook_loss, params)
    # the stateless path: forward_intermediates (no hook fires: not armed) + SERLoss with the same config and head
    f1, f2 = ex.layer_maps(vit, pair.x1, layer), ex.layer_maps(vit, pair.x2, layer)
    torch.testing.assert_close(f1.detach(), hook_f[0], rtol=0, atol=0)
    torch.testing.assert_close(f2.detach(), hook_f[1], rtol=0, atol=0)
    crit = SERLoss(ser.config, dim=32)
    if head:
        crit.load_state_dict(ser.objective.state_dict())
    loss = crit(f1, f2, pair)
    torch.testing.assert_close(loss, hook_loss, rtol=1e-6, atol=1e-7)
    assert float(loss.detach()) > 0 and float(crit.last_loss) == pytest.approx(float(ser.last_loss), rel=1e-6)
    grads = _grads(loss, params)
    moved = 0
    for a, b in zip(grads, hook_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        moved += int(bool(a.abs().sum() > 0))
    assert moved > 0
    ser.remove()


def test_layer_maps_is_block_L_not_L_plus_one() -> None:
    """Guard against an off-by-one in timm's 0-based indices: the map after block L differs from the one after L+1."""
    vit = _vit()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ex.layer_maps(vit, x, 2), ex.layer_maps(vit, x, 3)
        t = vit.patch_embed(x)
        t = vit._pos_embed(t)
        t = vit.norm_pre(vit.patch_drop(t))
        for blk in vit.blocks[:2]:
            t = blk(t)
    ref = t[:, vit.num_prefix_tokens :].transpose(1, 2).reshape(2, -1, 4, 4)
    torch.testing.assert_close(a, ref, rtol=0, atol=0)
    assert not torch.allclose(a, b)
    with pytest.raises(SERError, match="valid: 1..4"):
        ex.layer_maps(vit, x, 5)


def test_serloss_lightly_style_in_a_lightly_style_loop() -> None:
    pytest.importorskip("lightly", reason="lightly is not installed (pip install lightly)")
    cfg = ex.DEFAULTS.replace(head=True, head_dims=(16, 16))
    out = ex.train(steps=3, batch=8, config=cfg)
    hist = out["history"]
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor([h["ssl"], h["l_equiv"]])).all() for h in hist)
    assert all(h["l_equiv"] > 0 for h in hist)
    model, crit, views = out["model"], out["ser_criterion"], out["views"]
    assert crit.head is not None and out["model"].backbone.blocks[0]._forward_hooks == {}  # no hooks anywhere
    # the SER term alone: gradient on blocks 1..L only, and on the head
    pair = views(torch.rand(4, 3, 32, 32), generator=torch.Generator().manual_seed(3))
    term = crit(ex.layer_maps(model.backbone, pair.x1, cfg.layer), ex.layer_maps(model.backbone, pair.x2, cfg.layer), pair)
    blocks = list(model.backbone.blocks)
    norms = []
    for b in blocks:
        gs = torch.autograd.grad(term, list(b.parameters()), allow_unused=True, retain_graph=True)
        norms.append(sum(float(g.norm()) for g in gs if g is not None))
    assert all(n > 0 for n in norms[: cfg.layer]) and all(n == 0 for n in norms[cfg.layer :]), norms
    assert all(g is not None and float(g.abs().sum()) > 0 for g in torch.autograd.grad(term, list(crit.parameters())))
    # lambda = 0: an exact zero (with the graph), the loss still measured
    crit0 = SERLoss(cfg.replace(lam=0.0), dim=32 * 2)
    f = torch.randn(4, 64, 4, 4)
    assert float(crit0(f, f.clone(), GroupElement.identity(4))) == 0.0 and float(crit0.last_loss) > 0


def test_readme_comparison_snippet_with_lightlys_dense_loss() -> None:
    """The side-by-side of docs/integrations/stateless.md: both losses on the same layer-L maps (SERLoss on (n, C, h, w) + the pair;
    PatchKernelAlignmentLoss on (B, N, D) token lists of aligned student/teacher maps)."""
    lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is not installed (pip install lightly)")
    if not hasattr(lightly_loss, "PatchKernelAlignmentLoss"):
        pytest.skip(f"this lightly has no PatchKernelAlignmentLoss (added in lightly 1.6): {lightly_loss.__file__}")
    from lightly.loss import PatchKernelAlignmentLoss, roi_resample_to_grid

    vit = _vit()
    views = ex.views_for(ex.DEFAULTS, patch_size=8)
    x = torch.rand(4, 3, 32, 32)
    pair = views(x)
    f1, f2 = ex.layer_maps(vit, pair.x1, 2), ex.layer_maps(vit, pair.x2, 2)     # (n, C, h, w)
    ser_loss = SERLoss(ex.DEFAULTS)(f1, f2, pair)                               # equivariance across a known g
    student, teacher = ex.layer_maps(vit, x, 2), ex.layer_maps(_vit(seed=1), x, 2)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]]).repeat(4, 1)                 # the whole 4x4 grid
    paka = PatchKernelAlignmentLoss()(roi_resample_to_grid(student, boxes, 4, 4), roi_resample_to_grid(teacher, boxes, 4, 4))
    assert torch.isfinite(ser_loss) and float(ser_loss) > 0
    assert torch.isfinite(paka) and 0 <= float(paka) <= 2
    # PaKa is per image (student vs teacher kernels of the same image): one image suffices; SER's InfoNCE takes
    # its negatives from other images, so a single image has none
    one = PatchKernelAlignmentLoss()(student[:1].flatten(2).transpose(1, 2), teacher[:1].flatten(2).transpose(1, 2))
    assert torch.isfinite(one)
