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
    ("mCA", "corrupted top-1 (mean)", True),
    ("mFR", "flip-rate (mean)", False),
    ("spatial_mIoU", "spatial mIoU", True),
    ("spatial_centre_err_px", "spatial centre err (px)", False),
]

ARM_LABELS = {
    "baseline": "baseline (stock ViT, host views only)",
    "views": "views only (stock ViT, b2 T_eq views, λ=0)",
    "lam0": "λ=0 control (late [CLS] + b2 views)",
    "ser": "SER (stock ViT)",
    "ser_late": "SER + late [CLS]",
    "ser_head": "SER + token head",
}


def git_commit(root: Optional[Path] = None) -> Dict[str, Any]:
    """The commit that produces a result: ``{"commit": full sha, "dirty": [changed files that affect results]}``.

    ``dirty`` lists uncommitted changes under ser_plugin/, examples/demo/ and benchmarks/study*.py (the code
    that produces the demo and study numbers); committed result files must have an empty list.
    """
    import subprocess

    root = root or Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
        st = subprocess.run(["git", "status", "--porcelain", "--", "ser_plugin", "examples/demo", "benchmarks"], cwd=root,
                            capture_output=True, text=True, timeout=20).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": []}
    dirty = [ln[3:] for ln in st if ln[3:].startswith(("ser_plugin", "examples/demo")) or "benchmarks/study" in ln[3:]]
    dirty = [d for d in dirty if not d.startswith("benchmarks/results")]
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


def markdown_table(runs: Dict[str, List[Dict[str, float]]], columns: Optional[List[Tuple[str, str, bool]]] = None) -> str:
    """``runs``: arm -> list of flattened per-seed metrics. Accuracies in %, scores as fractions; mean ± std
    (sample std over seeds) when there is more than one seed."""
    cols = [c for c in (columns or COLUMNS) if any(c[0] in r for rs in runs.values() for r in rs)]
    head = "| arm | seeds | " + " | ".join(f"{lab} {'↑' if up else '↓'}" for _, lab, up in cols) + " |"
    sep = "|---|---|" + "---|" * len(cols)
    lines = [head, sep]
    for arm, rs in runs.items():
        cells = []
        for key, _, _ in cols:
            vals = [r[key] for r in rs if key in r and math.isfinite(r[key])]
            cells.append(fmt(vals, pct=key in ("linear_top1", "knn_top1", "mCA", "spatial_mIoU")))
        lines.append(f"| {ARM_LABELS.get(arm, arm)} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def margin_in_std(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Difference of means (a - b) and that difference in units of the larger of the two seed stds (and of the
    pooled std). With one seed each the std-units are NaN."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    pooled = math.sqrt((sa**2 + sb**2) / 2)
    big = max(sa, sb)
    return {"diff": ma - mb, "in_max_std": (ma - mb) / big if big > 0 else float("nan"),
            "in_pooled_std": (ma - mb) / pooled if pooled > 0 else float("nan")}


def plot_demo(results: Dict[str, Dict[str, Any]], path: str, title: str) -> None:
    """Four panels: accuracies, equivariance scores, corrupted accuracy against severity, flip-rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results)
    fig, ax = plt.subplots(1, 4, figsize=(18, 4.2))
    w = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        r = results[arm]
        ax[0].bar(np.arange(2) + i * w, [r["linear_top1"] * 100, r["knn_top1"] * 100], w, label=arm)
        ax[1].bar(np.arange(4) + i * w, [r["eq_centred_L"], r["eq_raw_L"], r["eq_centred_last"], r["eq_raw_last"]], w, label=arm)
        rob = r.get("robustness")
        if rob:
            for j, (_kind, accs) in enumerate(rob["corrupted_acc"].items()):
                ax[2].plot(np.arange(1, len(accs) + 1) + 4 * j, np.array(accs) * 100, "o-", color=f"C{i}", label=arm if j == 0 else None)
            ax[3].bar(np.arange(len(rob["flip_rate"])) + i * w, list(rob["flip_rate"].values()), w, label=arm)
    ax[0].set_xticks(np.arange(2) + w * (len(arms) - 1) / 2, ["linear", "kNN"])
    ax[0].set_ylabel("top-1 (%)")
    ax[0].set_ylim(bottom=max(0, min(results[a]["knn_top1"] for a in arms) * 100 - 10))
    ax[1].set_xticks(np.arange(4) + w * (len(arms) - 1) / 2, ["centred@L", "raw@L", "centred@last", "raw@last"])
    ax[1].set_ylabel("equivariance score")
    first = next(iter(results.values())).get("robustness")
    if first:
        from .evaluate import CORRUPTIONS

        ax[2].set_xticks([1 + 4 * j + 1 for j in range(len(CORRUPTIONS))], list(CORRUPTIONS))
        ax[2].set_ylabel("probe top-1 on corrupted test (%)\n(severity 1-3 per corruption)")
        ax[3].set_xticks(np.arange(len(first["flip_rate"])) + w * (len(arms) - 1) / 2, [f"{k} seq." for k in first["flip_rate"]])
        ax[3].set_ylabel("flip-rate ↓")
    for a in ax:
        a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
