"""`make demo`: pretrain a small ViT with and without SER, print accuracy, equivariance and robustness side by side.

    python examples/demo/main.py                      # digits, MoCo-v3, baseline vs SER (a few minutes on 2 cores)
    python examples/demo/main.py --data ~/my_images   # your own ImageFolder (path/<class>/<image>)
    python examples/demo/main.py --smoke              # a few steps (CI)

Writes <out>/demo_results.{json,md,png}. See docs/demo.md.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))  # this checkout's ser_plugin first

import torch  # noqa: E402
from ser_demo.data import load_data  # noqa: E402
from ser_demo.report import ARM_LABELS, COLUMNS, flatten, markdown_table, plot_demo  # noqa: E402
from ser_demo.run import run_one  # noqa: E402
from ser_demo.train import ARMS, OBJECTIVES, Config  # noqa: E402


def parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--width", type=int, default=d.width, help="embedding dim of the ViT")
    p.add_argument("--depth", type=int, default=d.depth, help="number of blocks")
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--patch", type=int, default=d.patch)
    p.add_argument("--img-size", type=int, default=d.img_size, help="images are resized to this square size")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--b2-share", type=float, default=d.b2_share, help="share of each batch that gets SER's T_eq views")
    p.add_argument("--layer", type=int, default=d.layer, help="SER layer L (1..depth)")
    p.add_argument("--lam", type=float, default=None, help="λ (default: 1.0 MoCo-v3 / 0.3 DINO / 1.0 Barlow Twins)")
    p.add_argument("--tau", type=float, default=None, help="τ of the token InfoNCE (default 0.4; 0.5 DINO)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--objective", default="mocov3", choices=OBJECTIVES)
    p.add_argument("--arms", default="baseline,ser", help=f"comma-separated, from {','.join(ARMS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: half the cores, at least 1; tiny ViTs gain little from more, and on a busy "
                        "machine oversubscribed threads are several times slower)")
    p.add_argument("--data", default=None, help="ImageFolder-style directory (labels from sub-folders); default: sklearn digits")
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--spatial", action="store_true", help="also run the spatial-transfer probe (digit on a larger canvas)")
    p.add_argument("--no-robust", action="store_true", help="skip the corruption/flip-rate evaluation")
    p.add_argument("--smoke", action="store_true", help="3 steps per arm on a data subset (CI); numbers are meaningless")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads or max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) // 2)))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise SystemExit(f"unknown arm(s) {bad}; choose from {list(ARMS)}")
    t0, c0 = time.perf_counter(), time.process_time()
    split = load_data(args.data, args.img_size, args.channels)
    if args.smoke:
        split.x_train, split.y_train = split.x_train[:160], split.y_train[:160]
        split.x_test, split.y_test = split.x_test[:96], split.y_test[:96]
    c = split.x_train.shape[1]
    base = Config(
        objective=args.objective, epochs=args.epochs, width=args.width, depth=args.depth, heads=args.heads, patch=args.patch,
        img_size=args.img_size, batch=64 if args.smoke else args.batch, b2_share=args.b2_share, layer=args.layer,
        lam=args.lam, tau=args.tau, lr=args.lr, seed=args.seed, device=args.device, max_steps=3 if args.smoke else None,
        mean=split.mean, std=split.std,
    )
    if base.mean[:c] and len(base.mean) != c:
        raise SystemExit("internal: mean/std channel mismatch")
    from tqdm.auto import tqdm

    print(f"data: {split.name}  train {tuple(split.x_train.shape)}  test {tuple(split.x_test.shape)}  classes {split.classes}")
    print(f"ViT: width {base.width}, depth {base.depth}, patch {base.patch}, {base.img_size}px; {base.objective}; SER layer {base.layer}; "
          f"batch {base.batch} (b2 share {base.b2_share}); threads {torch.get_num_threads()}")
    results, records = {}, {}
    for arm in tqdm(arms, desc="arms"):
        cfg = Config(**{**base.to_dict(), "arm": arm})
        rec = run_one(cfg, split, robust=not args.no_robust, spatial=args.spatial or args.smoke, progress=tqdm)
        records[arm] = rec
        results[arm] = rec["metrics"]
        m = rec["metrics"]
        tqdm.write(f"  {arm}: linear {m['linear_top1']:.3f}  kNN {m['knn_top1']:.3f}  equiv centred@L {m['eq_centred_L']:.3f}  "
                   f"train {m['train_s']:.0f}s  eval {m['eval_s']:.0f}s")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    table = markdown_table({a: [flatten(results[a])] for a in arms})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python examples/demo/main.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    payload = {
        "command": command.strip(),
        "seed": args.seed,
        "wall_s": wall,
        "cpu_s": cpu,
        "load_avg_at_end": os.getloadavg(),
        "data": split.name,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "columns": {k: lab for k, lab, _ in COLUMNS},
        "arms": records,
    }
    (out / "demo_results.json").write_text(json.dumps(payload, indent=1))
    md = [f"# SER demo ({split.name}, {base.objective})", "", f"Command: `{payload['command']}`  ", f"Seed {args.seed}; wall time {wall:.0f} s (process CPU time {cpu:.0f} s; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads.", "", table, "",
          "Accuracies in % (linear probe / kNN on frozen [CLS] features; corrupted = the same probe on noise, blur, contrast, "
          "rotation at 3 severities each); equivariance scores are ser_plugin.equivariance_score (cosine, D4, 1 = exact) at the SER "
          "layer L and the last layer; flip-rate = share of consecutive frames whose prediction changes under gradually "
          "increasing rotation / noise.", ""]
    for arm in arms:
        md.append(f"- {arm}: {ARM_LABELS.get(arm, arm)}")
    (out / "demo_results.md").write_text("\n".join(md) + "\n")
    plot_demo(results, str(out / "demo_results.png"), f"SER demo: {split.name}, {base.objective}, layer {base.layer}/{base.depth}")
    print()
    print(table)
    print(f"\nwall time {wall:.0f} s (CPU time {cpu:.0f} s); wrote {out}/demo_results.json, .md, .png")
    return payload


if __name__ == "__main__":
    main()
