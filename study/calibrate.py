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
from ser_demo.evaluate import CORRUPTION_GRID, SEVERITY_FILE, LinearProbe, corrupt, features  # noqa: E402
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prov = git_commit(ROOT)  # the code as it is when this process starts (it is imported now)
    d = Config()
    table = json.loads(SEVERITY_FILE.read_text()) if SEVERITY_FILE.exists() else {}
    sev = table.get("severities", {})
    detail = {}
    md = ["# Corruption severities (calibrated on a baseline)", "",
          f"Command: `python study/calibrate.py {' '.join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))}`", ""]
    for name in [s for s in args.datasets.split(",") if s]:
        t0 = time.perf_counter()
        split = load_data(name, d.img_size)
        c = split.x_train.shape[1]
        cfg = Config(arm="baseline", seed=args.seed, steps=80, mean=split.mean[:c], std=split.std[:c])
        tr = pretrain(cfg, split.x_train)
        model = tr.backbone
        mean = torch.tensor(cfg.mean[:c]).view(1, -1, 1, 1)
        std = torch.tensor(cfg.std[:c]).view(1, -1, 1, 1)
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
        detail[split.name] = {"clean": clean, "chance": chance, "per_corruption": per, "seconds": time.perf_counter() - t0}
        md += [f"## {split.name} (clean probe top-1 {clean * 100:.1f} %, chance {chance * 100:.1f} %)", "",
               "| corruption | severities | probe top-1 at them (%) | retained |", "|---|---|---|---|"]
        for kind, v in per.items():
            pk = v["picked"]
            lv = ", ".join(f"{v['levels'][i]:g}" for i in pk)
            ac = ", ".join(f"{v['acc'][i] * 100:.1f}" for i in pk)
            rt = ", ".join(f"{v['retained'][i]:.2f}" for i in pk)
            md.append(f"| {kind} | {lv} | {ac} | {rt} |")
        md.append("")
        print(f"{split.name}: clean {clean:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    out = {"severities": sev, "targets_retained": list(TARGETS), "calibration_seed": args.seed, "git": prov,
           "command": "python study/calibrate.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    SEVERITY_FILE.write_text(json.dumps(out, indent=1) + "\n")
    res = ROOT / "study" / "results"
    (res / "calibration.json").write_text(json.dumps({**out, "detail": detail}, indent=1) + "\n")
    md.insert(3, f"Commit: `{prov['commit']}`{' (dirty: ' + ', '.join(prov['dirty']) + ')' if prov['dirty'] else ''}; targets of retained "
              f"accuracy (acc − chance)/(clean − chance): {TARGETS}; calibration seed {args.seed} (not used by any reported run).\n")
    (res / "calibration.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
