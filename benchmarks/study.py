"""The study behind `make demo`: objectives x arms x seeds, a layer sweep, robustness and spatial transfer.

Every run (one objective, arm, SER layer, seed) is cached as JSON under ``<out>/study_runs/``; re-running
skips finished runs, so the study can be stopped and resumed, and ``--report`` alone rebuilds the tables
and figures from the cache.

    python benchmarks/study.py --phase arms --objectives mocov3 --seeds 0,1,2      # MoCo-v3 arms
    python benchmarks/study.py --phase sweep --objectives mocov3 --seeds 0,1,2     # SER at every layer 1..D
    python benchmarks/study.py --phase arms --objectives dino,barlow --seeds 0,1,2
    python benchmarks/study.py --report                                            # tables + PNGs only

Outputs: ``<out>/study_results.json``, ``study_results.md``, ``study_sweep.png``, ``study_arms.png``.
See docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "demo"))
sys.path.insert(0, str(ROOT))  # this checkout's ser_plugin first

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ser_demo.data import load_data  # noqa: E402
from ser_demo.report import flatten, git_commit, margin_in_std, markdown_table, mean_std  # noqa: E402
from ser_demo.run import run_one  # noqa: E402
from ser_demo.train import ARMS, OBJECTIVES, Config  # noqa: E402

STUDY_ARMS = ["baseline", "views", "lam0", "ser", "ser_late", "ser_head"]


def run_name(objective: str, arm: str, layer: int, seed: int) -> str:
    return f"{objective}_{arm}_L{layer}_s{seed}"


def parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="arms", choices=("arms", "sweep", "none"))
    p.add_argument("--objectives", default="mocov3")
    p.add_argument("--arms", default=",".join(STUDY_ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--b2-share", type=float, default=d.b2_share)
    p.add_argument("--layer", type=int, default=d.layer)
    p.add_argument("--layers", default="", help="sweep: comma-separated layers (default 1..depth)")
    p.add_argument("--lam", type=float, default=None)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix for the run cache and outputs (e.g. '_gpu')")
    p.add_argument("--reverse-arms", action="store_true", help="run the arms of each seed in reverse order (for a second process)")
    p.add_argument("--report", action="store_true", help="only rebuild the tables and figures from cached runs")
    return p


def planned(args: argparse.Namespace) -> List[Dict[str, Any]]:
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    objs = [o for o in args.objectives.split(",") if o]
    for o in objs:
        if o not in OBJECTIVES:
            raise SystemExit(f"unknown objective {o!r}")
    jobs = []
    for seed in seeds:  # seed-major, so an interrupted study still has every arm at the first seeds
        for o in objs:
            if args.phase == "arms":
                for arm in (args.arms.split(",")[::-1] if args.reverse_arms else args.arms.split(",")):
                    if arm not in ARMS:
                        raise SystemExit(f"unknown arm {arm!r}")
                    jobs.append(dict(objective=o, arm=arm, layer=args.layer, seed=seed))
            elif args.phase == "sweep":
                for layer in [int(v) for v in args.layers.split(",") if v] or range(1, args.depth + 1):
                    jobs.append(dict(objective=o, arm="ser", layer=layer, seed=seed))
    return jobs


def run_jobs(args: argparse.Namespace, runs_dir: Path) -> None:
    from tqdm.auto import tqdm

    split = load_data(args.data)
    c = split.x_train.shape[1]
    jobs = planned(args)
    prov = git_commit(ROOT)
    for job in tqdm(jobs, desc="study"):
        path = runs_dir / (run_name(job["objective"], job["arm"], job["layer"], job["seed"]) + ".json")
        claim = path.with_suffix(".running")
        if path.exists() or claim.exists():  # finished, or another study process is on it
            continue
        claim.write_text(str(os.getpid()))
        cfg = Config(objective=job["objective"], arm=job["arm"], layer=job["layer"], seed=job["seed"], epochs=args.epochs,
                     width=args.width, depth=args.depth, batch=args.batch, b2_share=args.b2_share, lam=args.lam, tau=args.tau,
                     device=args.device, mean=split.mean[:c], std=split.std[:c])
        rec = run_one(cfg, split, robust=True, spatial=True, score_layers=list(range(1, args.depth + 1)), progress=None)
        rec["git"] = prov
        rec["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        path.write_text(json.dumps(rec, indent=1))
        claim.unlink()
        m = rec["metrics"]
        tqdm.write(f"{path.stem}: linear {m['linear_top1']:.3f} kNN {m['knn_top1']:.3f} eqC@L {m['eq_centred_L']:.3f} "
                   f"eqC@last {m['eq_centred_last']:.3f} mCA {m['mCA']:.3f} mIoU {m['spatial']['mIoU']:.3f} "
                   f"train {m['train_s']:.0f}s eval {m['eval_s']:.0f}s")


def load_runs(runs_dir: Path) -> List[Dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]


def report(runs: List[Dict[str, Any]], out: Path, tag: str, commands: List[str]) -> Dict[str, Any]:
    from matplotlib.figure import Figure  # object API: no pyplot state, no backend switch

    if not runs:
        raise SystemExit("no finished runs to report")
    depth = runs[0]["config"]["depth"]
    default_layer = max(set(r["config"]["layer"] for r in runs if r["config"]["arm"] != "ser") or {2}, key=lambda x: x)
    summary: Dict[str, Any] = {"commands": commands, "objectives": {}}
    md = [f"# SER study{(' ' + tag) if tag else ''} (digits, tiny ViT)", ""]
    c0 = runs[0]["config"]
    md += [f"ViT width {c0['width']}, depth {depth}, patch {c0['patch']}, {c0['img_size']} px; batch {c0['batch']} (b2 share "
           f"{c0['b2_share']}); {c0['epochs']} epochs; SER layer L={default_layer} unless swept. Accuracies in %, "
           "equivariance = ser_plugin.equivariance_score (cosine, 7 non-identity D4 elements; 'centred' subtracts each map's "
           "mean token). mean ± sample std over seeds.", "", "Commands:", ""]
    md += [f"    {c}" for c in commands] + [""]
    total_s = sum(r["metrics"]["train_s"] + r["metrics"]["eval_s"] for r in runs)
    md += [f"Runs: {len(runs)}; summed train+eval wall time {total_s / 60:.1f} min (1 torch thread, shared 2-core machine, nice 5).", ""]
    for obj in OBJECTIVES:
        sel = [r for r in runs if r["config"]["objective"] == obj and (r["config"]["layer"] == default_layer or r["config"]["arm"] == "baseline")]
        if not sel:
            continue
        by_arm: Dict[str, List[Dict[str, float]]] = {}
        seeds: Dict[str, List[int]] = {}
        for arm in STUDY_ARMS:
            rs = [r for r in sel if r["config"]["arm"] == arm]
            if rs:
                by_arm[arm] = [flatten(r["metrics"]) for r in rs]
                seeds[arm] = sorted(r["config"]["seed"] for r in rs)
        lam = next((r["config"]["lam"] for r in sel if r["config"]["arm"].startswith("ser")), None)
        tau = next((r["config"]["tau"] for r in sel if r["config"]["arm"].startswith("ser")), None)
        md += [f"## {obj} (λ={lam}, τ={tau}, L={default_layer}/{depth})", "", markdown_table(by_arm), ""]
        margins = {}
        if "baseline" in by_arm:
            for arm in ("ser", "ser_late", "ser_head", "lam0", "views"):
                if arm in by_arm:
                    for key in ("eq_centred_L", "linear_top1", "mCA"):
                        a = [r[key] for r in by_arm[arm]]
                        b = [r[key] for r in by_arm["baseline"]]
                        margins[f"{arm}-baseline:{key}"] = margin_in_std(a, b)
        for a1, a2 in (("ser", "views"), ("ser_late", "lam0")):
            if a1 in by_arm and a2 in by_arm:
                for key in ("eq_centred_L", "linear_top1"):
                    margins[f"{a1}-{a2}:{key}"] = margin_in_std([r[key] for r in by_arm[a1]], [r[key] for r in by_arm[a2]])
        if margins:
            md += ["Margins (difference of means; in units of the larger seed std of the two arms):", ""]
            for k, v in margins.items():
                unit = 100 if ("top1" in k or "mCA" in k) else 1
                md.append(f"- {k}: {v['diff'] * unit:+.3f}{' pts' if unit == 100 else ''} = {v['in_max_std']:+.1f} std")
            md.append("")
        per_c = {}
        for arm in by_arm:
            src = [r for r in sel if r["config"]["arm"] == arm]
            per_c[arm] = {k: [float(np.mean(x["metrics"]["robustness"]["corrupted_acc"][k])) for x in src]
                          for k in src[0]["metrics"]["robustness"]["corrupted_acc"]}
            per_c[arm].update({f"flip_{k}": [x["metrics"]["robustness"]["flip_rate"][k] for x in src]
                               for k in src[0]["metrics"]["robustness"]["flip_rate"]})
        keys = list(next(iter(per_c.values())).keys())
        md += ["Robustness per corruption (probe top-1 % averaged over 3 severities; flip-rates):", "",
               "| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for arm, d in per_c.items():
            md.append(f"| {arm} | " + " | ".join(
                f"{mean_std(d[k])[0] * (1 if k.startswith('flip') else 100):.{3 if k.startswith('flip') else 1}f}" for k in keys) + " |")
        md.append("")
        summary["objectives"][obj] = {
            "layer": default_layer, "lam": lam, "tau": tau, "seeds": seeds,
            "arms": {arm: {k: dict(zip(("mean", "std"), mean_std([r[k] for r in rs]))) for k in rs[0]} for arm, rs in by_arm.items()},
            "margins": margins,
        }
        # bar chart of the arms
        fig = Figure(figsize=(14, 3.8))
        ax = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
        names = list(by_arm)
        for j, (key, lab) in enumerate((("linear_top1", "linear top-1"), ("eq_centred_L", f"equiv. centred @L={default_layer}"), ("mCA", "corrupted top-1"))):
            ms = [mean_std([r[key] for r in by_arm[a]]) for a in names]
            ax[j].bar(range(len(names)), [m for m, _ in ms], yerr=[s for _, s in ms], color=[f"C{i}" for i in range(len(names))], capsize=3)
            ax[j].set_xticks(range(len(names)), names, rotation=30, fontsize=8)
            ax[j].set_title(lab, fontsize=9)
            lo = min(m - s for m, s in ms)
            hi = max(m + s for m, s in ms)
            ax[j].set_ylim(lo - 0.15 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
        fig.suptitle(f"{obj}: arms (mean ± std over seeds)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"study_arms_{obj}{tag}.png", dpi=100)
    # layer sweep
    for obj in OBJECTIVES:
        sweep = [r for r in runs if r["config"]["objective"] == obj and r["config"]["arm"] == "ser"]
        layers = sorted(set(r["config"]["layer"] for r in sweep))
        if len(layers) < 2:
            continue
        base = [r for r in runs if r["config"]["objective"] == obj and r["config"]["arm"] == "baseline"]
        rows = []
        for L in layers:
            rs = [r for r in sweep if r["config"]["layer"] == L]
            eqL = [r["metrics"]["equivariance"][str(L)]["centred"] for r in rs]
            eqlast = [r["metrics"]["equivariance"][str(depth)]["centred"] for r in rs]
            top1 = [r["metrics"]["linear_top1"] for r in rs]
            base_eqL = [r["metrics"]["equivariance"][str(L)]["centred"] for r in base]
            rows.append(dict(layer=L, n=len(rs), eq_centred_at_L=mean_std(eqL), eq_centred_last=mean_std(eqlast), linear_top1=mean_std(top1),
                             baseline_eq_centred_at_L=mean_std(base_eqL) if base else None, mCA=mean_std([r["metrics"]["mCA"] for r in rs]),
                             spatial_mIoU=mean_std([r["metrics"]["spatial"]["mIoU"] for r in rs])))
        summary.setdefault("sweep", {})[obj] = rows
        md += [f"## Layer sweep ({obj}): SER at layer L = 1..{depth}", "",
               "| L | seeds | equiv. centred @L | baseline equiv. centred @L | equiv. centred @last | linear top-1 | corrupted top-1 | spatial mIoU |",
               "|---|---|---|---|---|---|---|---|"]
        bt = mean_std([r["metrics"]["linear_top1"] for r in base]) if base else None
        for row in rows:
            b = row["baseline_eq_centred_at_L"]
            md.append(f"| {row['layer']} | {row['n']} | {row['eq_centred_at_L'][0]:.3f} ± {row['eq_centred_at_L'][1]:.3f} | "
                      + (f"{b[0]:.3f} ± {b[1]:.3f}" if b else "–")
                      + f" | {row['eq_centred_last'][0]:.3f} ± {row['eq_centred_last'][1]:.3f} | {row['linear_top1'][0] * 100:.1f} ± {row['linear_top1'][1] * 100:.1f}"
                      f" | {row['mCA'][0] * 100:.1f} ± {row['mCA'][1] * 100:.1f} | {row['spatial_mIoU'][0] * 100:.1f} ± {row['spatial_mIoU'][1] * 100:.1f} |")
        if bt:
            md.append(f"| baseline | {len(base)} | – | – | – | {bt[0] * 100:.1f} ± {bt[1] * 100:.1f} | – | – |")
        md.append("")
        fig = Figure(figsize=(6, 4))
        ax1 = fig.add_subplot(1, 1, 1)
        ls = [r["layer"] for r in rows]
        ax1.errorbar(ls, [r["eq_centred_at_L"][0] for r in rows], [r["eq_centred_at_L"][1] for r in rows], fmt="o-", color="C0", capsize=3, label="SER: equiv. centred @L")
        if base:
            ax1.errorbar(ls, [r["baseline_eq_centred_at_L"][0] for r in rows], [r["baseline_eq_centred_at_L"][1] for r in rows], fmt="s--", color="C0", alpha=0.5, capsize=3, label="baseline: equiv. centred @L")
        ax1.set_xlabel("SER layer L")
        ax1.set_ylabel("equivariance score (centred)", color="C0")
        ax2 = ax1.twinx()
        ax2.errorbar(ls, [r["linear_top1"][0] * 100 for r in rows], [r["linear_top1"][1] * 100 for r in rows], fmt="o-", color="C3", capsize=3, label="SER: linear top-1")
        if bt:
            ax2.axhline(bt[0] * 100, color="C3", ls=":", label="baseline linear top-1 (band: ± std)")
            ax2.axhspan((bt[0] - bt[1]) * 100, (bt[0] + bt[1]) * 100, color="C3", alpha=0.12)
        ax2.set_ylabel("linear-probe top-1 (%)", color="C3")
        h1, l1 = ax1.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax1.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
        ax1.set_xticks(ls)
        ax1.set_title(f"{obj}: trade-off of the SER layer (digits, depth {depth})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"study_sweep_{obj}{tag}.png", dpi=110)
    summary["runs"] = len(runs)
    summary["summed_run_wall_s"] = total_s
    summary["machine"] = f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}"
    (out / f"study_results{tag}.json").write_text(json.dumps(summary, indent=1))
    (out / f"study_results{tag}.md").write_text("\n".join(md) + "\n")
    return summary


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    runs_dir = out / f"study_runs{args.tag}"
    runs_dir.mkdir(parents=True, exist_ok=True)
    cmd_log = out / f"study_commands{args.tag}.txt"
    command = "python benchmarks/study.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if not args.report and args.phase != "none":
        t0 = time.perf_counter()
        run_jobs(args, runs_dir)
        with cmd_log.open("a") as f:
            f.write(f"{command.strip()}  # finished {time.strftime('%H:%M UTC', time.gmtime())}, {(time.perf_counter() - t0) / 60:.1f} min\n")
    commands = cmd_log.read_text().splitlines() if cmd_log.exists() else []
    s = report(load_runs(runs_dir), out, args.tag, commands)
    print((out / f"study_results{args.tag}.md").read_text())
    if not math.isfinite(s.get("summed_run_wall_s", 0.0)):
        raise SystemExit("non-finite wall time")


if __name__ == "__main__":
    main()
