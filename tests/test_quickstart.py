"""The README's training-loop example runs and L_equiv decreases while training on it."""

from __future__ import annotations

import importlib.util
import pathlib


def test_quickstart_runs_and_l_equiv_falls():
    path = pathlib.Path(__file__).parents[1] / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hist = mod.main(["--steps", "20", "--batch", "16", "--ser-b2-share", "0.5", "--patch", "8"])["history"]
    assert len(hist) == 20
    first = sum(h["l_equiv"] for h in hist[:5]) / 5
    last = sum(h["l_equiv"] for h in hist[-5:]) / 5
    assert last < first, f"L_equiv did not fall: {first:.3f} -> {last:.3f}"
