"""Past 80 steps: baseline, views only and one SER configuration trained for many more steps, evaluated along the
way (learning curves), so a reader sees whether each verdict of the 80-step study grows, shrinks or flips.

Every run (dataset, variant, seed) trains ``--steps`` optimiser steps (warm-up + cosine over the whole run, so the
step-80 checkpoint here is *not* an 80-step run: its learning rate is still high) and is evaluated with the frozen
probes of the study at each step in ``--checkpoints``: linear top-1, equivariance at every layer, corrupted top-1,
flip probability, D4-moved top-1 and the spatial probe. Runs are cached as JSON under ``study/runs/long/`` (not in
git); several processes started with the same command share the work. ``--report`` writes
``study/results/long.{md,json}`` and ``study/results/long_<dataset>_<steps>.png`` (metric vs steps, mean over seeds with a
± std band).

    python study/long.py --datasets digits,textures,photos --variants baseline,views,L4_b2_10 &   # one per core
    python study/long.py --report
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "demo"))
sys.path.insert(0, str(ROOT / "study"))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sensitivity import RESULTS, VARIANTS, claim_job, config_for_dims  # noqa: E402
from ser_demo.data import load_data  # noqa: E402
from ser_demo.evaluate import evaluate  # noqa: E402
from ser_demo.report import git_commit, mean_std, welch  # noqa: E402
from ser_demo.train import Config, pretrain  # noqa: E402

RUNS = ROOT / "study" / "runs" / "long"
# (metric key, label, scale, higher is better)
CURVES = [("linear_top1", "linear top-1 (%)", 100, True), ("eq_centred_at_L", "equivariance (centred) at L", 1, True),
          ("mCA", "corrupted top-1 (%)", 100, True), ("spatial_mask_IoU", "spatial probe: mask IoU", 1, True),
          ("spatial_roi_top1", "spatial probe: RoI top-1 (%)", 100, True), ("mD4", "D4-moved top-1 (%)", 100, True)]


def scalar(metrics: Dict[str, Any], key: str, layer: int) -> float:
    if key == "eq_centred_at_L":
        return float(metrics["equivariance"][str(layer)]["centred"])
    if key.startswith("spatial_"):
        return float(metrics["spatial"][key[len("spatial_"):]])
    return float(metrics[key])


def run_one_long(dataset: str, variant: str, seed: int, steps: int, checkpoints: List[int]) -> Dict[str, Any]:
    split = load_data(dataset, Config().img_size)
    c = split.x_train.shape[1]
    cfg = config_for_dims(variant, seed, split.mean[:c], split.std[:c])
    cfg.steps = steps
    curve: List[Dict[str, Any]] = []
    t0 = time.perf_counter()

    def at(step: int, backbone: torch.nn.Module) -> None:
        e0 = time.perf_counter()
        m = evaluate(backbone, split, cfg.resolved(), robust=True, spatial=True, n_protocol=0, score_layers=list(range(1, cfg.depth + 1)))
        m.pop("robustness", None)
        curve.append({"step": step, "metrics": m, "eval_s": time.perf_counter() - e0, "t": time.perf_counter() - t0})
        print(f"  {dataset}/{variant}/s{seed} step {step}: linear {m['linear_top1']:.3f} eq@L {m['eq_centred_L']:.3f} "
              f"mCA {m['mCA']:.3f} mask {m['spatial']['mask_IoU']:.3f} ({time.perf_counter() - e0:.0f}s eval)", flush=True)

    tr = pretrain(cfg, split.x_train, checkpoints=checkpoints, on_checkpoint=at)
    h = tr.history
    return {"config": tr.cfg.to_dict(), "dataset": split.name, "variant": variant, "curve": curve,
            "loss": [{"step": r["step"], "inv": r["inv"], "equiv": r["equiv"]} for r in h[:: max(1, len(h) // 100)]],
            "wall_s": time.perf_counter() - t0}


def run_jobs(args: argparse.Namespace) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    prov = git_commit(ROOT)
    cps = sorted({int(v) for v in args.checkpoints.split(",") if v} | {args.steps})
    cps = [c for c in cps if c <= args.steps]
    for seed in [int(s) for s in args.seeds.split(",") if s]:  # seed-major: every arm has its first seeds early
        for d in [x for x in args.datasets.split(",") if x]:
            for v in [x for x in args.variants.split(",") if x]:
                if (RUNS / "STOP").exists():
                    return
                path = RUNS / f"{d}_{v}_{args.steps}_s{seed}.json"
                claim = path.with_suffix(".running")
                if path.exists():
                    continue
                if not claim_job(claim):
                    continue
                try:
                    c0 = time.process_time()
                    rec = run_one_long(d, v, seed, args.steps, cps)
                    rec.update(git=prov, cpu_s=time.process_time() - c0, finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
                    path.write_text(json.dumps(rec, indent=1) + "\n")
                finally:
                    claim.unlink(missing_ok=True)


def report(commands: List[str]) -> Dict[str, Any]:
    from matplotlib.figure import Figure

    runs = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    if not runs:
        raise SystemExit(f"no finished runs under {RUNS}")
    by: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    for r in runs:
        by.setdefault(f"{r['dataset']} ({r['config']['steps']} steps)", {}).setdefault(r["variant"], []).append(r)
    commits = sorted({(r.get("git") or {}).get("commit") or "?" for r in runs})
    cpu = sum(r.get("cpu_s", 0.0) for r in runs)
    md = ["# SER past 80 steps: learning curves", "",
          "MoCo-v3, the study's tiny ViT (width 48, depth 4, patch 4, 24 px), batch 128; warm-up + cosine over the whole run. "
          "Each checkpoint evaluates the frozen backbone with the study's probes. mean ± sample std over seeds; verdicts: "
          "Welch's t-test, p < 0.05, otherwise *within noise*. Equivariance at L is measured at the SER variant's layer "
          "for every arm.", "",
          f"Runs: {len(runs)}; {cpu / 60:.0f} CPU-minutes in all (1 torch thread per process, CPU only); commits: "
          f"{', '.join(c[:10] for c in commits)}.", "", "Commands:", ""]
    md += [f"    {c}" for c in commands] + [""]
    summary: Dict[str, Any] = {"commands": commands, "commits": commits, "runs": len(runs), "cpu_s": cpu, "datasets": {}}
    for name, arms in by.items():
        ser = next((v for v in arms if VARIANTS.get(v, {}).get("arm", "") .startswith("ser")), None)
        layer = arms[ser][0]["config"]["layer"] if ser else Config().layer
        steps = sorted({c["step"] for rs in arms.values() for r in rs for c in r["curve"]})
        table: Dict[str, Any] = {}
        for v, rs in arms.items():
            for st in steps:
                for key, *_ in CURVES:
                    vals = [scalar(c["metrics"], key, layer) for r in rs for c in r["curve"] if c["step"] == st]
                    table.setdefault(v, {}).setdefault(key, {})[st] = vals
        md += [f"## {name}: SER variant `{ser}` (L = {layer}); seeds " + ", ".join(f"{v} {len(rs)}" for v, rs in arms.items()), ""]
        md += ["| metric | step | " + " | ".join(arms) + " | SER − baseline (p, verdict) | SER − views (p, verdict) | views − baseline (p) |",
               "|---|---|" + "---|" * len(arms) + "---|---|---|"]
        verdicts: Dict[str, Any] = {}
        for key, lab, sc, up in CURVES:
            for st in steps:
                cells = []
                for v in arms:
                    vals = table[v][key][st]
                    m, s = mean_std(vals) if vals else (float("nan"), 0.0)
                    cells.append("–" if not vals else (f"{m * sc:.{1 if sc == 100 else 3}f} ± {s * sc:.{1 if sc == 100 else 3}f}"))
                comp = []
                for ref in ("baseline", "views"):
                    if ser and ref in arms and table[ser][key][st] and table[ref][key][st]:
                        t = welch(table[ser][key][st], table[ref][key][st])
                        good = None if t["verdict"] == "within noise" else ((t["verdict"] == "higher") == up)
                        t["claim"] = "within noise" if good is None else ("confirmed" if good else "refuted")
                        verdicts.setdefault(f"{ser}-{ref}", {}).setdefault(key, {})[st] = t
                        comp.append(f"{t['diff'] * sc:+.{1 if sc == 100 else 3}f} (p={t['p']:.2g}, **{t['claim']}**)")
                    else:
                        comp.append("–")
                if "views" in arms and "baseline" in arms and table["views"][key][st] and table["baseline"][key][st]:
                    t = welch(table["views"][key][st], table["baseline"][key][st])  # what b2's views alone do
                    verdicts.setdefault("views-baseline", {}).setdefault(key, {})[st] = t
                    comp.append(f"{t['diff'] * sc:+.{1 if sc == 100 else 3}f} (p={t['p']:.2g}{', resolved' if t['verdict'] != 'within noise' else ''})")
                else:
                    comp.append("–")
                md.append(f"| {lab} | {st} | " + " | ".join(cells) + " | " + " | ".join(comp) + " |")
        md.append("")
        summary["datasets"][name] = {"ser_variant": ser, "layer": layer, "steps": steps, "values": table, "verdicts": verdicts}
        fig = Figure(figsize=(4.2 * len(CURVES), 3.6))
        for j, (key, lab, sc, _) in enumerate(CURVES):
            ax = fig.add_subplot(1, len(CURVES), j + 1)
            for i, v in enumerate(arms):
                xs = [st for st in steps if table[v][key][st]]
                ms = np.array([mean_std(table[v][key][st]) for st in xs]) * sc
                colour = "0.45" if v == "baseline" else f"C{i}"
                ax.plot(xs, ms[:, 0], "o-", color=colour, label=f"{v} ({len(arms[v])} seeds)", ms=3)
                ax.fill_between(xs, ms[:, 0] - ms[:, 1], ms[:, 0] + ms[:, 1], color=colour, alpha=0.2)
            ax.set_xlabel("optimiser steps")
            ax.set_title(lab + (f" (L={layer})" if key == "eq_centred_at_L" else ""), fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"{name}: learning curves (mean ± std over seeds)", fontsize=10)
        fig.tight_layout()
        fig.savefig(RESULTS / f"long_{name.split()[0]}_{max(steps)}.png", dpi=90)  # one figure per dataset and run length
    md += claims_table(summary)
    (RESULTS / "long.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    (RESULTS / "long.md").write_text("\n".join(md) + "\n")
    return summary


# the four claims of the paper, each read from these curves' metrics (robustness: corrupted and D4-moved top-1)
CLAIMS = [("equivariance", ["eq_centred_at_L"]), ("accuracy", ["linear_top1"]), ("robustness", ["mCA", "mD4"]),
          ("spatial transfer", ["spatial_mask_IoU", "spatial_roi_top1"])]
SHORT = {"eq_centred_at_L": "", "linear_top1": "", "mCA": "corrupted", "mD4": "D4-moved", "spatial_mask_IoU": "mask",
         "spatial_roi_top1": "RoI"}


def claims_table(summary: Dict[str, Any]) -> List[str]:
    """SER − baseline per claim, dataset and checkpoint: confirmed / refuted / within noise with the difference and p."""
    scale = {k: sc for k, _, sc, _ in CURVES}
    md = ["## The four claims along training (SER − baseline, Welch p < 0.05)", "",
          "| dataset | step | seeds | equivariance | accuracy | robustness | spatial transfer |", "|---|---|---|---|---|---|---|"]
    for name, d in summary["datasets"].items():
        ver = d["verdicts"].get(f"{d['ser_variant']}-baseline", {})
        n = min(len(v) for v in d["values"][d["ser_variant"]]["linear_top1"].values())
        for st in d["steps"]:
            cells = []
            for _, keys in CLAIMS:
                parts = []
                for k in keys:
                    t = ver[k][st]
                    sc = scale[k]
                    claim = t["claim"] if t["claim"] == "within noise" else f"**{t['claim']}**"
                    parts.append(f"{SHORT[k] + ' ' if SHORT[k] else ''}{claim} ({t['diff'] * sc:+.{1 if sc == 100 else 3}f}, p {t['p']:.2g})")
                cells.append("; ".join(parts))
            md.append(f"| {name.split()[0]} | {st} of {max(d['steps'])} | {n} | " + " | ".join(cells) + " |")
    return md + [""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,textures,photos")
    p.add_argument("--variants", default="baseline,views,L4_b2_10")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--checkpoints", default="80,200,400,800")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bad = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    log = RESULTS / "long_commands.txt"
    if not args.report:
        t0 = time.perf_counter()
        run_jobs(args)
        cmd = "python study/long.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        with log.open("a") as f:
            f.write(f"{cmd}  # finished {time.strftime('%H:%M UTC', time.gmtime())}, {(time.perf_counter() - t0) / 60:.1f} min\n")
    report(log.read_text().splitlines() if log.exists() else [])
    print((RESULTS / "long.md").read_text())


if __name__ == "__main__":
    main()
