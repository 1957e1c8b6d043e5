"""Calibrates the corruption severities of the demo and the study (ImageNet-C in miniature) per dataset.

For each dataset a baseline (MoCo-v3, no SER, the study's default model) is pretrained with a calibration seed
that no reported run uses (100), its linear probe is fitted, and the probe's accuracy on the test images is
measured at every candidate level of every corruption (``CORRUPTION_GRID`` in examples/demo/ser_demo/evaluate.py).
For each corruption the three severities are the grid levels (in increasing severity) whose *retained accuracy*
``(acc - chance) / (clean - chance)`` is closest to 0.85, 0.65 and 0.45: every severity keeps the baseline well above
chance, and the three are spread. Writes examples/demo/ser_demo/severities.json (read by the demo and the study) and
study/results/calibration.{json,md}.

    python study/calibrate.py                                 # digits, textures, photos (about 1 min each on 1 core)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "demo"))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ser_demo.data import DATASETS, load_data  # noqa: E402
from ser_demo.evaluate import CORRUPTION_GRID, SEVERITY_FILE, LinearProbe, corrupt, features, spatial_transfer  # noqa: E402
from ser_demo.report import git_commit  # noqa: E402
from ser_demo.train import Config, pretrain  # noqa: E402

TARGETS = (0.85, 0.65, 0.45)


def pick(levels, retained, targets=TARGETS):
    """Three grid indices, non-decreasing, whose retained accuracy is closest to each target."""
    out, lo = [], 0
    for t in targets:
        cand = range(lo, len(levels))
        i = min(cand, key=lambda j: abs(retained[j] - t))
        out.append(i)
        lo = min(i + 1, len(levels) - 1)
    return out


SPATIAL_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)  # background clutter of the spatial probe
SPATIAL_TARGET = 0.6  # retained mask IoU (IoU - chance) / (IoU without clutter - chance) of the calibration baseline


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--only", default="all", choices=("all", "corruptions", "spatial"),
                   help="calibrate only this part (the other part's entries are kept)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prov = git_commit(ROOT)  # the code as it is when this process starts (it is imported now)
    command = "python study/calibrate.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    d = Config()
    res = ROOT / "study" / "results"
    table = json.loads(SEVERITY_FILE.read_text()) if SEVERITY_FILE.exists() else {}
    old = json.loads((res / "calibration.json").read_text()) if (res / "calibration.json").exists() else {}
    sev, clutter = table.get("severities", {}), table.get("spatial_clutter", {})
    detail, sdetail = old.get("detail", {}), old.get("spatial_detail", {})
    for name in [s for s in args.datasets.split(",") if s]:
        t0 = time.perf_counter()
        split = load_data(name, d.img_size)
        c = split.x_train.shape[1]
        cfg = Config(arm="baseline", seed=args.seed, steps=80, mean=split.mean[:c], std=split.std[:c])
        tr = pretrain(cfg, split.x_train)
        model = tr.backbone
        mean = torch.tensor(cfg.mean[:c]).view(1, -1, 1, 1)
        std = torch.tensor(cfg.std[:c]).view(1, -1, 1, 1)
        if args.only in ("all", "corruptions"):
            probe = LinearProbe().fit(features(model, split.x_train, mean, std), split.y_train)
            x, y = split.x_test[: args.n_test], split.y_test[: args.n_test]
            clean = probe.accuracy(features(model, x, mean, std), y)
            chance = float(np.bincount(y.numpy()).max() / len(y))
            per = {}
            sev[split.name] = {}
            for kind, levels in CORRUPTION_GRID.items():
                accs = [probe.accuracy(features(model, corrupt(x, kind, lv, seed=i), mean, std), y) for i, lv in enumerate(levels)]
                ret = [(a - chance) / max(clean - chance, 1e-6) for a in accs]
                idx = pick(levels, ret)
                sev[split.name][kind] = [levels[i] for i in idx]
                per[kind] = {"levels": list(levels), "acc": accs, "retained": ret, "picked": idx}
            detail[split.name] = {"clean": clean, "chance": chance, "per_corruption": per, "seconds": time.perf_counter() - t0,
                                  "git": prov, "command": command}
        if args.only in ("all", "spatial"):
            runs = [spatial_transfer(model, split, mean, std, cfg.patch, clutter=lv) for lv in SPATIAL_GRID]
            base, ch = runs[0]["mask_IoU"], runs[0]["chance_mask_IoU"]
            ret = [(r["mask_IoU"] - ch) / max(base - ch, 1e-6) for r in runs]
            i = min(range(len(SPATIAL_GRID)), key=lambda j: abs(ret[j] - SPATIAL_TARGET))
            clutter[split.name] = SPATIAL_GRID[i]
            sdetail[split.name] = {"grid": list(SPATIAL_GRID), "runs": runs, "retained": ret, "picked": i, "git": prov, "command": command}
        print(f"{split.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    out = {"severities": sev, "spatial_clutter": clutter, "targets_retained": list(TARGETS), "spatial_target_retained": SPATIAL_TARGET,
           "calibration_seed": args.seed, "git": prov, "command": command}
    SEVERITY_FILE.write_text(json.dumps(out, indent=1) + "\n")
    (res / "calibration.json").write_text(json.dumps({**out, "detail": detail, "spatial_detail": sdetail}, indent=1) + "\n")
    md = ["# Calibration of the corruption severities and of the spatial probe (on a held-out baseline)", "",
          f"Calibration seed {args.seed} (not used by any reported run): one MoCo-v3 baseline per dataset, the study's model "
          "and 80 steps. Each part's command and commit are in calibration.json.", "",
          f"Corruptions: the three grid levels whose retained accuracy (acc − chance)/(clean − chance) is closest to {TARGETS}.", ""]
    for name, dd in detail.items():
        md += [f"## {name}: corruptions (clean probe top-1 {dd['clean'] * 100:.1f} %, chance {dd['chance'] * 100:.1f} %)", "",
               "| corruption | severities | probe top-1 at them (%) | retained |", "|---|---|---|---|"]
        for kind, v in dd["per_corruption"].items():
            pk = v["picked"]
            lv = ", ".join(f"{v['levels'][i]:g}" for i in pk)
            ac = ", ".join(f"{v['acc'][i] * 100:.1f}" for i in pk)
            rt = ", ".join(f"{v['retained'][i]:.2f}" for i in pk)
            md.append(f"| {kind} | {lv} | {ac} | {rt} |")
        md.append("")
    if sdetail:
        md += ["## Spatial probe: background clutter", "",
               f"The level of background clutter (smooth noise) whose retained mask IoU (IoU − chance)/(IoU without clutter − chance) "
               f"is closest to {SPATIAL_TARGET}; chance = calling every token foreground. RoI top-1 is shown for reference.", "",
               "| dataset | clutter picked | mask IoU (no clutter → picked) | chance mask IoU | RoI top-1 at picked | grid (retained) |", "|---|---|---|---|---|---|"]
        for name, sd in sdetail.items():
            r0, rp = sd["runs"][0], sd["runs"][sd["picked"]]
            grid = ", ".join(f"{g:g} ({t:.2f})" for g, t in zip(sd["grid"], sd["retained"]))
            md.append(f"| {name} | {sd['grid'][sd['picked']]:g} | {r0['mask_IoU']:.3f} → {rp['mask_IoU']:.3f} | {r0['chance_mask_IoU']:.3f} | "
                      f"{rp['roi_top1'] * 100:.1f} % | {grid} |")
        md.append("")
    (res / "calibration.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
