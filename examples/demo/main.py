"""`make demo`: pretrain a small ViT three ways over several seeds — baseline, views only (SER's T_eq views for b2,
λ = 0) and SER — and print accuracy, equivariance, robustness and the spatial probe side by side as mean ± std, with
two verdicts per metric: SER vs baseline (what SER does in all) and SER vs views (what its loss does beyond its
views). Welch's t-test: "resolved" when p < 0.05, "within noise" otherwise.

    python examples/demo/main.py                      # digits, MoCo-v3, 3 arms, seeds 0-2 (a few minutes on 2 cores)
    python examples/demo/main.py --data textures      # or photos (patch sets that ship with scikit-image), or an ImageFolder path
    python examples/demo/main.py --smoke              # a few steps, one seed (CI)

Writes <out>/demo_results.{json,md,png} and demo_protocol.png. See docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))  # this checkout's ser_plugin first

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ser_demo.backbones import FAMILIES, apply_backbone_defaults  # noqa: E402
from ser_demo.data import load_data  # noqa: E402
from ser_demo.report import BACKBONE_NAMES, COLUMNS, PCT, arm_label, flatten, git_commit, markdown_table, md_table, plot_demo, welch  # noqa: E402
from ser_demo.run import run_job, run_one  # noqa: E402
from ser_demo.train import ARMS, OBJECTIVES, Config  # noqa: E402

VERDICT_KEYS = ("linear_top1", "knn_top1", "eq_centred_L", "rot_equiv_L", "cls_inv_d4", "mCA", "mFR", "mD4", "spatial_mask_IoU",
                "spatial_roi_top1")


def parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4", help="training seeds (the data split is fixed); >= 3 for a verdict; 5 (the default) resolves more of the close ones")
    p.add_argument("--jobs", type=int, default=0, help="worker processes running (arm, seed) pairs in parallel (0: one per core)")
    p.add_argument("--steps", type=int, default=80, help="optimiser steps per run (0: use --epochs)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--width", type=int, default=d.width, help="embedding dim of the ViT")
    p.add_argument("--depth", type=int, default=d.depth, help="number of blocks")
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--patch", type=int, default=d.patch)
    p.add_argument("--img-size", type=int, default=d.img_size, help="images are resized to this square size")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--b2-share", type=float, default=d.b2_share, help="share of each batch that gets SER's T_eq views")
    p.add_argument("--no-linv2", action="store_true", help="b2's T_eq views feed SER's loss only, not the SSL loss (not the paper)")
    p.add_argument("--layer", type=int, default=None, help="SER layer L (1..depth; default: 2 for the ViT, the family's middle layer otherwise)")
    p.add_argument("--backbone", default="vit", choices=FAMILIES, help="vit, or a small resnet / convnext / swin (ser_demo/backbones.py)")
    p.add_argument("--lam", type=float, default=None, help="λ (default: 1.0 MoCo-v3 / 0.3 DINO / 1.0 Barlow Twins)")
    p.add_argument("--tau", type=float, default=None, help="τ of the token InfoNCE (default 0.4; 0.5 DINO)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--objective", default="mocov3", choices=OBJECTIVES)
    p.add_argument("--arms", default="baseline,views,ser", help=f"comma-separated, from {','.join(ARMS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker process")
    p.add_argument("--data", default=None, help="digits (default), textures, photos, or an ImageFolder directory")
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--no-spatial", action="store_true", help="skip the spatial probe (frozen-backbone mask / RoI probe on 2-object scenes)")
    p.add_argument("--no-robust", action="store_true", help="skip the corruption/flip-probability evaluation")
    p.add_argument("--smoke", action="store_true", help="3 steps per arm on a data subset, one seed, in-process (CI); numbers are meaningless")
    return p


def comparisons(arms: List[str]) -> List[Tuple[str, str]]:
    """(arm, reference) pairs: every arm against the baseline, and every SER arm against the views-only arm (the
    loss's own effect: same views, λ = 0)."""
    out = [(a, "baseline") for a in arms if a != "baseline" and "baseline" in arms]
    out += [(a, "views") for a in arms if a.startswith("ser") and "views" in arms]
    return out or [(a, arms[0]) for a in arms[1:]]


def verdicts(runs: Dict[str, List[Dict[str, float]]], pairs: List[Tuple[str, str]]) -> List[Dict[str, Any]]:
    """Per (arm, reference) pair and metric: Δ of the means, Welch's p and the verdict ('better' / 'worse' when
    p < 0.05, in the metric's own direction; 'within noise' otherwise)."""
    out = []
    for arm, ref in pairs:
        for key in VERDICT_KEYS:
            a = [r[key] for r in runs[arm] if key in r and np.isfinite(r[key])]
            b = [r[key] for r in runs[ref] if key in r and np.isfinite(r[key])]
            if not a or not b:
                continue
            up = next(u for k, _, u in COLUMNS if k == key)
            t = welch(a, b)
            better = None if t["verdict"] == "within noise" else ((t["verdict"] == "higher") == up)
            out.append({"arm": arm, "ref": ref, "metric": key, "diff": t["diff"], "p": t["p"], "n": (len(a), len(b)),
                        "verdict": "within noise" if better is None else ("better" if better else "worse")})
    return out


def verdict_table(ver: List[Dict[str, Any]]) -> Tuple[str, List[str]]:
    """One row per metric, one column per comparison: 'Δ (p) verdict'; and one line per comparison naming the
    resolved metrics and those within noise."""
    pairs = list(dict.fromkeys((v["arm"], v["ref"]) for v in ver))
    keys = list(dict.fromkeys(v["metric"] for v in ver))
    by = {(v["arm"], v["ref"], v["metric"]): v for v in ver}
    lab = {k: lab for k, lab, _ in COLUMNS}
    rows = []
    for k in keys:
        row = {"metric": lab[k]}
        for a, r in pairs:
            v = by.get((a, r, k))
            if v:
                sc, d = (100, 1) if k in PCT else (1, 3)
                row[f"{a} − {r}"] = f"{v['diff'] * sc:+.{d}f} (p={v['p']:.2g}) " + (f"**{v['verdict']}**" if v["verdict"] != "within noise" else "within noise")
        rows.append(row)
    lines = []
    for a, r in pairs:
        res = [f"{lab[v['metric']]} {v['verdict']}" for v in ver if (v["arm"], v["ref"]) == (a, r) and v["verdict"] != "within noise"]
        noise = [lab[v["metric"]] for v in ver if (v["arm"], v["ref"]) == (a, r) and v["verdict"] == "within noise"]
        lines.append(f"{a} vs {r}: resolved (p < 0.05): {', '.join(res) or 'none'}; within noise: {', '.join(noise) or 'none'}")
    return md_table(rows, ["metric"] + [f"{a} − {r}" for a, r in pairs]), lines


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    apply_backbone_defaults(args)  # the family's depth, width and default layer
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise SystemExit(f"unknown arm(s) {bad}; choose from {list(ARMS)}")
    seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",") if s.strip()]
    t0 = time.perf_counter()
    prov = git_commit()
    split = load_data(args.data, args.img_size, args.channels)
    c = split.x_train.shape[1]
    base = Config(
        objective=args.objective, epochs=args.epochs, steps=(args.steps or None), width=args.width, depth=args.depth, heads=args.heads,
        patch=args.patch, img_size=args.img_size, batch=64 if args.smoke else args.batch, b2_share=args.b2_share, b2_in_ssl=not args.no_linv2, layer=args.layer,
        lam=args.lam, tau=args.tau, lr=args.lr, device=args.device, backbone=args.backbone, max_steps=3 if args.smoke else None, mean=split.mean, std=split.std,
    )
    print(f"data: {split.name}  train {tuple(split.x_train.shape)}  test {tuple(split.x_test.shape)}  classes {split.classes}")
    shape = f"patch {base.patch}" if args.backbone == "vit" else f"small timm {args.backbone}"
    print(f"{BACKBONE_NAMES[args.backbone]}: width {base.width}, depth {base.depth}, {shape}, {base.img_size}px; {base.objective}; SER layer {base.layer}; "
          f"batch {base.batch} (b2 share {base.b2_share}); arms {arms}; seeds {seeds}")
    todo = [(arm, seed) for seed in seeds for arm in arms]
    robust, spatial = not args.no_robust, not args.no_spatial and args.backbone == "vit"  # the spatial probe reads ViT tokens
    records: Dict[str, Dict[int, Dict[str, Any]]] = {a: {} for a in arms}

    def done(arm: str, seed: int, rec: Dict[str, Any]) -> None:
        records[arm][seed] = rec
        m = rec["metrics"]
        print(f"  {arm} seed {seed}: linear {m['linear_top1']:.3f}  equiv centred@L {m['eq_centred_L']:.3f}  "
              f"train {m['train_s']:.0f}s  eval {m['eval_s']:.0f}s", flush=True)

    jobs = args.jobs or min(len(todo), os.cpu_count() or 1)
    if args.smoke or jobs <= 1:
        torch.set_num_threads(args.threads)
        if args.smoke:
            split.x_train, split.y_train = split.x_train[:160], split.y_train[:160]
            split.x_test, split.y_test = split.x_test[:96], split.y_test[:96]
        for arm, seed in todo:
            small = dict(n_equiv=64, n_robust=64, n_protocol=16) if args.smoke else None
            done(arm, seed, run_one(Config(**{**base.to_dict(), "arm": arm, "seed": seed}), split, robust=robust, spatial=spatial,
                                    score_layers=list(range(1, base.depth + 1)), eval_kw=small))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        print(f"running {len(todo)} (arm, seed) pairs in {jobs} processes x {args.threads} thread(s)", flush=True)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(run_job, {**base.to_dict(), "arm": arm, "seed": seed}, args.data, robust, spatial, args.threads): (arm, seed)
                    for arm, seed in todo}
            for f in as_completed(futs):
                done(*futs[f], f.result())
    wall, cpu = time.perf_counter() - t0, time.process_time()
    per_seed = {a: [records[a][s]["metrics"] for s in seeds] for a in arms}
    flat = {a: [flatten(m) for m in per_seed[a]] for a in arms}
    table = markdown_table(flat, backbone=args.backbone)
    ver = verdicts(flat, comparisons(arms))
    vtable, vlines = verdict_table(ver)
    # the measurement protocol, averaged over seeds: per-element errors at L and the controls
    prot_rows = []
    for a in arms:
        ps = [m["protocol"] for m in per_seed[a] if "protocol" in m]
        if not ps:
            continue
        i = ps[0]["blocks"].index(base.layer)
        row: Dict[str, Any] = {"arm": a}
        for el in ps[0]["errors"]:
            row[el] = f"{np.mean([q['errors'][el]['one_minus_cos_centred'][i] for q in ps]):.3f}"
        for ctl in ps[0]["controls"]:
            row[f"control: {ctl}"] = f"{np.mean([q['controls'][ctl]['one_minus_cos_centred'][i] for q in ps]):.3f}"
        prot_rows.append(row)
    untrained = None
    if prot_rows:
        from ser_demo.train import build_vit

        from ser_plugin.protocol import measure_equivariance

        torch.manual_seed(0)
        net = build_vit(base.resolved(), c)
        mean = torch.tensor(base.mean[:c]).view(1, -1, 1, 1)
        std = torch.tensor(base.std[:c]).view(1, -1, 1, 1)
        up = measure_equivariance(net, (split.x_test[:64] - mean) / std, controls=False)
        untrained = up.to_dict()
        i = up.blocks.index(base.layer)
        prot_rows.append({"arm": f"untrained {BACKBONE_NAMES[args.backbone]} (control)", **{el: f"{up.errors[el]['one_minus_cos_centred'][i]:.3f}" for el in up.errors}})
    ptable = md_table(prot_rows, list(prot_rows[0])) if prot_rows else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python examples/demo/main.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    payload = {
        "command": command.strip(),
        "git": prov,
        "seeds": seeds,
        "wall_s": wall,
        "parent_cpu_s": cpu,
        "runs_cpu_s": sum(records[a][s]["metrics"].get("cpu_s", 0.0) for a in arms for s in seeds),
        "jobs": 1 if args.smoke else jobs,
        "threads_per_job": args.threads,
        "load_avg_at_end": os.getloadavg(),
        "data": split.name,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "columns": {k: lab for k, lab, _ in COLUMNS},
        "verdict_test": "Welch's t-test (two-sided, unequal variances), p < 0.05; otherwise 'within noise'",
        "verdicts": ver,
        "untrained_protocol": untrained,
        "arms": {a: {str(s): records[a][s] for s in seeds} for a in arms},
    }
    (out / "demo_results.json").write_text(json.dumps(payload, indent=1) + "\n")
    sha = (prov["commit"] or "unknown")[:12] + (" + uncommitted changes in " + ", ".join(prov["dirty"]) if prov["dirty"] else "")
    md = [f"# SER demo ({split.name}, {base.objective})", "", f"Command: `{payload['command']}`  ", f"Commit: `{sha}`  ",
          f"Seeds {seeds}; wall time {wall:.0f} s with {payload['jobs']} process(es) x {args.threads} thread(s); the runs used "
          f"{payload['runs_cpu_s']:.0f} s of CPU in all (load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: "
          f"other jobs shared the machine when it is well above {payload['jobs']}); torch {torch.__version__}.", "", table, "",
          f"Verdicts — {payload['verdict_test']}; 'better'/'worse' take the metric's direction into account. `ser − baseline` is "
          "what SER does in all; `ser − views` is what its loss adds to its views (same b2 views, λ = 0); `views − baseline` is "
          f"what the views alone do. With {len(seeds)} seeds, *within noise* means not resolved at this budget, not equal.", "",
          vtable, ""] + [f"- {ln}" for ln in vlines] + [""]
    if ptable:
        md += [f"Measurement protocol at layer L={base.layer} (ser_plugin.protocol): 1 − cos (centred) between ρ_g(F_L(x)) and "
               f"F_L(g·x) per group element, mean over seeds; 0 = exact, the permutation control ≈ the level of no equivariance "
               f"(scale: image bilinear antialiased, tokens bilinear; at {base.img_size} px the patch-aligned factors are "
               f"{', '.join(f'{k}→{v:.3g}' for k, v in (untrained or {}).get('effective_scale', {}).items())}).", "", ptable, ""]
    md += ["Accuracies in % (linear probe / kNN on frozen [CLS] features; corrupted = the same probe on 10 ImageNet-C-style "
           "corruptions at 3 severities calibrated per dataset, see study/results/calibration.md; D4-moved = the probe on "
           "test images rotated/flipped by the 7 non-identity D4 elements); flip probability = share of consecutive frames whose "
           "prediction changes along rotation (±30°), scale (0.7–1.3) and translation (±25 %) sequences.", ""]
    for arm in arms:
        md.append(f"- {arm}: {arm_label(arm, args.backbone)}")
    (out / "demo_results.md").write_text("\n".join(md) + "\n")
    plot_demo(per_seed, str(out / "demo_results.png"), f"SER demo: {split.name}, {base.objective}, layer {base.layer}/{base.depth}, seeds {seeds}")
    plot_protocol(per_seed, untrained, str(out / "demo_protocol.png"), base.layer, BACKBONE_NAMES[args.backbone])
    print()
    print(table)
    print()
    print(vtable)
    print()
    for ln in vlines:
        print(ln)
    if ptable:
        print()
        print(ptable)
    print(f"\nwall time {wall:.0f} s (runs' CPU time {payload['runs_cpu_s']:.0f} s); wrote {out}/demo_results.json, .md, .png, demo_protocol.png")
    return payload


