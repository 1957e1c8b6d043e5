"""examples/lightly_resnet.py: lightly SimCLR on a torchvision ResNet-18 (CIFAR stem) with SER from one attach line."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

pytest.importorskip("lightly")
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("lightly_resnet", os.path.join(ROOT, "examples", "lightly_resnet.py"))
ex = importlib.util.module_from_spec(_spec)
sys.modules["lightly_resnet"] = ex
_spec.loader.exec_module(ex)


def test_lightly_resnet_example_trains_with_ser(capsys):
    hist = ex.main(["--steps", "2", "--batch", "8"])
    out = capsys.readouterr().out
    assert "family=torchvision ResNet" in out and "layer=3/5 (backbone.layer2 output (stride 2, 128 ch))" in out, out[:800]
    assert len(hist) == 2 and all(math.isfinite(h["inv"]) and h["equiv"] > 0 for h in hist)
