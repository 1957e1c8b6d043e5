"""Tables (markdown / terminal) and plots shared by the demo and the study."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

# (key in a run's metrics, column label, higher is better)
COLUMNS: List[Tuple[str, str, bool]] = [
    ("linear_top1", "linear top-1", True),
    ("knn_top1", "kNN top-1", True),
    ("eq_centred_L", "equiv. centred @L", True),
    ("eq_raw_L", "equiv. raw @L", True),
    ("eq_centred_last", "equiv. centred @last", True),
    ("eq_raw_last", "equiv. raw @last", True),
    ("rot_equiv_L", "rotation equiv. @L (protocol)", True),
    ("cls_inv_d4", "[CLS] 1−cos under D4", False),
    ("mCA", "corrupted top-1 (mean)", True),
    ("mFR", "flip probability (mean)", False),
    ("mD4", "D4-moved top-1", True),
    ("spatial_mask_IoU", "spatial mask IoU", True),
    ("spatial_roi_top1", "spatial RoI top-1", True),
]

PCT = ("linear_top1", "knn_top1", "mCA", "mD4", "spatial_roi_top1")

ARM_LABELS = {
    "baseline": "baseline (stock ViT, host views only)",
    "views": "views only (stock ViT, b2 T_eq views, λ=0)",
    "lam0": "λ=0 control (late [CLS] + b2 views)",
    "ser": "SER (stock ViT)",
    "ser_late": "SER + late [CLS]",
    "ser_head": "SER + token head",
}
BACKBONE_NAMES = {"vit": "ViT", "resnet": "ResNet", "convnext": "ConvNeXt", "swin": "Swin"}


def arm_label(arm: str, backbone: str = "vit") -> str:
    """The arm's label in tables, naming the demo's backbone family (``"SER (stock ResNet)"``)."""
    return ARM_LABELS.get(arm, arm).replace("stock ViT", f"stock {BACKBONE_NAMES.get(backbone, backbone)}")


def git_commit(root: Optional[Path] = None) -> Dict[str, Any]:
    """The commit that produces a result: ``{"commit": full sha, "dirty": [changed files that affect results]}``.

    ``dirty`` lists uncommitted changes under ser_plugin/, examples/demo/ and study/*.py (the code
    that produces the demo and study numbers); committed result files must have an empty list.
    """
    import subprocess

    root = root or Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
        st = subprocess.run(["git", "status", "--porcelain", "--", "ser_plugin", "examples/demo", "study"], cwd=root,
                            capture_output=True, text=True, timeout=20).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": []}
    dirty = [ln[3:] for ln in st if ln[3:].startswith(("ser_plugin", "examples/demo", "study/"))
             and not ln[3:].startswith(("examples/demo/results", "study/results", "study/README"))]
    return {"commit": sha or None, "dirty": dirty}


def welch(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> Dict[str, Any]:
    """Welch's t-test of mean(a) vs mean(b) (unequal variances, two-sided): ``{"diff", "p", "verdict"}``.

    ``verdict`` is ``"higher"`` / ``"lower"`` when p < ``alpha`` and ``"within noise"`` otherwise (also when
    either side has fewer than 2 values, or both have zero variance and equal means).
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "p": float("nan"), "verdict": "within noise"}
    if a.std() == 0 and b.std() == 0:
        p = 1.0 if diff == 0 else 0.0
    else:
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    verdict = "within noise" if not p < alpha else ("higher" if diff > 0 else "lower")
    return {"diff": diff, "p": p, "verdict": verdict}


def flatten(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The scalar metrics of one run (nested spatial numbers lifted to ``spatial_*``)."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    for k, v in (metrics.get("spatial") or {}).items():
        out[f"spatial_{k}"] = float(v)
    return out


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(values: Sequence[float], pct: bool) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    k = 100.0 if pct else 1.0
    d = 1 if pct else 3
    return f"{m * k:.{d}f}" if len(values) == 1 else f"{m * k:.{d}f} ± {s * k:.{d}f}"


def md_table(rows: Sequence[Dict[str, Any]], cols: Sequence[str], fmt: Optional[Any] = None) -> str:
    """The one markdown-table helper of the demo and the study: a header from ``cols`` and one line per row
    (``row.get(col, "")``, floats as ``%.5g`` unless ``fmt(value)`` is given). Same signature as
    benchmarks/common.py's ``md_table``, which can import this one."""
    def cell(v: Any) -> str:
        if fmt is not None:
            return fmt(v)
        return f"{v:.5g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown_table(runs: Dict[str, List[Dict[str, float]]], columns: Optional[List[Tuple[str, str, bool]]] = None, backbone: str = "vit") -> str:
    """``runs``: arm -> list of flattened per-seed metrics. Accuracies in %, scores as fractions; mean ± std
    (sample std over seeds) when there is more than one seed."""
    cols = [c for c in (columns or COLUMNS) if any(c[0] in r for rs in runs.values() for r in rs)]
    names = ["arm", "seeds"] + [f"{lab} {'↑' if up else '↓'}" for _, lab, up in cols]
    rows = []
    for arm, rs in runs.items():
        row: Dict[str, Any] = {"arm": arm_label(arm, backbone), "seeds": str(len(rs))}
        for (key, _, _), name in zip(cols, names[2:]):
            vals = [r[key] for r in rs if key in r and math.isfinite(r[key])]
            row[name] = fmt(vals, pct=key in PCT)
        rows.append(row)
    return md_table(rows, names)


def margin_in_std(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Difference of means (a - b) and that difference in units of the larger of the two seed stds (and of the
    pooled std). With one seed each the std-units are NaN."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    pooled = math.sqrt((sa**2 + sb**2) / 2)
    big = max(sa, sb)
    return {"diff": ma - mb, "in_max_std": (ma - mb) / big if big > 0 else float("nan"),
            "in_pooled_std": (ma - mb) / pooled if pooled > 0 else float("nan")}


def plot_demo(runs: Dict[str, List[Dict[str, Any]]], path: str, title: str) -> None:
    """Four panels, mean ± std over seeds: accuracies, equivariance, corrupted top-1 per corruption (mean over its
    severities), flip probability per sequence. ``runs``: arm -> list of per-seed metrics (unflattened). Uses
    matplotlib's object API (no pyplot state, no process-wide backend switch)."""
    from matplotlib.figure import Figure

    arms = list(runs)
    fig = Figure(figsize=(18, 4.2))
    ax = [fig.add_subplot(1, 4, i + 1) for i in range(4)]
    w = 0.8 / max(len(arms), 1)

    def bars(a: Any, i: int, arm: str, per_seed: List[List[float]], scale: float = 1.0) -> None:
        v = np.asarray(per_seed, dtype=float) * scale  # (seeds, bars)
        sd = v.std(axis=0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1])
        a.bar(np.arange(v.shape[1]) + i * w, v.mean(0), w, yerr=sd, capsize=3, label=arm, color=f"C{i}")

    first = runs[arms[0]][0]
    kinds = list((first.get("robustness") or {}).get("corrupted_acc", {}))
    seqs = list((first.get("robustness") or {}).get("flip_rate", {}))
    for i, arm in enumerate(arms):
        rs = runs[arm]
        bars(ax[0], i, arm, [[r["linear_top1"], r["knn_top1"]] for r in rs], 100)
        bars(ax[1], i, arm, [[r["eq_centred_L"], r["eq_centred_last"], r.get("rot_equiv_L", float("nan"))] for r in rs])
        if kinds:
            bars(ax[2], i, arm, [[float(np.mean(r["robustness"]["corrupted_acc"][k])) for k in kinds] + [r["mD4"]] for r in rs], 100)
            bars(ax[3], i, arm, [[r["robustness"]["flip_rate"][k] for k in seqs] for r in rs])
    off = w * (len(arms) - 1) / 2
    ax[0].set_xticks(np.arange(2) + off, ["linear", "kNN"])
    ax[0].set_ylabel("top-1 (%)")
    ax[1].set_xticks(np.arange(3) + off, ["centred@L", "centred@last", "rotation@L\n(protocol)"])
    ax[1].set_ylabel("equivariance (cosine, 1 = exact)")
    if kinds:
        ax[2].set_xticks(np.arange(len(kinds) + 1) + off, kinds + ["D4 moved"], rotation=45, ha="right", fontsize=7)
        ax[2].set_ylabel("probe top-1 on corrupted test (%)\n(mean over 3 calibrated severities)")
        ax[3].set_xticks(np.arange(len(seqs)) + off, [f"{k} seq." for k in seqs])
        ax[3].set_ylabel("flip probability ↓")
    for a in ax:
        a.legend(fontsize=7)
    fig.suptitle(title + " (bars: mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