def plot_protocol(per_seed: Dict[str, List[Dict[str, Any]]], untrained: Any, path: str, layer: int, family: str = "ViT") -> None:
    """Per-block equivariance error (1 − cos centred, mean over the 7 D4 elements; ± std over seeds) for each arm,
    with the permutation control and the untrained network of the same family (object API, no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    d4 = ["rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270"]
    for i, (arm, ms) in enumerate(per_seed.items()):
        ps = [m["protocol"] for m in ms if "protocol" in m]
        if not ps:
            continue
        blocks = ps[0]["blocks"]
        v = np.array([[np.mean([q["errors"][e]["one_minus_cos_centred"][j] for e in d4]) for j in range(len(blocks))] for q in ps])
        ax.errorbar(blocks, v.mean(0), v.std(0, ddof=1) if len(v) > 1 else None, marker="o", capsize=3, color=f"C{i}", label=arm)
        pc = np.array([q["controls"]["permutation"]["one_minus_cos_centred"] for q in ps])
        ax.plot(blocks, pc.mean(0), ":", color=f"C{i}", alpha=0.6, label=f"{arm}: permutation control")
    if untrained:
        ax.plot(untrained["blocks"], [np.mean([untrained["errors"][e]["one_minus_cos_centred"][j] for e in d4])
                                      for j in range(len(untrained["blocks"]))], "-.", color="0.4", label=f"untrained {family}")
    ax.axvline(layer, color="0.8", lw=4, zorder=0)
    if untrained:
        ax.set_xticks(untrained["blocks"])
    ax.set_xlabel("block (grey bar: SER layer L)")
    ax.set_ylabel("1 − cos (centred), mean over D4 \\ {e}")
    ax.set_title("equivariance error per block (0 = exact; mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
