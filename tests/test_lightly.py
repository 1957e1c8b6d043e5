"""The lightly DINO example: SER with lightly's ViT wrapper, loss and deepcopy-built teacher (CPU, tiny)."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

pytest.importorskip("lightly", reason="lightly is not installed (pip install lightly)")
pytest.importorskip("timm", reason="timm is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("lightly_dino", os.path.join(ROOT, "examples", "lightly_dino.py"))
ex = importlib.util.module_from_spec(_spec)
sys.modules["lightly_dino"] = ex  # dataclasses look the module up while the file executes
_spec.loader.exec_module(ex)


def _batch(cfg, seed: int = 0):  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 3, cfg.img + 8, cfg.img + 8, generator=g)
    base = torch.nn.functional.interpolate(x, size=(cfg.img, cfg.img), mode="bilinear", align_corners=False)
    return ex.make_views(x, cfg, g), base


def _block_norms(term, blocks):  # noqa: ANN001
    params = [p for b in blocks for p in b.parameters()]
    grads = torch.autograd.grad(term, params, allow_unused=True, retain_graph=True)
    out, i = [], 0
    for b in blocks:
        k = len(list(b.parameters()))
        out.append(sum(float(g.norm()) ** 2 for g in grads[i : i + k] if g is not None) ** 0.5)
        i += k
    return out


def test_two_steps_then_ser_gradient_reaches_blocks_up_to_L_only() -> None:
    cfg = ex.Config()
    torch.manual_seed(0)
    model, ser, criterion, opt = ex.build(cfg)
    for seed in range(2):
        out = ex.train_step(model, ser, criterion, opt, *_batch(cfg, seed), cfg)
        assert math.isfinite(float(out["loss"])) and math.isfinite(float(ser.last_loss)) and float(ser.last_loss) > 0
        assert out["n_captures"] == 2 + cfg.n_local
    out = ex.train_step(model, ser, criterion, opt, *_batch(cfg, 5), cfg, step=False)
    norms = _block_norms(out["term"], list(model.student_backbone.vit.blocks))
    assert all(n > 0 for n in norms[: cfg.ser.layer]) and all(n == 0 for n in norms[cfg.ser.layer :]), norms
    hooks = [type(h).__name__ for b in model.teacher_backbone.vit.blocks for h in b._forward_hooks.values()]
    assert "_CaptureHook" not in hooks and "_InertHook" not in hooks  # attached after the copy: no hook at all


def test_lambda_zero_gives_lightlys_dino_loss_of_an_unmodified_model() -> None:
    cfg = ex.Config()
    torch.manual_seed(0)
    model, ser, criterion, opt = ex.build(cfg, lam=0.0)
    plain = ex.DINO(cfg)  # an unmodified model (no SER) with the same weights
    plain.load_state_dict(model.state_dict())
    center = criterion.center.clone()
    views, base = _batch(cfg)
    out = ex.train_step(model, ser, criterion, opt, views, base, cfg, step=False)
    assert float(out["term"]) == 0.0 and float(out["loss"]) == float(out["host"])
    criterion.center.copy_(center)
    with torch.no_grad():
        ref = criterion([plain.forward_teacher(v) for v in out["views"][:2]], [plain(v) for v in out["views"]], epoch=0)
    assert float(out["host"]) == pytest.approx(float(ref), abs=1e-6)


def test_hook_attached_before_the_copy_is_inert_in_the_teacher() -> None:
    assert ex.inert_copy_demo(ex.Config()) == {"teacher": 0, "student": 1}


def test_one_step_through_lightlys_dino_transform_with_normalised_views() -> None:
    from ser_plugin.integrations import IMAGENET_MEAN, IMAGENET_STD

    cfg = ex.Config()
    torch.manual_seed(0)
    model, ser, criterion, opt = ex.build(cfg, photometric="mocov3", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    transform = ex.lightly_transform(cfg)
    views, base = ex.collate([transform(im) for im in ex.sample_images(8)])
    assert [tuple(v.shape[-2:]) for v in views] == [(cfg.img, cfg.img)] * 2 + [(cfg.local, cfg.local)] * cfg.n_local
    assert base.min() >= 0 and base.max() <= 1 and base.shape == (8, 3, cfg.img, cfg.img)
    out = ex.train_step(model, ser, criterion, opt, views, base, cfg)
    assert math.isfinite(float(out["loss"])) and float(ser.last_loss) > 0
    # the views were normalised like lightly's crops (ImageNet statistics), not left in [0, 1]
    assert float(out["views"][0][-2:].min()) < 0
