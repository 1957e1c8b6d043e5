"""Host syncs and collectives per phase of one SER training step (counted, not timed: same on CPU and GPU).

Phases of one step with the SER handle: ``views`` (``ser.views(x)``, default photometrics), ``capture``
(encoder forward of the two views under ``ser.capture()`` plus the host's own b1 images), ``loss``
(``ser.loss(pair)``: L_equiv forward, and the non-finite check when ``check_finite=True``) and
``backward`` (host + SER loss). Counted with ``benchmarks/sync_counter.py``: every op that reads a device
value back to the host (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``, ``unique``, boolean masks, ...)
and every torch.distributed collective SER issues (DDP's own gradient buckets run in C++ and are not counted).

    PYTHONPATH=$PWD python benchmarks/bench_sync.py               # one process, check_finite off and on
    PYTHONPATH=$PWD python benchmarks/bench_sync.py --world 2     # + the same step under DDP (torchrun, 2 gloo ranks)

Writes ``results/perf_sync.json`` / ``.md``; each count comes with where it was made (file:line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import save  # noqa: E402
from sync_counter import count_collectives, count_syncs  # noqa: E402

from ser_plugin import attach_ser  # noqa: E402

PHASES = ("views", "capture", "loss", "backward")


def tiny_vit(img: int):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=4, embed_dim=48,
                             depth=4, num_heads=3, num_classes=0)


def one_step(args: argparse.Namespace, check_finite: bool, distributed: bool) -> Dict[str, Any]:
    """Counts one SER step (after one warm-up step) phase by phase."""
    vit = tiny_vit(args.img)
    model = torch.nn.parallel.DistributedDataParallel(vit) if distributed else vit
    ser = attach_ser(model, args.layer, check_finite=check_finite)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, args.img, args.img, generator=gen)
    n = args.b2
    out: Dict[str, Any] = {}
    for step in range(2):
        counters = {}
        with count_syncs() as s, count_collectives() as c:
            pair = ser.views(x[:n])
        counters["views"] = (s, c)
        with count_syncs() as s, count_collectives() as c:
            with ser.capture():
                o1, o2 = model(pair.x1), model(pair.x2)
            host_out = model(x[n:])
        counters["capture"] = (s, c)
        host = (o1 - o2).pow(2).mean() + host_out.pow(2).mean()
        with count_syncs() as s, count_collectives() as c:
            ser_loss = ser.loss(pair)
        counters["loss"] = (s, c)
        with count_syncs() as s, count_collectives() as c:
            (host + ser_loss).backward()
        counters["backward"] = (s, c)
        if step == 1:
            for phase, (s, c) in counters.items():
                out[phase] = {"syncs": s.total, "syncs_by_op": dict(s.by_op), "syncs_where": s.report(),
                              "collectives": c.total, "collectives_by_op": dict(c.by_op), "elements_sent": dict(c.elements)}
    return out


def run_all(args: argparse.Namespace, distributed: bool) -> Dict[str, Any]:
    return {f"check_finite={cf}": one_step(args, cf, distributed) for cf in (False, True)}


def dist_child(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    res = run_all(args, distributed=True)
    if dist.get_rank() == 0:
        Path(args.child_out).write_text(json.dumps(res))
    dist.destroy_process_group()


def table(res: Dict[str, Any], what: str) -> str:
    lines = [f"| configuration | {' | '.join(PHASES)} | step |", "|---|" + "---|" * (len(PHASES) + 1)]
    for cfg, phases in res.items():
        counts = [phases[p][what] for p in PHASES]
        lines.append(f"| {cfg} | " + " | ".join(str(c) for c in counts) + f" | **{sum(counts)}** |")
    return "\n".join(lines)


def where(res: Dict[str, Any]) -> str:
    lines = []
    for cfg, phases in res.items():
        for p in PHASES:
            if phases[p]["syncs"]:
                lines.append(f"* {cfg}, {p}: " + phases[p]["syncs_where"].replace("\n", "; "))
    return "\n".join(lines) or "* none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--b2", type=int, default=4, help="SER images per rank")
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--world", type=int, default=1, help="2: also count the step under DDP (torchrun, gloo)")
    p.add_argument("--out", default=None)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_out:
        dist_child(args)
        return
    torch.set_num_threads(1)
    single = run_all(args, distributed=False)
    data: Dict[str, Any] = {"single_process": single, "args": vars(args)}
    md = (f"## Host syncs per phase of one SER step (one process; ViT dim 48, depth 4, {args.img} px, patch 4, "
          f"batch {args.batch}, b2 {args.b2}, layer {args.layer}, default views)\n\n" + table(single, "syncs")
          + "\n\nWhere:\n\n" + where(single) + "\n")
    if args.world > 1:
        with tempfile.TemporaryDirectory() as tmp:
            child_out = os.path.join(tmp, "rank0.json")
            env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world}", __file__,
                   "--child-out", child_out, "--batch", str(args.batch), "--b2", str(args.b2), "--img", str(args.img), "--layer", str(args.layer)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise SystemExit(f"torchrun failed:\n{proc.stderr[-4000:]}")
            ddp = json.loads(Path(child_out).read_text())
        data["ddp"] = ddp
        md += (f"\n## Under DDP, {args.world} gloo ranks on CPU (rank 0): collectives SER issues per phase\n\n" + table(ddp, "collectives")
               + "\n\nBy op: " + "; ".join(f"{cfg} {ph}: {ddp[cfg][ph]['collectives_by_op']}" for cfg in ddp for ph in PHASES if ddp[cfg][ph]["collectives"])
               + "\n\nHost syncs under DDP (rank 0):\n\n" + table(ddp, "syncs") + "\n\nWhere:\n\n" + where(ddp) + "\n")
    save("sync", data, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
