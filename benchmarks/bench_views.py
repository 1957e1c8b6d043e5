"""Views benchmark: host syncs of making views, and CPU time of the batched photometrics vs kornia's modules.

1. Host syncs (``benchmarks/sync_counter.py``) of one ``EquivariantViews`` call per configuration, and of
   kornia's augmentation modules doing MoCo-v3's photometrics (what the default used before). Run the same
   script against another checkout of ser_plugin to compare (``PYTHONPATH=<checkout>``; the script falls
   back to what that version supports).
2. CPU time of the default photometrics of both views: the batched on-device pipeline
   (:class:`ser_plugin.photometric.BatchedPhotometric`) vs the kornia module pipeline
   (``ColorJitter -> RandomGrayscale -> RandomGaussianBlur [-> RandomSolarize]``), alternating rounds, medians.

    PYTHONPATH=$PWD python benchmarks/bench_views.py                  # counts + timing at 64 x 3 x 96 x 96
    PYTHONPATH=$PWD python benchmarks/bench_views.py --batch 32 --size 224 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from sync_counter import count_syncs, format_counts  # noqa: E402

import ser_plugin  # noqa: E402
from ser_plugin.views import EquivariantViews  # noqa: E402


def kornia_mocov3(image_size: int, second: bool) -> nn.Module:
    """MoCo-v3's photometrics with kornia's augmentation modules (the pre-batched default)."""
    import kornia.augmentation as K

    k = max(3, int(round(0.1 * image_size)) | 1)
    augs: List[nn.Module] = [
        K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.1 if second else 1.0),
    ]
    if second:
        augs.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.2))
    return nn.Sequential(*augs)


def _views(**kw: Any) -> EquivariantViews:
    try:
        return EquivariantViews(**kw)
    except TypeError:  # an older ser_plugin without the newer options
        kw.pop("pairing", None)
        kw.pop("image_interpolation", None)
        if kw.get("photometric") == "authors":
            raise
        return EquivariantViews(**kw)


CONFIGS: Dict[str, Dict[str, Any]] = {
    "default (D4, mocov3)": dict(patch_size=16),
    "D4 + scale (0.7, 1.3), mocov3": dict(patch_size=16, scale=(0.7, 1.3)),
    "authors preset (scale, authors photometrics/pairing, bicubic)": dict(
        patch_size=16, scale=(0.7, 1.3), photometric="authors", pairing="authors", image_interpolation="bicubic"),
    "D4, photometric=None": dict(patch_size=16, photometric=None),
}


def count(batch: int, size: int) -> Dict[str, Any]:
    x = torch.rand(batch, 3, size, size)
    out: Dict[str, Any] = {}
    for name, kw in CONFIGS.items():
        try:
            views = _views(**kw)
        except Exception as e:  # noqa: BLE001 - a version without this option
            out[name] = f"n/a ({type(e).__name__})"
            continue
        g = torch.Generator().manual_seed(0)
        views(x, generator=g)  # warm (kernel sizes, lazy builds)
        with count_syncs() as c:
            views(x, generator=g)
        out[name] = c
    for second in (False, True):
        m = kornia_mocov3(size, second)
        m(x)
        with count_syncs() as c:
            m(x)
        out[f"kornia modules, MoCo-v3 view {2 if second else 1}"] = c
    return out


def timing(batch: int, size: int, repeats: int) -> Dict[str, Any]:
    from ser_plugin.photometric import BatchedPhotometric

    x = torch.rand(batch, 3, size, size)
    new = [BatchedPhotometric("mocov3", s) for s in (False, True)]
    old = [kornia_mocov3(size, s) for s in (False, True)]
    g = torch.Generator().manual_seed(0)
    fns: Dict[str, Callable[[], Any]] = {
        "kornia modules": lambda: [m(x) for m in old],
        "batched": lambda: [m(x, generator=g) for m in new],
    }
    one = x[:1]
    fns["kornia modules, one image"] = lambda: [m(one) for m in old]
    fns["batched, one image"] = lambda: [m(one, generator=g) for m in new]
    cpu: Dict[str, List[float]] = {}
    with torch.no_grad():
        wall = common.alternate_timing(fns, repeats=repeats, warmup=1, cpu_times=cpu)
    return {
        "wall_median_s": {k: common.median(v) for k, v in wall.items()},
        "cpu_median_s": {k: common.median(v) for k, v in cpu.items()},
        "ratio_wall": common.ratio_of_medians_and_paired(wall, "kornia modules", "batched"),
        "ratio_cpu": common.ratio_of_medians_and_paired(cpu, "kornia modules", "batched"),
        "ratio_cpu_one_image": common.ratio_of_medians_and_paired(cpu, "kornia modules, one image", "batched, one image"),
    }


def main(argv: Any = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--counts-only", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared machine)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    counts = count(args.batch, args.size)
    table = format_counts({k: v for k, v in counts.items() if not isinstance(v, str)})
    where = os.path.relpath(os.path.dirname(ser_plugin.__file__), common.ROOT)
    print(f"ser_plugin from {where}")
    print(table)
    for k, v in counts.items():
        if isinstance(v, str):
            print(f"{k}: {v}")
    data: Dict[str, Any] = {"batch": args.batch, "size": args.size, "threads": args.threads,
                            "syncs": {k: (v if isinstance(v, str) else {"total": v.total, "by_op": v.by_op}) for k, v in counts.items()}}
    md = f"Host syncs of one views call, batch {args.batch} x 3 x {args.size} x {args.size} (ser_plugin at {where}):\n\n{table}\n"
    if not args.counts_only:
        t = timing(args.batch, args.size, args.repeats)
        data["timing"] = t
        line = (f"Both views' default photometrics, {args.repeats} alternating rounds, {args.threads} thread(s): kornia modules "
                f"{t['cpu_median_s']['kornia modules'] * 1e3:.1f} ms CPU, batched {t['cpu_median_s']['batched'] * 1e3:.1f} ms CPU; "
                f"batched / kornia = {t['ratio_cpu']['ratio_of_medians']:.3f} (CPU time, ratio of medians), "
                f"{t['ratio_cpu']['median_paired_ratio']:.3f} (median paired), wall {t['ratio_wall']['ratio_of_medians']:.3f}. "
                f"One image (a loader's ViewTransform): kornia {t['cpu_median_s']['kornia modules, one image'] * 1e3:.2f} ms, "
                f"batched {t['cpu_median_s']['batched, one image'] * 1e3:.2f} ms CPU, ratio {t['ratio_cpu_one_image']['ratio_of_medians']:.3f}.")
        print(line)
        md += "\n" + line + "\n"
    if not args.no_save:
        print("wrote", common.save("views", data, md))


if __name__ == "__main__":
    main()
