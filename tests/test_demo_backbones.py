"""The demo's --backbone choice (examples/demo/ser_demo/backbones.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("timm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "demo"))

from ser_demo.backbones import DEPTH, LAYER, build_backbone, width_of  # noqa: E402
from ser_demo.train import Config  # noqa: E402

from ser_plugin import attach_ser  # noqa: E402


@pytest.mark.parametrize("family", ["resnet", "convnext", "swin"])
def test_factories_fit_24px_and_the_attach(family):
    cfg = Config(backbone=family, width=width_of(family, 48), depth=DEPTH[family], layer=LAYER[family])
    net = build_backbone(cfg, 3)
    out = net(torch.rand(2, 3, 24, 24))
    assert out.shape == (2, cfg.width)  # the projection heads are built for cfg.width
    ser = attach_ser(net, cfg.layer, photometric=None)
    assert ser.depth == DEPTH[family]
    assert ser.encode(torch.rand(2, 3, 24, 24)).shape[-1] in (6, 12)
    ser.remove()


def test_demo_smoke_with_a_resnet(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples", "demo"))
    import main as demo_main

    res = demo_main.main(["--smoke", "--backbone", "resnet", "--out", str(tmp_path)])
    assert res is not None
    assert (tmp_path / "demo_results.md").exists()
    text = (tmp_path / "demo_results.md").read_text()
    assert "--backbone resnet" in text
    # the report names the family it trained, not the ViT
    assert "SER (stock ResNet)" in text and "baseline (stock ResNet, host views only)" in text
    assert "ViT" not in text.replace("[CLS]", ""), [ln for ln in text.splitlines() if "ViT" in ln]
