"""Smoke test of benchmarks/bench_views.py (counts and timing at a tiny size, nothing written)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_views  # noqa: E402


def test_bench_views_counts_and_timing_smoke(capsys):
    counts = bench_views.count(batch=4, size=16)
    assert counts["default (D4, mocov3)"].total == 0
    assert counts["D4 + scale (0.7, 1.3), mocov3"].by_op == {"Tensor.tolist": 1}
    assert counts["kornia modules, MoCo-v3 view 1"].total > 0  # the counter sees kornia's gating reads
    t = bench_views.timing(batch=4, size=16, repeats=1)
    assert t["ratio_cpu"]["ratio_of_medians"] > 0
    bench_views.main(["--batch", "4", "--size", "16", "--repeats", "1", "--no-save"])
    assert "batched / kornia" in capsys.readouterr().out
