"""Smoke test of `make demo`: the same code path as the full demo (data, both arms, every metric, JSON/markdown/PNG),
for 3 steps per arm on a data subset. Numbers are meaningless here; the test checks the fields and that they are
finite and in range. Plus fast unit checks of the demo's helpers (ImageFolder loading, canvas boxes, tables)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "demo"))

pytest.importorskip("timm", reason="the demo needs timm (pip install -e '.[demo]')")
pytest.importorskip("lightly", reason="the demo needs lightly (pip install -e '.[demo]')")
pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install -e '.[demo]')")

METRICS = ("linear_top1", "knn_top1", "eq_centred_L", "eq_raw_L", "eq_centred_last", "eq_raw_last", "mCA", "mFR")


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_demo_smoke_end_to_end(tmp_path, capsys):
    import main as demo_main  # examples/demo/main.py

    torch.set_num_threads(1)
    payload = demo_main.main(["--smoke", "--out", str(tmp_path), "--threads", "1"])
    printed = capsys.readouterr().out
    assert "linear top-1" in printed and "equiv. centred @L" in printed and "SER (stock ViT)" in printed

    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["command"].startswith("python examples/demo/main.py") and saved["smoke"] is True
    assert set(saved["arms"]) == {"baseline", "ser"} == set(payload["arms"])
    for arm, rec in saved["arms"].items():
        m = rec["metrics"]
        for k in METRICS:
            assert _finite(m[k]), (arm, k, m[k])
        for k in ("linear_top1", "knn_top1", "mCA"):
            assert 0.0 <= m[k] <= 1.0, (arm, k, m[k])
        for k in ("eq_centred_L", "eq_raw_L", "eq_centred_last", "eq_raw_last"):
            assert -1.0 <= m[k] <= 1.0, (arm, k, m[k])
        assert set(m["equivariance"]) == {"2", "4"}  # layer L=2 and the last layer of the depth-4 ViT
        rob = m["robustness"]
        assert set(rob["corrupted_acc"]) == {"noise", "blur", "contrast", "rotate"}
        assert all(len(v) == 3 and all(0.0 <= a <= 1.0 for a in v) for v in rob["corrupted_acc"].values())
        assert all(0.0 <= f <= 1.0 for f in rob["flip_rate"].values())
        sp = m["spatial"]
        assert 0.0 <= sp["mIoU"] <= 1.0 and _finite(sp["centre_err_px"]) and sp["centre_err_px"] >= 0
        assert m["steps"] == 3 and _finite(m["final_inv_loss"])
        assert rec["config"]["arm"] == arm and rec["config"]["objective"] == "mocov3"
    # the SER arm trained with the equivariance loss, the baseline did not
    assert _finite(saved["arms"]["ser"]["metrics"]["final_equiv_loss"])
    assert math.isnan(saved["arms"]["baseline"]["metrics"]["final_equiv_loss"])
    md = (tmp_path / "demo_results.md").read_text()
    assert "| baseline (stock ViT, host views only) | 1 |" in md
    png = (tmp_path / "demo_results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_image_folder_loader(tmp_path):
    from PIL import Image
    from ser_demo.data import load_image_folder

    for c, colour in (("cats", 40), ("dogs", 200)):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.new("RGB", (40 + i, 30), (colour, colour, colour)).save(tmp_path / c / f"{i}.png")
    s = load_image_folder(str(tmp_path), size=16, test_share=0.5)
    assert s.classes == 2 and s.x_train.shape == (6, 3, 16, 16) and s.x_test.shape == (6, 3, 16, 16)
    assert sorted(s.y_train.tolist()) == [0, 0, 0, 1, 1, 1]
    assert abs(float(s.x_train[s.y_train == 0].mean()) - 40 / 255) < 1e-3
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_image_folder(str(tmp_path / "missing"))


def test_canvas_boxes_enclose_the_strokes():
    from ser_demo.data import place_on_canvas

    x = torch.zeros(2, 1, 8, 8)
    x[0, :, 2:5, 3:7] = 1.0
    x[1, :, 0:8, 1:2] = 1.0
    canv, boxes = place_on_canvas(x, 16, torch.Generator().manual_seed(0))
    for i in range(2):
        x0, y0, x1, y1 = boxes[i].long().tolist()
        inside = canv[i, 0, y0:y1, x0:x1]
        assert inside.sum() == canv[i].sum() > 0  # all ink lies in the box
        assert inside[0].sum() > 0 and inside[-1].sum() > 0 and inside[:, 0].sum() > 0 and inside[:, -1].sum() > 0  # and the box is tight


def test_margin_and_table():
    from ser_demo.report import margin_in_std, markdown_table

    m = margin_in_std([0.9, 0.92, 0.94], [0.80, 0.81, 0.82])
    assert m["diff"] == pytest.approx(0.11) and m["in_max_std"] == pytest.approx(0.11 / 0.02)
    t = markdown_table({"ser": [{"linear_top1": 0.5, "eq_centred_L": 0.8}, {"linear_top1": 0.7, "eq_centred_L": 0.9}]})
    assert "| SER (stock ViT) | 2 | 60.0 ± 14.1 | 0.850 ± 0.071 |" in t
