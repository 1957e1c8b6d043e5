"""One real MoCo-v3 training step on the CPU through the SER adapter; prints a JSON report.

Used by tests/test_adapter_mocov3.py (run in a subprocess, because the host's modules are patched). It runs
the checkout's own ``main_moco.train`` (wrapped by the adapter) on a tiny VisionTransformerMoCo and tiny
generated images, with a gloo process group of world size 1 and ``Tensor.cuda`` made a no-op (the host's
loss calls ``.cuda()``). Then it measures, on a fresh batch:

* ``ser_grad_norms``: per block, the gradient norm of the SER term alone (autograd.grad of λ·L_equiv);
* hooks on the online and the momentum encoder;
* ``lam0_*``: the adapter's loss with λ=0 and the unmodified host's loss on the same inputs and weights.

    SER_MOCOV3_DIR=/path/to/moco-v3 python examples/moco_v3/smoke_step.py
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from functools import partial

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # examples/: the smoke steps' shared helpers
import _smoke  # noqa: E402
import main_moco_ser as adapter  # noqa: E402


def main() -> None:
    _smoke.main(run, port_base=29500)


def run(rank: int, opts: argparse.Namespace) -> None:
    torch.manual_seed(0)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the host's loss moves labels with .cuda()
    dist.init_process_group("gloo", rank=rank, world_size=opts.world_size)
    torch.manual_seed(rank)

    main_moco, builder, loader = adapter.import_mocov3()
    import moco.optimizer
    import vits
    from torchvision import transforms

    adapter.add_ser_arguments(main_moco.parser)  # the launcher's command line: MoCo-v3's parser plus --ser-*
    args = main_moco.parser.parse_args(["unused", "-a", "vit_small", "-b", "8", "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e-3",
                                        "--ser-layer", "5", "--ser-b2-share", "0.5", "--ser-head"])
    c = adapter.ser_config(args)  # recipe (mocov3) -> flags given; ImageNet normalisation for the views
    ser_integ = adapter._ser()[1]
    cli_ok = (c.layer, c.lam, c.tau, c.b2_share, c.head, c.late_cls, c.mean) == (5, 1.0, 0.3, 0.5, True, False, ser_integ.IMAGENET_MEAN)
    args.moco_dir, args.gpu, args.rank, args.crop_min = os.environ[adapter.ENV_VAR], None, 0, 0.5
    args.ser_layer, args.ser_lam, args.ser_tau, args.ser_b2_share = opts.layer, 1.0, 0.3, 0.25
    args.ser_head, args.ser_late_cls = opts.head, opts.late_cls
    plain_cls = builder.MoCo_ViT
    adapter.install(args)
    moco_ser_cls = builder.MoCo_ViT
    size, depth = 32, 4
    enc = partial(vits.VisionTransformerMoCo, img_size=size, patch_size=8, embed_dim=64, depth=depth, num_heads=4, mlp_ratio=2, qkv_bias=True)
    model = moco_ser_cls(enc, 32, 64, 0.2)  # same call as main_worker: (encoder factory, dim, mlp_dim, T)
    ddp = torch.nn.parallel.DistributedDataParallel(model)

    # the adapter's transform class, with small crops in place of main_moco's 224
    aug = [transforms.RandomResizedCrop(size, scale=(0.5, 1.0)), transforms.ToTensor(), transforms.Normalize(adapter._ser()[1].IMAGENET_MEAN, adapter._ser()[1].IMAGENET_STD)]
    two = loader.TwoCropsTransform(transforms.Compose(aug), transforms.Compose(aug))
    two.base_crop = adapter._ser()[1].BaseCrop(size, (0.5, 1.0))
    data = torch.utils.data.DataLoader(_smoke.Images(8, 48, two, seed=rank), batch_size=8, drop_last=True)
    optimizer = moco.optimizer.LARS(ddp.parameters(), 1e-3, weight_decay=1e-6, momentum=0.9)  # as main_worker
    scaler = torch.cuda.amp.GradScaler(enabled=False)
    head_before = [p.detach().clone() for p in model.ser.parameters()]
    import tempfile

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=tempfile.mkdtemp(prefix="ser_mocov3_tb_"))
    main_moco.train(data, ddp, optimizer, scaler, writer, 0, args)  # the host's train loop, wrapped by the adapter
    step_loss = float(model.last_host_loss + model.last_ser_term.detach())
    ser_loss = float(model.ser.last_loss)
    head_in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]} >= {id(p) for p in model.ser.parameters()}
    head_moved = [bool((a != b.detach()).any()) for a, b in zip(head_before, model.ser.parameters())]
    if opts.world_size > 1:  # DDP over gloo: every rank must end the step with the same weights, SER's included
        params = list(model.base_encoder.parameters()) + list(model.predictor.parameters()) + list(model.ser.parameters())
        _smoke.report_ranks(rank, opts.world_size, params, model.ser, ser_loss, head_moved)
        return

    # SER term's own gradient on a fresh batch
    images, _ = next(iter(adapter.SERBatches(data, ddp)))
    x1, x2 = images
    pair = model.ser_pair
    model.zero_grad(set_to_none=True)
    loss = model(x1, x2, 0.99)
    norms = _smoke.block_grad_norms(model.last_ser_term, list(model.base_encoder.blocks))

    # lambda = 0: the adapter's loss equals the unmodified host's loss on the same inputs and weights
    cfg0 = adapter.ser_config(args).replace(lam=0.0)
    ser0 = adapter.ser_moco_class(plain_cls, cfg0)(enc, 32, 64, 0.2)
    plain = plain_cls(enc, 32, 64, 0.2)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("ser.")}
    ser0.load_state_dict(state, strict=False)
    plain.load_state_dict(state)
    if opts.late_cls:  # the same architecture as the adapter's, without SER
        from ser_plugin import convert_late_cls

        convert_late_cls(plain.base_encoder, opts.layer)
        convert_late_cls(plain.momentum_encoder, opts.layer)
    ser0.ser_pair = pair
    from ser_plugin.integrations import replace_rows

    with torch.no_grad():
        l_ser0 = float(ser0(x1, x2, 0.99))
        l_plain = float(plain(replace_rows(x1, pair.x1), replace_rows(x2, pair.x2), 0.99))
        l_ser1 = float(loss)
    report = {
        "step_loss": step_loss,
        "ser_loss": ser_loss,
        "ser_loss_finite": math.isfinite(ser_loss),
        "layer": opts.layer,
        "depth": depth,
        "ser_grad_norms": norms,
        "online_hook_blocks": [i + 1 for i, b in enumerate(model.base_encoder.blocks) if _smoke.capture_hooks([b])],
        "momentum_capture_hooks": _smoke.capture_hooks(model.momentum_encoder.blocks),
        "online_capture_hooks": _smoke.capture_hooks(model.base_encoder.blocks),
        "momentum_has_ser_params": any(n.startswith("momentum_encoder.") and "ser" in n for n, _ in model.named_parameters()),
        "ser_params": sum(p.numel() for p in model.ser.parameters()),
        "ser_params_in_optimizer": bool(head_in_opt),
        "ser_params_updated": all(head_moved) if head_moved else None,
        "b2": len(pair.g1),
        "lam0_adapter_loss": l_ser0,
        "lam0_host_loss": l_plain,
        "lam1_loss": l_ser1,
        "timm": __import__("timm").__version__,
        "cli_ok": cli_ok,
    }
    dist.destroy_process_group()
    _smoke.report(report)


if __name__ == "__main__":
    main()
