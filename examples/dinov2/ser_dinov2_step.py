"""SER on DINOv2's own ``DinoVisionTransformer`` (chunked blocks, register tokens): one forward/loss step.

Imports the model class from the user's checkout of facebookresearch/dinov2 (no xFormers needed on the CPU:
its attention falls back to plain PyTorch when xFormers is absent or ``XFORMERS_DISABLED=1``). Builds a
student and a teacher (a separate instance loaded from the student, as DINOv2's ``SSLMetaArch`` does), runs a
DINO-style [CLS] step and adds ``λ·L_equiv`` with SER's own pass (``ser.forward_loss``: the b2 views run the
student up to block L and stop). That is how SER is wired into DINOv2's trainer too, because its student pass
runs the global crops with iBOT masks (mask tokens in place of patches): those token maps are not the views'
maps, so SER needs its own unmasked pass (cost: ``2·|b2|`` images through L blocks, forward and backward).

    SER_DINOV2_DIR=/path/to/dinov2 python examples/dinov2/ser_dinov2_step.py [--ser-lam 0.5 --ser-head ...]

SER's options are the ``--ser-*`` flags of :class:`ser_plugin.SERConfig` (the same as every launcher); defaults:
:data:`DEFAULTS` — the ``dino`` recipe with scale views on (DINOv2 interpolates its position embedding), no
photometrics (the views are exact group transforms of already augmented crops), layer 2 of the tiny 4-block
model and a b2 share of 0.25 for its batch of 8.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ser_plugin import SER, SERConfig, attach_ser  # noqa: F401 (attach_ser re-used by tests)
from ser_plugin.integrations import add_ser_args, b2_count, config_from_args, recipe

ENV_VAR = "SER_DINOV2_DIR"
#: this example's SER settings: the DINO recipe, scale views on, no photometrics, sized for the tiny model below
DEFAULTS = recipe("dino", layer=2, scale=(0.7, 1.3), photometric=None, b2_share=0.25)


def import_dinov2(path: Optional[str] = None) -> Any:
    """``dinov2.models.vision_transformer`` from the user's checkout."""
    path = path or os.environ.get(ENV_VAR)
    if not path:
        raise SystemExit(f"give the DINOv2 checkout: {ENV_VAR}=/path/to/dinov2")
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "dinov2", "models", "vision_transformer.py")):
        raise SystemExit(f"{path} is not a facebookresearch/dinov2 checkout")
    if path not in sys.path:
        sys.path.insert(0, path)
    if not torch.cuda.is_available():
        os.environ.setdefault("XFORMERS_DISABLED", "1")  # plain PyTorch attention on the CPU
    from dinov2.models import vision_transformer

    return vision_transformer


def build(vt: Any, *, depth: int = 4, dim: int = 64, patch: int = 8, img: int = 32, chunks: int = 2, registers: int = 4,
          config: Optional[SERConfig] = None, **options: Any) -> Tuple[nn.Module, nn.Module, SER]:
    """Student, teacher (separate instance, loaded from the student) and SER on the student.

    Args:
        config: SER's options (default :data:`DEFAULTS`); ``options`` (SERConfig fields) override it.
    """
    kw = dict(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=4, mlp_ratio=2, block_chunks=chunks,
              num_register_tokens=registers, init_values=1e-5)
    student = vt.DinoVisionTransformer(**kw, drop_path_rate=0.1)
    teacher = vt.DinoVisionTransformer(**kw)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    # scale views: DINOv2 interpolates its position embedding, so views of other sizes work
    ser = attach_ser(student, config=config if config is not None else DEFAULTS, **options)
    return student, teacher, ser


def step(student: nn.Module, teacher: nn.Module, ser: SER, x1: torch.Tensor, x2: torch.Tensor) -> Dict[str, Any]:
    """DINO-style [CLS] cross-entropy between teacher and student on two crops, plus SER on b2 of crop 1."""
    with torch.no_grad():
        t1, t2 = (F.softmax(teacher(x) / 0.04, dim=-1) for x in (x1, x2))
    s1, s2 = (F.log_softmax(student(x) / 0.1, dim=-1) for x in (x1, x2))
    host = -0.5 * ((t1 * s2).sum(-1).mean() + (t2 * s1).sum(-1).mean())
    n = b2_count(x1.shape[0], ser.config.b2_share)
    pair = ser.views(x1[-n:])  # photometric=None: exact group action on the (normalised) crops
    term = ser.forward_loss(pair)  # SER's own pass: stops after block L
    return {"loss": host + term, "host": host, "term": term, "pair": pair}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dinov2-dir", default=None)
    add_ser_args(ap, base=DEFAULTS)
    args = ap.parse_args()
    vt = import_dinov2(args.dinov2_dir)
    torch.manual_seed(0)
    student, teacher, ser = build(vt, config=config_from_args(args, DEFAULTS))
    opt = torch.optim.AdamW(list(student.parameters()) + list(ser.parameters()), lr=1e-3)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    out = step(student, teacher, ser, x1, x2)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    print(f"{type(student).__name__}: {ser.depth} blocks in {len(student.blocks)} chunks, {student.num_register_tokens} registers; "
          f"view sizes {tuple(out['pair'].x1.shape[-2:])} / {tuple(out['pair'].x2.shape[-2:])}")
    print(f"loss {float(out['loss']):.4f} = DINO-[CLS] {float(out['host']):.4f} + λ·L_equiv ({float(ser.last_loss):.4f})")


if __name__ == "__main__":
    main()
