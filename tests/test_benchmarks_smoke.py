"""Smoke test: every benchmark script runs at tiny sizes and writes the fields the README quotes."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


def _run(module: str, argv, out: Path, monkeypatch) -> dict:
    mod = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [str(BENCH / f"{module}.py"), *argv, "--out", str(out)])
    mod.main()
    name = module.replace("bench_", "")
    data = json.loads((out / f"perf_{name}.json").read_text())
    assert (out / f"perf_{name}.md").read_text().startswith("Command: `PYTHONPATH=$PWD python benchmarks/")
    assert data["command"].startswith("PYTHONPATH=$PWD python benchmarks/") and data["machine"]["cores_visible"] >= 1
    return data


def test_live_tensor_bytes_counts_new_storages_once_and_not_views():
    from common import LiveTensorBytes

    before = torch.zeros(1000)
    with LiveTensorBytes() as m:
        a = torch.ones(1000)  # 4000 bytes
        v = before[10:]  # a view of an existing tensor: nothing new
        w = a.view(10, 100)  # a view of a new tensor: counted once
        del a
        b = torch.ones(250)  # +1000 while w still holds a's storage
        peak_with_both = m.peak
        del w, b
    assert peak_with_both == 5000, peak_with_both
    assert m.current == 0 and v.numel() == 990


def test_flops_quick(tmp_path, monkeypatch):
    data = _run("bench_flops", ["--quick", "--batch", "16"], tmp_path, monkeypatch)
    c = data["cross_check"]
    assert c["cpu_forward"] == c["meta_forward"] == c["analytic_forward"]
    assert c["meta_train"] == c["analytic_train"]
    for k in ("fused", "gathered", "budget"):  # the custom autograd function's matmuls are all counted
        assert c[f"loss_{k}_cpu"] == c[f"loss_{k}_analytic"] > 0
    rows = data["rows"]
    assert rows and all(r["ratio"] >= 1.0 and r["flops_with"] >= r["flops_without"] for r in rows)
    assert any(r["max_negatives"] for r in rows) and any(r["keys_from_gpus"] == 1 for r in rows)


def test_loss_quick(tmp_path, monkeypatch):
    data = _run("bench_loss", ["--tokens", "200", "400", "--repeats", "1", "--no-rss"], tmp_path, monkeypatch)
    first = data["rows"][0]
    assert first["check_loss_abs_diff"] < 1e-4 and first["check_grad_max_abs_diff"] < 1e-5
    for r in data["rows"]:
        assert r["ours_s"] > 0 and r["naive_s"] > 0 and r["ours_peak_MiB"] > 0 and r["naive_peak_MiB"] > 0


def test_step_quick(tmp_path, monkeypatch):
    data = _run("bench_step", ["--batch", "4", "--repeats", "1", "--shares", "0.5", "--no-rss"], tmp_path, monkeypatch)
    base, ser = data["rows"]
    assert base["config"] == "without" and ser["b2_images"] == 2
    for k in ("time_ratio", "time_ratio_paired", "cpu_time_ratio", "step_peak_ratio", "total_peak_ratio"):
        assert ser[k] > 0
    assert ser["step_peak_MiB"] > 0 and base["static_MiB"] > 0


def test_capture_quick(tmp_path, monkeypatch):
    r = _run("bench_capture", ["--batch", "4"], tmp_path, monkeypatch)["results"]
    assert r["capture_extra_maps"] == 0.0 and r["capture_is_view_of_block_output"]
    assert 0.99 <= r["rho_extra_maps"] <= 1.1  # its output, plus an int64 index per token


@pytest.mark.parametrize("module", ["bench_budget"])
def test_budget_quick(tmp_path, monkeypatch, module):
    rows = _run(module, ["--steps", "2", "--eval-images", "8"], tmp_path, monkeypatch)["rows"]
    assert [r["arm"].split(",")[0] for r in rows] == ["no SER (lam=0", "SER", "SER"]
    assert all(-1.0 <= r["centred"] <= 1.0 for r in rows)


def test_run_all_plans_name_existing_scripts():
    from run_all import PLANS

    for name, plan in PLANS.items():
        assert (BENCH / f"bench_{name}.py").exists() and set(plan) == {"default", "full", "quick"}


def test_gpu_step_smoke_mode_runs_on_cpu(tmp_path):
    """bench_gpu_step.py --smoke: the GPU benchmark's code path (bf16 autocast, alternating rounds, memory, sync
    counts, result file with machine and commit) on a tiny ViT on the CPU."""
    import bench_gpu_step

    data = bench_gpu_step.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "perf_gpu_step_smoke.json").read_text())
    assert saved["command"].startswith("PYTHONPATH=$PWD python") and "git_commit" in saved["machine"]
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"without", "b2=1%", "b2=10%"} and data["rounds"] == 2
    for k in ("b2=1%", "b2=10%"):
        r = rows[k]
        assert r["time_ratio"] > 0 and r["step_peak_ratio"] > 1.0 and r["total_peak_ratio"] > 1.0
        assert r["cuda_sync_warnings"] is None and r["counter_syncs"] >= rows["without"]["counter_syncs"]
    assert all(len(t) == 2 for t in data["times_s"].values())


def test_sync_bench_counts_every_phase(tmp_path, monkeypatch):
    data = _run("bench_sync", ["--batch", "6", "--b2", "2", "--img", "16"], tmp_path, monkeypatch)
    for cfg in ("check_finite=False", "check_finite=True"):
        phases = data["single_process"][cfg]
        assert set(phases) == {"views", "capture", "loss", "backward"}
        assert all(p["collectives"] == 0 for p in phases.values())  # no process group
    # the check adds at most one host read to the loss phase
    on, off = data["single_process"]["check_finite=True"]["loss"], data["single_process"]["check_finite=False"]["loss"]
    assert on["syncs"] - off["syncs"] <= 1
