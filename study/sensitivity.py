"""Sensitivity study: which SER configuration gives the paper's three benefits, on three small offline datasets.

Datasets (all ship inside a PyPI package, nothing is downloaded): scikit-learn's handwritten ``digits``, scikit-image's
``textures`` (brick, grass, gravel, lunar surface: 4 classes of 32 px tiles) and ``photos`` (12 photographs of
scikit-image and scikit-learn: 12 classes of 32 px tiles, class = source photo). See examples/demo/ser_demo/data.py.

Host: MoCo-v3 (lightly heads/loss), the demo's tiny ViT (width 48, depth 4, patch 4, 24 px), 80 steps of batch 128,
3 seeds per configuration. One-factor variants around the default (SER at L=2 of 4, λ=1, τ=0.4, b2 share 25 %,
no token head): λ ∈ {0.1, 0.3, 3}, L ∈ {1, 4}, b2 share 10 %, token head on; then combinations (``--variants``);
and the Barlow Twins null result re-checked with a λ sweep (1, 5, 25) on digits.

Every run (dataset, variant, seed) is cached as JSON under ``study/runs/`` (not in git) with its config,
metrics, timings and the git commit that produced it; re-running skips finished runs; several processes started with
the same command share the work (each claims a run with a ``.running`` file). ``--report`` rebuilds
``study/results/sensitivity.{md,json}`` and ``sensitivity_<dataset>.png`` from the cache.

    nohup python study/sensitivity.py --plan main & ...   # one process per core
    python study/sensitivity.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "demo"))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ser_demo.data import DATASETS, load_data  # noqa: E402
from ser_demo.report import git_commit, mean_std, welch  # noqa: E402
from ser_demo.run import run_one  # noqa: E402
from ser_demo.train import Config  # noqa: E402

RESULTS = ROOT / "study" / "results"
RUNS = ROOT / "study" / "runs"
STEPS = 80

# variant -> Config overrides (objective MoCo-v3 unless given)
VARIANTS: Dict[str, Dict[str, Any]] = {
    "baseline": dict(arm="baseline"),
    "views": dict(arm="views"),  # b2 gets SER's T_eq views (same share as the default), lambda = 0: the views' own effect
    "default": dict(arm="ser"),
    # the paper's b2 size: b2 = 1 % of a 2,048 batch there; at batch 128, 3 images (2.3 %), the fewest that keep one
    # negative image per positive in the token loss with room for a bad draw
    "b2_paper": dict(arm="ser", b2_share=0.02),
    # NOT the paper: b2's T_eq views feed L_equiv only, not the host's invariance loss (no L_inv2 on D4-moved views)
    "no_Linv2": dict(arm="ser", b2_in_ssl=False),
    "lam0.1": dict(arm="ser", lam=0.1),
    "lam0.3": dict(arm="ser", lam=0.3),
    "lam3": dict(arm="ser", lam=3.0),
    "L1": dict(arm="ser", layer=1),
    "L4": dict(arm="ser", layer=4),
    "b2_10": dict(arm="ser", b2_share=0.10),
    "head": dict(arm="ser_head"),
    "authors": dict(arm="ser", preset="authors"),  # SERConfig.preset("authors") without scale (matched budget)
    # combinations (phase 2)
    "head_lam0.3": dict(arm="ser_head", lam=0.3),
    "head_lam3": dict(arm="ser_head", lam=3.0),
    "L4_lam0.3": dict(arm="ser", layer=4, lam=0.3),
    "b2_10_lam0.3": dict(arm="ser", b2_share=0.10, lam=0.3),
    "b2_10_lam3": dict(arm="ser", b2_share=0.10, lam=3.0),
    "L4_b2_10": dict(arm="ser", layer=4, b2_share=0.10),  # the two that fail on different datasets (photos, textures)
    "L1_lam3": dict(arm="ser", layer=1, lam=3.0),  # a shallow layer (safe on digits) with the strong lambda
    # Barlow Twins lambda sweep
    "barlow_baseline": dict(objective="barlow", arm="baseline"),
    "barlow_lam1": dict(objective="barlow", arm="ser", lam=1.0),
    "barlow_lam5": dict(objective="barlow", arm="ser", lam=5.0),
    "barlow_lam25": dict(objective="barlow", arm="ser", lam=25.0),
    "barlow_views": dict(objective="barlow", arm="views"),
}
ONE_FACTOR = ["default", "lam0.1", "lam0.3", "lam3", "L1", "L4", "b2_10", "head"]
PLANS: Dict[str, List[tuple]] = {
    # (datasets, variants) blocks in priority order (the CPU budget may end the plan early; the report says what ran).
    # digits baseline/default are the demo's own runs (same config), imported from demo_results.json (import_demo).
    # the current study: the parts of SER (views, loss, L_inv2), the paper's b2 size and the two best previous
    # configurations, every run with the spatial probe. Digits' baseline / views / default come from the demo.
    "parts": [(("textures", "photos"), ["baseline", "views", "default", "b2_paper", "no_Linv2", "L4_b2_10", "L1"]),
              (("digits",), ["b2_paper", "no_Linv2", "L4_b2_10", "L1", "baseline", "views", "default"])],
    "main": [(("textures", "photos"), ["baseline", "default"]), (("digits",), ["lam0.3", "head", "lam3"]),
             (("digits",), ["barlow_baseline", "barlow_lam1", "barlow_lam25"]), (("textures", "photos"), ["lam0.3", "head"]),
             (DATASETS, ["lam0.1", "L1", "L4", "b2_10"]), (("textures", "photos"), ["lam3"]), (("digits",), ["barlow_lam5"])],
}
# claims of the paper: (metric key, higher is better, label)
CLAIMS = [("eq_centred_at_L", True, "equivariance up"), ("linear_top1", True, "accuracy up or equal"),
          ("mCA", True, "robustness up: corrupted top-1"), ("mFR", False, "robustness up: flip probability"),
          ("mD4", True, "robustness up: D4-moved top-1"), ("spatial_mask_IoU", True, "spatial: mask IoU"),
          ("spatial_roi_top1", True, "spatial: RoI top-1")]
COLS = [("linear_top1", "linear top-1", 100, 1), ("knn_top1", "kNN top-1", 100, 1), ("eq_centred_at_L", "equiv. centred @L", 1, 3),
        ("rot_equiv_L", "rotation equiv. @L (protocol)", 1, 3), ("cls_inv_d4", "[CLS] 1−cos under D4", 1, 3),
        ("mCA", "corrupted top-1", 100, 1), ("mFR", "flip prob.", 1, 3), ("mD4", "D4-moved top-1", 100, 1),
        ("spatial_mask_IoU", "spatial mask IoU", 1, 3), ("spatial_roi_top1", "spatial RoI top-1", 100, 1)]


def claim_job(claim) -> bool:
    """Atomically claim one job of a list that several worker processes share: True when this process got it."""
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True

def run_name(dataset: str, variant: str, seed: int) -> str:
    return f"{dataset}_{variant}_s{seed}"


def config_for(dataset_split: Any, variant: str, seed: int) -> Config:
    c = dataset_split.x_train.shape[1]
    return config_for_dims(variant, seed, dataset_split.mean[:c], dataset_split.std[:c])


def jobs_for(plan: str, seeds: List[int], datasets: Optional[List[str]], variants: Optional[List[str]]) -> List[tuple]:
    if variants:
        blocks = [(tuple(datasets or DATASETS), variants)]
    else:
        blocks = [(tuple(d for d in ds if not datasets or d in datasets), vs) for ds, vs in PLANS[plan]]
    out = []
    for ds, vs in blocks:
        for seed in seeds:  # seed-major inside a block
            for d in ds:
                for v in vs:
                    out.append((d, v, seed))
    return out


def import_demo(path: Path = ROOT / "examples" / "demo" / "results" / "demo_results.json") -> List[str]:
    """The demo's runs are the study's digits ``baseline`` / ``default`` runs when their configuration is the
    study's (same steps, model, λ, layer, b2 share): they are written to the run cache with the demo's commit and
    ``"source": "demo_results.json"`` instead of being trained twice. Returns the names written."""
    if not path.exists():
        return []
    demo = json.loads(path.read_text())
    if demo.get("smoke") or demo.get("data") != "digits24":
        return []
    written = []
    for arm, variant in (("baseline", "baseline"), ("views", "views"), ("ser", "default")):
        for seed, rec in (demo.get("arms", {}).get(arm) or {}).items():
            cfg = rec["config"]
            want = json.loads(json.dumps(config_for_dims(variant, int(seed), cfg["mean"], cfg["std"]).resolved().to_dict()))
            if any(want[k] != cfg.get(k) for k in want if k not in ("mean", "std")):
                continue
            out = RUNS / (run_name("digits", variant, int(seed)) + ".json")
            if variant == "baseline" and len(rec["metrics"].get("equivariance", {})) < cfg["depth"]:
                continue  # the baseline is compared at every variant's layer: it needs the score at all of them
            if out.exists():
                continue
            out.write_text(json.dumps({**rec, "dataset": "digits24", "variant": variant, "git": demo.get("git"),
                                       "source": "demo_results.json", "command": demo.get("command")}, indent=1) + "\n")
            written.append(out.stem)
    return written


def config_for_dims(variant: str, seed: int, mean: Any, std: Any) -> Config:
    kw = {"objective": "mocov3", **VARIANTS[variant]}
    return Config(seed=seed, steps=STEPS, mean=tuple(mean), std=tuple(std), **kw)


def run_jobs(jobs: List[tuple]) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    prov = git_commit(ROOT)
    splits: Dict[str, Any] = {}
    for d, v, seed in jobs:
        if (RUNS / "STOP").exists():  # touch study/runs/STOP to end the workers after their current run
            break
        path = RUNS / (run_name(d, v, seed) + ".json")
        claim = path.with_suffix(".running")
        if d == "digits" and v in ("baseline", "views", "default"):
            import_demo()  # the demo's runs, when it has finished them with this configuration
        if path.exists():
            continue
        if not claim_job(claim):
            continue
        try:
            if d not in splits:
                splits[d] = load_data(d, Config().img_size)
            split = splits[d]
            cfg = config_for(split, v, seed)
            rec = run_one(cfg, split, robust=True, spatial=True, score_layers=list(range(1, cfg.depth + 1)))
            rec.update(dataset=split.name, variant=v, git=prov, finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
            path.write_text(json.dumps(rec, indent=1) + "\n")
            m = rec["metrics"]
            print(f"{path.stem}: linear {m['linear_top1']:.3f} eqC@L {m['eq_centred_L']:.3f} mCA {m['mCA']:.3f} mFR {m['mFR']:.3f} "
                  f"mD4 {m['mD4']:.3f} train {m['train_s']:.0f}s eval {m['eval_s']:.0f}s", flush=True)
        finally:
            claim.unlink(missing_ok=True)


def load_runs() -> List[Dict[str, Any]]:
    import_demo()
    return [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]


def scalar(rec: Dict[str, Any], key: str, layer: Optional[int] = None) -> float:
    m = rec["metrics"]
    if key == "eq_centred_at_L":  # the centred score at the layer where the variant puts SER (default L for the baseline)
        return float(m["equivariance"][str(layer or rec["config"]["layer"])]["centred"])
    if key.startswith("spatial_"):
        return float((m.get("spatial") or {}).get(key[len("spatial_"):], float("nan")))
    return float(m.get(key, float("nan")))


def claims(rs: List[Dict[str, Any]], ref: List[Dict[str, Any]], layer: int) -> Dict[str, Any]:
    """Each claim of the paper for runs ``rs`` against runs ``ref`` (Welch): Δ, p, and confirmed / refuted / within
    noise; metrics a run did not measure (NaN) are left out, and a claim with no values on a side is not tested."""
    out = {}
    for key, up, label in CLAIMS:
        a = [x for x in (scalar(r, key, layer) for r in rs) if np.isfinite(x)]
        # the reference measured at the same layer (runs that scored that layer)
        b = [x for x in (scalar(r, key, layer) for r in ref if key != "eq_centred_at_L" or str(layer) in r["metrics"]["equivariance"])
             if np.isfinite(x)]
        if not a or not b:
            continue
        t = welch(a, b)
        good = (t["verdict"] == "higher") == up if t["verdict"] != "within noise" else None
        t["claim"] = "within noise" if good is None else ("confirmed" if good else "refuted")
        t["n"] = [len(a), len(b)]
        out[label] = t
    return out


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    by: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in runs:
        by.setdefault((r["dataset"], r["variant"]), []).append(r)
    out: Dict[str, Any] = {}
    for (d, v), rs in sorted(by.items()):
        layer = rs[0]["config"]["layer"]
        base_name = "barlow_baseline" if v.startswith("barlow") else "baseline"
        base = by.get((d, base_name), [])
        row: Dict[str, Any] = {"seeds": sorted(r["config"]["seed"] for r in rs), "layer": layer, "config": {k: rs[0]["config"][k] for k in
                               ("objective", "arm", "lam", "layer", "b2_share", "steps")}, "metrics": {}, "claims": {}}
        for key, _, _, _ in COLS:
            row["metrics"][key] = mean_std([scalar(r, key) for r in rs])
        if base and v != base_name:
            row["claims"] = claims(rs, base, layer)
        views = by.get((d, "views"), [])
        if views and VARIANTS.get(v, {}).get("arm", "").startswith("ser") and VARIANTS[v].get("objective", "mocov3") == "mocov3":
            row["claims_vs_views"] = claims(rs, views, layer)  # the loss's own effect beyond its views
        out.setdefault(d, {})[v] = row
    return out


def summ_claims(row: Dict[str, Any]) -> bool:
    return bool(row.get("claims"))


def fmt(ms: tuple, k: float, d: int, n: int = 2) -> str:
    m, s = ms
    return "–" if not np.isfinite(m) else (f"{m * k:.{d}f}" if n < 2 else f"{m * k:.{d}f} ± {s * k:.{d}f}")


def report(commands: List[str]) -> Dict[str, Any]:
    runs = load_runs()
    if not runs:
        raise SystemExit("no finished runs under " + str(RUNS))
    summ = summarise(runs)
    commits = sorted({(r.get("git") or {}).get("commit") or "?" for r in runs})
    total = sum(r["metrics"]["train_s"] + r["metrics"]["eval_s"] for r in runs)
    md = ["# SER sensitivity study (MoCo-v3 unless named; 3 small offline datasets)", "",
          f"Tiny ViT (width 48, depth 4, patch 4, 24 px), {STEPS} steps of batch 128 per run, mean ± sample std over seeds; "
          "accuracies in %. Verdicts: Welch's t-test (two-sided, unequal variances) of the variant against the baseline of the "
          "same objective, p < 0.05 = confirmed/refuted, otherwise *within noise*. 'equiv. centred @L' is "
          "ser_plugin.equivariance_score (centred cosine, D4) at the variant's SER layer, compared with the baseline's score at "
          "that same layer.", "",
          f"Runs: {len(runs)}; summed train+eval time {total / 60:.1f} min (CPU only, 1 torch thread per process, several processes "
          f"on a 2-core machine shared with other jobs); commits: {', '.join(c[:10] for c in commits)}. Spatial probe: "
          "'not measured' for runs made before it was part of every run.", "", "Commands:", ""]
    md += [f"    {c}" for c in commands] + [""]
    for d, rows in summ.items():
        md += [f"## {d}", "", "| variant | seeds | " + " | ".join(lab for _, lab, _, _ in COLS) + " |", "|---|---|" + "---|" * len(COLS)]
        for v, row in rows.items():
            md.append(f"| {v} | {len(row['seeds'])} | " + " | ".join(fmt(row["metrics"][k], sc, dg, len(row["seeds"])) for k, _, sc, dg in COLS) + " |")
        md += claims_table(rows, "claims", f"Claims per variant vs its baseline ({d}): Δ (p, verdict)")
        md += claims_table(rows, "claims_vs_views", f"SER variants vs the views-only arm ({d}; same b2 views at 25 %, λ = 0): what the "
                           "loss adds beyond its views. Δ (p, verdict)")
        md += per_corruption(d, [r for r in runs if r["dataset"] == d])
        plot(d, rows)
    # the recommendation criterion: equivariance confirmed and no accuracy/robustness claim refuted, per dataset
    variants = sorted({v for rows in summ.values() for v in rows if summ_claims(rows[v])}, key=list(VARIANTS).index)
    ok: Dict[str, Dict[str, str]] = {}
    for v in variants:
        for d, rows in summ.items():
            if v in rows and rows[v]["claims"]:
                c = rows[v]["claims"]
                eq = c["equivariance up"]["claim"]
                bad = [lab for lab, t in c.items() if lab != "equivariance up" and t["claim"] == "refuted"]
                verdict = ("**yes**" if eq == "confirmed" and not bad else "no") + f" (equiv. {eq}" + (f"; refuted: {', '.join(bad)}" if bad else "") + ")"
                verdict += "" if "spatial: mask IoU" in c else " [spatial probe not run]"
                ok.setdefault(v, {})[d] = verdict + ("" if len(rows[v]["seeds"]) >= 3 else f" [{len(rows[v]['seeds'])} seed(s)]")
    md += ["## Which configuration gives the paper's benefits?", "",
           "Criterion: equivariance up *confirmed* (p < 0.05) and no accuracy, robustness or spatial claim *refuted*, per dataset.", "",
           "| variant | " + " | ".join(summ) + " |", "|---|" + "---|" * len(summ)]
    for v in variants:
        md.append(f"| {v} | " + " | ".join(ok[v].get(d, "not run") for d in summ) + " |")
    md.append("")
    summary = {"recommendation_criterion": ok, "datasets": summ, "runs": len(runs), "summed_run_s": total, "commits": commits, "commands": commands}
    (RESULTS / "sensitivity.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    (RESULTS / "sensitivity.md").write_text("\n".join(md) + "\n")
    return summary


def claims_table(rows: Dict[str, Any], field: str, title: str) -> List[str]:
    have = [(v, row) for v, row in rows.items() if row.get(field)]
    if not have:
        return []
    md = ["", title, "", "| variant | seeds | " + " | ".join(lab for _, _, lab in CLAIMS) + " |", "|---|---|" + "---|" * len(CLAIMS)]
    for v, row in have:
        cells = []
        for key, _, lab in CLAIMS:
            t = row[field].get(lab)
            sc = 100 if key in ("linear_top1", "mCA", "mD4", "spatial_roi_top1") else 1
            cells.append("not measured" if t is None else f"{t['diff'] * sc:+.{1 if sc == 100 else 3}f} (p={t['p']:.2g}, **{t['claim']}**)")
        md.append(f"| {v} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return md + [""]


def per_corruption(dataset: str, runs: List[Dict[str, Any]]) -> List[str]:
    """Per-corruption probe top-1 (mean over the 3 severities; mean ± std over seeds), flip probability per sequence
    and the severities used, one row per variant."""
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r["metrics"]["robustness"])
    if not by:
        return []
    first = next(iter(by.values()))[0]
    kinds, seqs = list(first["corrupted_acc"]), list(first["flip_rate"])
    sev = ", ".join(f"{k} {'/'.join(f'{v:g}' for v in first['severities'][k])}" for k in kinds)
    lines = [f"Per corruption ({dataset}): probe top-1 % (mean of 3 severities) and flip probability per sequence; "
             f"severities: {sev}.", "", "| variant | " + " | ".join(kinds + [f"flip {q}" for q in seqs]) + " |",
             "|---|" + "---|" * (len(kinds) + len(seqs))]
    for v, rs in by.items():
        cells = [fmt(mean_std([float(np.mean(r["corrupted_acc"][k])) for r in rs]), 100, 1, len(rs)) for k in kinds]
        cells += [fmt(mean_std([r["flip_rate"][q] for r in rs]), 1, 3, len(rs)) for q in seqs]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(dataset: str, rows: Dict[str, Any]) -> None:
    """Bars with ± std error bars per variant: linear top-1, equivariance at L, corrupted top-1, flip probability."""
    from matplotlib.figure import Figure

    names = sorted(rows, key=lambda n: (("baseline" not in n), list(VARIANTS).index(n) if n in VARIANTS else 99))
    palette = [f"C{i}" for i in range(10) if i != 7]  # C7 is grey, kept for the baselines
    panels = [c for c in COLS if c[0] in ("linear_top1", "eq_centred_at_L", "mCA", "mFR", "spatial_mask_IoU", "spatial_roi_top1")]
    fig = Figure(figsize=(4 * len(panels), 3.8))
    for j, (key, lab, sc, _) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        ms = [rows[n]["metrics"][key] for n in names]
        ax.bar(range(len(names)), [m * sc for m, _ in ms], yerr=[s * sc for _, s in ms], capsize=3,
               color=["0.5" if "baseline" in n else palette[i % len(palette)] for i, n in enumerate(names)])
        base = [rows[n]["metrics"][key][0] * sc for n in names if n == "baseline"]
        if base:
            ax.axhline(base[0], color="0.5", ls="--", lw=1)
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7, ha="right")
        ax.set_title(lab, fontsize=9)
        fin = [(m, s) for m, s in ms if np.isfinite(m)]
        if fin:
            lo = min(m - s for m, s in fin) * sc
            hi = max(m + s for m, s in fin) * sc
            ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
    fig.suptitle(f"{dataset}: variants (mean ± std over seeds; spatial panels: runs with the probe only)", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / f"sensitivity_{dataset}.png", dpi=100)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default="parts", choices=list(PLANS), help="parts: the current study; main: the one-factor sweep")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--datasets", default="")
    p.add_argument("--variants", default="", help="run these variants instead of the plan")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = RESULTS / "commands.txt"
    if not args.report:
        vs = [v for v in args.variants.split(",") if v]
        bad = [v for v in vs if v not in VARIANTS]
        if bad:
            raise SystemExit(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
        jobs = jobs_for(args.plan, [int(s) for s in args.seeds.split(",") if s], [d for d in args.datasets.split(",") if d] or None, vs or None)
        t0 = time.perf_counter()
        run_jobs(jobs)
        cmd = "python study/sensitivity.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        with log.open("a") as f:
            f.write(f"{cmd}  # finished {time.strftime('%H:%M UTC', time.gmtime())}, {(time.perf_counter() - t0) / 60:.1f} min\n")
    commands = log.read_text().splitlines() if log.exists() else []
    report(commands)
    print((RESULTS / "sensitivity.md").read_text())


if __name__ == "__main__":
    main()
