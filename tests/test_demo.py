"""Smoke test of `make demo`: the same code path as the full demo (data, the three arms, every metric, JSON/markdown/PNG),
for 3 steps per arm on a data subset. Numbers are meaningless here; the test checks the fields and that they are
finite and in range. Plus fast unit checks of the demo's helpers (ImageFolder loading, scenes, verdicts, tables)."""

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

METRICS = ("linear_top1", "knn_top1", "eq_centred_L", "eq_raw_L", "eq_centred_last", "eq_raw_last", "mCA", "mFR", "mD4", "rot_equiv_L")
CORRUPTIONS = {"gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "brightness", "contrast", "elastic", "pixelate", "jpeg"}


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_demo_smoke_end_to_end(tmp_path, capsys):
    import main as demo_main  # examples/demo/main.py

    torch.set_num_threads(1)
    payload = demo_main.main(["--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "linear top-1" in printed and "equiv. centred @L" in printed and "SER (stock ViT)" in printed
    # both comparisons, each saying what is resolved and what is within noise
    assert "ser vs baseline: resolved (p < 0.05):" in printed and "ser vs views: resolved (p < 0.05):" in printed

    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["command"].startswith("python examples/demo/main.py") and saved["smoke"] is True
    assert set(saved["arms"]) == {"baseline", "views", "ser"} == set(payload["arms"])
    pairs = {(v["arm"], v["ref"]) for v in saved["verdicts"]}
    assert pairs == {("views", "baseline"), ("ser", "baseline"), ("ser", "views")}
    assert saved["git"]["commit"] is None or len(saved["git"]["commit"]) == 40
    assert {v["metric"] for v in saved["verdicts"]} >= {"linear_top1", "eq_centred_L", "mCA", "mFR", "spatial_mask_IoU", "spatial_roi_top1"}
    for arm, by_seed in saved["arms"].items():
        assert list(by_seed) == ["0"]
        rec = by_seed["0"]
        m = rec["metrics"]
        for k in METRICS:
            assert _finite(m[k]), (arm, k, m[k])
        for k in ("linear_top1", "knn_top1", "mCA", "mD4"):
            assert 0.0 <= m[k] <= 1.0, (arm, k, m[k])
        for k in ("eq_centred_L", "eq_raw_L", "eq_centred_last", "eq_raw_last"):
            assert -1.0 <= m[k] <= 1.0, (arm, k, m[k])
        assert set(m["equivariance"]) == {"1", "2", "3", "4"}  # every layer of the depth-4 ViT (the study compares any L)
        rob = m["robustness"]
        assert set(rob["corrupted_acc"]) == CORRUPTIONS == set(rob["severities"])
        assert all(len(v) == 3 and all(0.0 <= a <= 1.0 for a in v) for v in rob["corrupted_acc"].values())
        assert set(rob["flip_rate"]) == {"rotate", "scale", "translate"} and all(0.0 <= f <= 1.0 for f in rob["flip_rate"].values())
        assert len(rob["d4_acc"]) == 7
        prot = m["protocol"]
        assert prot["blocks"] == [1, 2, 3, 4] and prot["controls"]["identity"]["rel_l2"] == [0.0] * 4
        sp = m["spatial"]
        assert 0.0 <= sp["mask_IoU"] <= 1.0 and 0.0 <= sp["roi_top1"] <= 1.0 and 0.0 < sp["chance_mask_IoU"] < 1.0
        assert sp["clutter"] == 0.2 and sp["scenes_test"] == 48  # digits' calibrated clutter; 96 test digits -> 48 scenes
        assert m["steps"] == 3 and _finite(m["final_inv_loss"])
        assert rec["config"]["arm"] == arm and rec["config"]["objective"] == "mocov3"
    # the SER arm trained with the equivariance loss, the baseline did not
    assert _finite(saved["arms"]["ser"]["0"]["metrics"]["final_equiv_loss"])
    assert math.isnan(saved["arms"]["baseline"]["0"]["metrics"]["final_equiv_loss"])
    assert math.isnan(saved["arms"]["views"]["0"]["metrics"]["final_equiv_loss"])  # views only: λ = 0, no SER loss
    md = (tmp_path / "demo_results.md").read_text()
    assert "| baseline (stock ViT, host views only) | 1 |" in md and "Welch" in md and "control: permutation" in md
    for name in ("demo_results.png", "demo_protocol.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _tiny_split():
    from ser_demo.data import load_digits_split

    s = load_digits_split(24)
    s.x_train, s.y_train, s.x_test, s.y_test = s.x_train[:160], s.y_train[:160], s.x_test[:64], s.y_test[:64]
    return s


def _strip_times(m):
    return {k: v for k, v in m.items() if k not in ("train_s", "eval_s", "cpu_s")}


def test_same_seed_same_numbers_other_seed_other_numbers():
    from ser_demo.run import run_one
    from ser_demo.train import Config

    torch.set_num_threads(1)
    s = _tiny_split()
    kw = dict(n_equiv=32, n_robust=32, n_protocol=8)
    cfg = lambda seed: Config(arm="ser", seed=seed, batch=64, max_steps=3, mean=s.mean, std=s.std)  # noqa: E731
    a = run_one(cfg(0), s, eval_kw=kw)["metrics"]
    b = run_one(cfg(0), s, eval_kw=kw)["metrics"]
    c = run_one(cfg(1), s, eval_kw=kw)["metrics"]
    assert json.dumps(_strip_times(a), sort_keys=True) == json.dumps(_strip_times(b), sort_keys=True)
    assert a["final_inv_loss"] != c["final_inv_loss"] and a["eq_centred_L"] != c["eq_centred_L"]


def _knn_reference(f_train, y_train, f_test, y_test, k=20, t=0.07):
    """The demo's former hand-written weighted kNN (kept here as the reference for lightly's knn_predict)."""
    import torch.nn.functional as F

    a, b = F.normalize(f_train, dim=1), F.normalize(f_test, dim=1)
    w, idx = (b @ a.T).topk(k, dim=1)
    votes = torch.zeros(len(b), int(y_train.max()) + 1)
    votes.scatter_add_(1, y_train[idx], (w / t).exp())
    return float((votes.argmax(1) == y_test).float().mean())


def test_knn_is_lightly_and_matches_the_reference():
    from ser_demo import evaluate

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g)
    y_tr, y_te = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (120,), generator=g)
    f_tr = centres[y_tr] + 1.5 * torch.randn(300, 16, generator=g)
    f_te = centres[y_te] + 1.5 * torch.randn(120, 16, generator=g)
    got = evaluate.knn_accuracy(f_tr, y_tr, f_te, y_te)
    assert got == _knn_reference(f_tr, y_tr, f_te, y_te)
    assert 0.3 < got < 1.0  # neither trivial nor chance (5 classes)
    assert "knn_predict" in evaluate.knn_accuracy.__code__.co_names


def test_lr_schedule_is_lightly_warmup_cosine():
    from ser_demo.train import Config, pretrain

    torch.set_num_threads(1)
    s = _tiny_split()
    tr = pretrain(Config(arm="baseline", batch=32, steps=8, warmup_epochs=1, mean=s.mean, std=s.std), s.x_train)
    lrs = [r["lr"] for r in tr.history]
    warm = min(1 * (160 // 32), 8 // 4)
    assert lrs[0] == pytest.approx(1.5e-3 / warm) and lrs[warm - 1] == pytest.approx(1.5e-3)
    # cosine from the peak: non-increasing, strictly falling after the first cosine step, 0 at the last step
    assert all(x >= y for x, y in zip(lrs[warm - 1 :], lrs[warm:])) and all(x > y for x, y in zip(lrs[warm:-1], lrs[warm + 1 :]))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_welch_verdicts():
    from ser_demo.report import welch

    assert welch([0.90, 0.91, 0.92], [0.80, 0.81, 0.82])["verdict"] == "higher"
    assert welch([0.80, 0.81, 0.82], [0.90, 0.91, 0.92])["verdict"] == "lower"
    noisy = welch([0.80, 0.90, 0.85], [0.82, 0.88, 0.86])
    assert noisy["verdict"] == "within noise" and noisy["p"] > 0.5
    assert welch([0.9], [0.8])["verdict"] == "within noise"  # one seed: no verdict


RESULT_GLOBS = ("examples/demo/results/demo_results.json", "study/results/sensitivity.json", "study/results/calibration.json",
                "examples/demo/ser_demo/severities.json")


def test_committed_results_record_a_commit_of_this_repository():
    """Every committed demo/study result file names the commit whose code produced it (with no uncommitted changes
    to the code that makes the numbers), and that commit exists in this repository's history."""
    import shutil
    import subprocess

    if shutil.which("git") is None or subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout (the check needs the repository history)")
    tracked = subprocess.run(["git", "ls-files", "--", *RESULT_GLOBS], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert tracked, "no committed demo/study result files found"
    for rel in tracked:
        data = json.loads((ROOT / rel).read_text())
        git = data.get("git") or {}
        sha = git.get("commit") if isinstance(git, dict) else None
        if sha is None and "commits" in data:  # summary files: every run's commit
            shas = [c for c in data["commits"]]
        else:
            shas = [sha]
        assert shas and all(isinstance(c, str) and len(c) >= 7 for c in shas), (rel, git)
        for c in shas:
            ok = subprocess.run(["git", "cat-file", "-e", f"{c}^{{commit}}"], cwd=ROOT, capture_output=True).returncode == 0
            assert ok, f"{rel} records commit {c}, which is not in this repository's history"
        if isinstance(git, dict) and "dirty" in git:
            assert git["dirty"] == [], f"{rel} was produced with uncommitted changes: {git['dirty']}"


def test_md_table():
    from ser_demo.report import md_table

    t = md_table([{"a": 1, "b": 0.123456}, {"a": "x"}], ["a", "b"])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.12346 |", "| x |  |"]


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


def test_margin_and_table():
    from ser_demo.report import margin_in_std, markdown_table

    m = margin_in_std([0.9, 0.92, 0.94], [0.80, 0.81, 0.82])
    assert m["diff"] == pytest.approx(0.11) and m["in_max_std"] == pytest.approx(0.11 / 0.02)
    t = markdown_table({"ser": [{"linear_top1": 0.5, "eq_centred_L": 0.8}, {"linear_top1": 0.7, "eq_centred_L": 0.9}]})
    assert "| SER (stock ViT) | 2 | 60.0 ± 14.1 | 0.850 ± 0.071 |" in t


def test_demo_comparisons_and_verdicts():
    """SER is compared with the baseline and with the views-only arm; a verdict is 'better'/'worse' only when Welch's
    p < 0.05, in the metric's own direction (flip probability: lower is better)."""
    import main as demo_main

    assert demo_main.comparisons(["baseline", "views", "ser"]) == [("views", "baseline"), ("ser", "baseline"), ("ser", "views")]
    assert demo_main.comparisons(["baseline", "ser"]) == [("ser", "baseline")]
    runs = {
        "baseline": [{"linear_top1": 0.80, "mFR": 0.10}, {"linear_top1": 0.81, "mFR": 0.11}, {"linear_top1": 0.82, "mFR": 0.12}],
        "views": [{"linear_top1": 0.89, "mFR": 0.10}, {"linear_top1": 0.93, "mFR": 0.13}, {"linear_top1": 0.91, "mFR": 0.09}],
        "ser": [{"linear_top1": 0.90, "mFR": 0.20}, {"linear_top1": 0.91, "mFR": 0.21}, {"linear_top1": 0.92, "mFR": 0.22}],
    }
    ver = {(v["arm"], v["ref"], v["metric"]): v for v in demo_main.verdicts(runs, demo_main.comparisons(list(runs)))}
    assert ver[("ser", "baseline", "linear_top1")]["verdict"] == "better"
    assert ver[("ser", "baseline", "mFR")]["verdict"] == "worse"  # higher flip probability is worse
    assert ver[("ser", "views", "linear_top1")]["verdict"] == "within noise"
    assert ver[("ser", "views", "linear_top1")]["diff"] == pytest.approx(0.0, abs=1e-12)
    table, lines = demo_main.verdict_table(list(ver.values()))
    assert "| linear top-1 | +10.0 (p=" in table and "**better**" in table
    assert lines[1] == "ser vs baseline: resolved (p < 0.05): linear top-1 better, flip probability (mean) worse; within noise: none"
    assert lines[2].startswith("ser vs views: resolved (p < 0.05): flip probability (mean) worse; within noise: linear top-1")


def test_scene_labels_classes_and_clutter():
    from ser_demo.data import compose_scene

    x = torch.zeros(8, 1, 8, 8)
    x[:, :, 2:6, 2:6] = 1.0  # a 4x4 square of ink in the middle of each image
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    scenes, labels, objs = compose_scene(x, y, 20, torch.Generator().manual_seed(0), per_canvas=2, ink=0.2)
    assert scenes.shape == (4, 1, 20, 20) and labels.shape == (4, 20, 20) and objs.shape == (4, 2, 5)
    for i in range(4):
        (x0, y0, x1, y1, c0), (u0, v0, u1, v1, c1) = objs[i].tolist()
        assert c0 != c1  # two different classes per scene
        assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0  # no overlap
        assert set(labels[i].unique().tolist()) == {0, 1 + c0, 1 + c1}
        assert int((labels[i] == 1 + c0).sum()) == 16 and bool((scenes[i, 0] > 0.5).eq(labels[i] > 0).all())
    whole = compose_scene(x, y, 20, torch.Generator().manual_seed(0), per_canvas=2, ink=None)[1]
    assert int((whole[0] > 0).sum()) == 2 * 64  # the whole pasted squares
    cl, cl_labels, _ = compose_scene(x, y, 20, torch.Generator().manual_seed(0), per_canvas=2, ink=0.2, clutter=0.3)
    bg = cl_labels == 0
    assert cl[:, 0][bg].std() > 0.05 and float(cl[:, 0][bg].min()) >= 0.0  # cluttered background, still in [0, 1]
    with pytest.raises(ValueError, match="without overlap"):
        compose_scene(x, y, 10, torch.Generator().manual_seed(0), per_canvas=2)


def test_b2_views_join_the_ssl_loss_unless_told_not_to(monkeypatch):
    """The paper: b2's T_eq views join the host's invariance loss (L_inv2). ``b2_in_ssl=False`` (the study's
    no_Linv2 variant, not the paper) keeps them out: the SSL loss sees b1 only; SER's loss still sees b2."""
    from ser_demo import train

    torch.set_num_threads(1)
    s = _tiny_split()
    seen = []
    orig = train.Objective.loss

    def spy(self, f1, f2, v1, v2, epoch):
        seen.append(f1.shape[0])
        return orig(self, f1, f2, v1, v2, epoch)

    monkeypatch.setattr(train.Objective, "loss", spy)
    cfg = dict(arm="ser", batch=32, b2_share=0.25, max_steps=2, mean=s.mean, std=s.std)
    a = train.pretrain(train.Config(**cfg), s.x_train)
    b = train.pretrain(train.Config(**cfg, b2_in_ssl=False), s.x_train)
    assert seen == [32, 32, 24, 24]
    assert all(math.isfinite(r["equiv"]) for r in a.history + b.history)  # L_equiv on b2 in both


def test_checkpoints_do_not_change_training():
    """Learning-curve evaluations inside pretrain happen at the given steps and leave the run as it would be
    without them (the global RNG is restored after each)."""
    from ser_demo.evaluate import evaluate
    from ser_demo.train import Config, pretrain

    torch.set_num_threads(1)
    s = _tiny_split()
    cfg = Config(arm="ser", batch=32, steps=4, mean=s.mean, std=s.std)
    got = []

    def at(step, model):
        got.append(step)
        torch.rand(5)  # an evaluation that draws from the global RNG
        evaluate(model, s, cfg.resolved(), robust=False, n_equiv=8, n_protocol=0)

    a = pretrain(cfg, s.x_train, checkpoints=(2, 4), on_checkpoint=at)
    b = pretrain(cfg, s.x_train)
    assert got == [2, 4]
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
