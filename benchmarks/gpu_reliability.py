"""Reliability checks that need a GPU: CUDA fp16 autocast + GradScaler, bf16 autocast, and the DDP equivalence
(2 processes equal 1 process on the global batch) with NCCL.

Prepared for a session with a CUDA device; it writes one JSON file and prints a summary. On CPU it runs the
same code paths with ``--device cpu`` (bf16 autocast, gloo) so the script itself is tested where no GPU is.

    python benchmarks/gpu_reliability.py                       # CUDA: fp16+GradScaler, bf16, DDP/NCCL
    python benchmarks/gpu_reliability.py --device cpu --quick  # the CPU smoke run of the same script

Checks (each reports pass/fail and the numbers behind it):

* ``fp16_gradscaler``: ViT-S/16-sized model at 224 px, ``--steps`` training steps with SER under
  ``torch.autocast('cuda', torch.float16)`` and ``torch.amp.GradScaler``: every loss finite, no step skipped
  after the first few, first-step loss within 2% of fp32 on the same weights and views.
* ``bf16``: the same under bf16 autocast, no scaler.
* ``ddp``: one SER step of a tiny ViT on 2 processes (4 images each) equals one process on the 8 images:
  losses and gradients within 1e-4 (TF32 off). NCCL needs one GPU per rank; with a single GPU the check tries
  NCCL and reports the error, then runs gloo with the CUDA tensors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ser_plugin import GroupElement, ViewPair, act_image, attach_ser  # noqa: E402


def vit(size: str, seed: int = 0, img: int = 224):
    import timm

    torch.manual_seed(seed)
    if size == "small":
        return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=img)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=0)


def fixed_pair(n: int, img: int, seed: int, device: str) -> ViewPair:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, img, img, generator=g)
    e = [GroupElement.from_d4(torch.randint(0, 4, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)) for _ in range(2)]
    return ViewPair(act_image(x, e[0]), act_image(x, e[1]), e[0], e[1]).to(device)


def ser_step(model, ser, pair, dtype=None):
    device = pair.x1.device.type
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        with ser.capture():
            o1, o2 = model(pair.x1), model(pair.x2)
        host = (o1.float() - o2.float()).pow(2).mean()
        ser_loss = ser.loss(pair)
    return host, ser_loss


def amp_check(device: str, dtype: torch.dtype, steps: int, batch: int, img: int, size: str) -> dict:
    model = vit(size, img=img).to(device)
    ser = attach_ser(model, layer=6 if size == "small" else 2, photometric=None)
    pair = fixed_pair(batch, img, 1, device)
    # fp32 reference on the same weights and views
    h32, s32 = ser_step(model, ser, pair)
    ref = (h32 + s32).item()
    model.zero_grad(set_to_none=True)
    use_scaler = dtype == torch.float16
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=use_scaler)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses, scales, skipped = [], [], 0
    t0 = time.time()
    for step in range(steps):
        pair = fixed_pair(batch, img, 100 + step, device)
        h, s = ser_step(model, ser, pair, dtype)
        loss = h + s
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        before = scaler.get_scale() if use_scaler else 1.0
        scaler.step(opt)
        scaler.update()
        if use_scaler:
            scales.append(scaler.get_scale())
            skipped += int(scaler.get_scale() < before and step >= 5)
    model2 = vit(size, img=img).to(device)
    ser2 = attach_ser(model2, layer=6 if size == "small" else 2, photometric=None)
    h, s = ser_step(model2, ser2, fixed_pair(batch, img, 1, device), dtype)
    rel = abs((h + s).item() - ref) / abs(ref)
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    return {
        "dtype": str(dtype), "steps": steps, "batch": batch, "img": img, "model": size,
        "fp32_loss": ref, "low_precision_loss": (h + s).item(), "rel_diff_first_step": rel,
        "all_losses_finite": finite, "loss_first_last": [losses[0], losses[-1]],
        "grad_scale_last": scales[-1] if scales else None, "skipped_steps_after_5": skipped,
        "seconds": round(time.time() - t0, 2),
        "pass": bool(finite and rel < 0.02 and skipped <= steps // 10),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, backend: str, device: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
        if device.startswith("cuda") and torch.cuda.device_count() >= world:
            device = f"cuda:{rank}"  # NCCL: one GPU per rank
        model = vit("tiny").to(device)
        ser = attach_ser(model, 2, photometric=None)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.device(device).index or 0] if device.startswith("cuda") else None)
        pair = fixed_pair(8, 16, 11, device)
        per = 8 // world
        sl = ViewPair(pair.x1[rank * per : (rank + 1) * per], pair.x2[rank * per : (rank + 1) * per], pair.g1[rank * per : (rank + 1) * per], pair.g2[rank * per : (rank + 1) * per])
        with ser.capture():
            o1, o2 = ddp(sl.x1), ddp(sl.x2)
        host = (o1 - o2).pow(2).mean()
        s = ser.loss(sl)
        (host + s).backward()
        torch.save({"device": device, "ser": s.item(), "host": host.item(), "grads": {n: p.grad.detach().cpu() for n, p in model.named_parameters()}}, f"{out}.rank{rank}")
        dist.destroy_process_group()
    except Exception:
        with open(f"{out}.rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())


def ddp_check(device: str, backend: str, tmp: str) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = os.path.join(tmp, f"ddp_{backend}")
    for f in os.listdir(tmp):
        if f.startswith(f"ddp_{backend}"):
            os.remove(os.path.join(tmp, f))
    mp.spawn(_ddp_worker, args=(2, _free_port(), backend, device, out), nprocs=2, join=True)
    errs = [open(f"{out}.rank{r}.err").read() for r in (0, 1) if os.path.exists(f"{out}.rank{r}.err")]
    if errs:
        return {"backend": backend, "pass": False, "error": errs[0][-2000:]}
    res = [torch.load(f"{out}.rank{r}", weights_only=False) for r in (0, 1)]
    model = vit("tiny").to(device)
    ser = attach_ser(model, 2, photometric=None)
    pair = fixed_pair(8, 16, 11, device)
    with ser.capture():
        o1, o2 = model(pair.x1), model(pair.x2)
    host = (o1 - o2).pow(2).mean()
    s = ser.loss(pair)
    (host + s).backward()
    ref = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
    loss_diff = abs((res[0]["ser"] + res[1]["ser"]) / 2 - s.item())
    grad_diff = max((res[r]["grads"][n] - ref[n]).abs().max().item() for r in (0, 1) for n in ref)
    return {"backend": backend, "device": device, "ser_loss_1proc": s.item(), "ser_loss_2proc_mean": (res[0]["ser"] + res[1]["ser"]) / 2,
            "abs_loss_diff": loss_diff, "max_abs_grad_diff": grad_diff, "pass": bool(loss_diff < 1e-4 and grad_diff < 1e-4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps (CPU smoke run)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_reliability.json"))
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or use --device cpu --quick for the CPU smoke run")
    size, img = ("tiny", 16) if args.quick else ("small", 224)
    steps = 5 if args.quick else args.steps
    batch = 8 if args.quick else args.batch
    report = {"torch": torch.__version__, "device": args.device,
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None, "command": " ".join(sys.argv)}
    if args.device.startswith("cuda"):
        report["fp16_gradscaler"] = amp_check(args.device, torch.float16, steps, batch, img, size)
    report["bf16"] = amp_check(args.device, torch.bfloat16, steps, batch, img, size)
    tmp = os.path.join(ROOT, "benchmarks", "results", "tmp")
    os.makedirs(tmp, exist_ok=True)
    if args.device.startswith("cuda"):
        report["ddp_nccl"] = ddp_check(args.device, "nccl", tmp)
        if not report["ddp_nccl"]["pass"] and torch.cuda.device_count() < 2:
            report["ddp_nccl"]["note"] = "NCCL refuses two ranks on one GPU; gloo with CUDA tensors below"
            report["ddp_gloo_cuda"] = ddp_check(args.device, "gloo", tmp)
    else:
        report["ddp_gloo"] = ddp_check("cpu", "gloo", tmp)
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    for k, v in report.items():
        if isinstance(v, dict):
            print(f"{k:16s} {'PASS' if v.get('pass') else 'FAIL'}  " + ", ".join(f"{a}={b}" for a, b in v.items() if a not in ("pass", "error")))
            if "error" in v:
                print("   ", v["error"].strip().splitlines()[-1])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
