"""One arm end to end: pretrain, evaluate, return a JSON-ready record (used by the demo and the study)."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

import numpy as np

from .data import Split
from .evaluate import evaluate
from .train import Config, pretrain


def run_job(cfg_dict: Dict[str, Any], data: Optional[str], robust: bool, spatial: bool, threads: int = 1) -> Dict[str, Any]:
    """One (arm, seed) run in a worker process: loads the data itself, runs :func:`run_one` on ``threads`` torch
    threads and returns the record. Same seed -> same numbers as an in-process run (CPU, deterministic ops)."""
    import torch

    from .data import load_data

    torch.set_num_threads(threads)
    cfg = Config(**cfg_dict)
    split = load_data(data, cfg.img_size, len(cfg.mean))
    return run_one(cfg, split, robust=robust, spatial=spatial, score_layers=list(range(1, cfg.depth + 1)))


def run_one(cfg: Config, split: Split, *, robust: bool = True, spatial: bool = False, score_layers: Optional[list] = None,
            progress: Optional[Callable[..., Any]] = None, eval_kw: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    tr = pretrain(cfg, split.x_train, progress=progress)
    t1 = time.perf_counter()
    metrics = evaluate(tr.backbone, split, tr.cfg, robust=robust, spatial=spatial, score_layers=score_layers, **(eval_kw or {}))
    t2 = time.perf_counter()
    h = tr.history
    tail = h[-max(1, len(h) // 10):]
    metrics.update(
        train_s=t1 - t0,
        eval_s=t2 - t1,
        cpu_s=time.process_time() - c0,
        steps=tr.steps,
        final_inv_loss=float(np.mean([r["inv"] for r in tail])),
        final_equiv_loss=float(np.mean([r["equiv"] for r in tail])),
    )
    if tr.ser is not None:
        tr.ser.remove()
    if tr.late is not None:
        tr.late.remove()
    return {"config": tr.cfg.to_dict(), "metrics": metrics}
