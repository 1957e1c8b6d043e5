"""Benchmark 5: what capturing layer L and applying ρ_g cost in memory, in units of one token map.

Measured with :class:`common.LiveTensorBytes` (tensors created and still alive; shared storages count
once) on a small timm ViT:

* ``forward``: tensors kept alive after a forward pass (the autograd graph plus outputs), without SER
  attached, with SER attached but not capturing, and with the capture armed. The capture stores a view
  of block L's output (prefix tokens sliced off, reshaped), which autograd keeps anyway: the three
  figures should be equal.
* ``rho``: bytes that ``rho`` adds while its output is alive: the permuted map itself (one map: it is the
  input of the loss) and its gather index (int64, one per token, not per channel).
* ``loss``: peak bytes while ``ser.loss`` runs forward and backward, over the map size.

    PYTHONPATH=$PWD python benchmarks/bench_capture.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import timm  # noqa: E402
from common import LiveTensorBytes, md_table, save  # noqa: E402

from ser_plugin import GroupElement, attach_ser, rho  # noqa: E402


def retained_after_forward(model, x, ser=None, capture=False) -> int:
    with LiveTensorBytes() as m:
        if capture:
            with ser.capture():
                out = model(x)
        else:
            out = model(x)
        kept = m.current
    del out
    if ser is not None:
        ser.clear()
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=args.img, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=0)
    x = torch.rand(args.batch, 3, args.img, args.img)
    h = w = args.img // 4
    map_bytes = args.batch * 192 * h * w * 4
    res: Dict[str, float] = {"map_MiB": map_bytes / 2**20}
    res["forward_kept_no_ser_MiB"] = retained_after_forward(model, x) / 2**20
    ser = attach_ser(model, layer=args.layer, photometric=None)
    res["forward_kept_attached_MiB"] = retained_after_forward(model, x, ser) / 2**20
    res["forward_kept_capturing_MiB"] = retained_after_forward(model, x, ser, capture=True) / 2**20
    res["capture_extra_maps"] = (res["forward_kept_capturing_MiB"] - res["forward_kept_no_ser_MiB"]) / res["map_MiB"]
    # the captured map shares the block output's storage
    with ser.capture():
        out = model(x)
    fmap = ser.captures[0]
    res["capture_is_view_of_block_output"] = bool(fmap._base is not None or not fmap.is_contiguous())
    ser.clear()
    del out
    # rho: what its output and graph add
    f = torch.randn(args.batch, 192, h, w, requires_grad=True)
    g = GroupElement.random(args.batch, generator=torch.Generator().manual_seed(0))
    with LiveTensorBytes() as m:
        z = rho(f, g)
        kept = m.current
    del z
    res["rho_kept_MiB"] = kept / 2**20
    res["rho_extra_maps"] = kept / map_bytes
    # the loss on two captured maps, forward + backward
    n = max(2, args.batch // 4)
    f1 = torch.randn(n, 192, h, w, requires_grad=True)
    f2 = torch.randn(n, 192, h, w, requires_grad=True)
    gl = GroupElement.random(n, generator=torch.Generator().manual_seed(1))
    with LiveTensorBytes() as m:
        ser.criterion(f1, f2, gl).backward()
    res["loss_peak_MiB"] = m.peak / 2**20
    res["loss_peak_in_maps"] = m.peak / (2 * n * 192 * h * w * 4)
    ser.remove()
    print(json.dumps(res))
    md = (
        f"## Capture and ρ memory (ViT dim 192, depth 6, {args.img} px, patch 4, batch {args.batch}, layer {args.layer})\n\n"
        "Tensor bytes created and still alive (LiveTensorBytes). capture_extra_maps: extra bytes kept after a "
        "captured forward, in token maps; rho_extra_maps: bytes rho's output and graph keep, in maps "
        "(1 = its output, which the loss consumes); loss_peak_in_maps: peak of L_equiv forward+backward over the "
        f"two input maps ({n} images).\n\n"
        + md_table([{"figure": k, "value": v} for k, v in res.items()], ["figure", "value"]) + "\n"
    )
    save("capture", {"results": res, "args": vars(args)}, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
