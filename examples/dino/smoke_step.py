"""One real DINO training step on the CPU through the SER adapter; prints a JSON report.

Used by tests/test_adapter_dino.py (in a subprocess: host modules are patched). Builds student and teacher as
``train_dino`` does (tiny DINO ``VisionTransformer``, ``MultiCropWrapper``, ``DINOHead``, DDP over a gloo group
of world size 1, strict ``load_state_dict`` of the teacher from the student), the optimizer from the
(adapter-wrapped) ``utils.get_params_groups``, and runs the checkout's ``train_one_epoch`` (adapter-wrapped) on
tiny generated images with 2 global and 2 local crops. ``.cuda``/``cuda.synchronize``/metric sync are no-ops.

    SER_DINO_DIR=/path/to/dino python examples/dino/smoke_step.py
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # examples/: the smoke steps' shared helpers
import _smoke  # noqa: E402
import main_dino_ser as adapter  # noqa: E402


def main() -> None:
    _smoke.main(run, port_base=30500)


def run(rank: int, opts: argparse.Namespace) -> None:
    torch.manual_seed(0)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    dist.init_process_group("gloo", rank=rank, world_size=opts.world_size)
    torch.manual_seed(rank)

    main_dino = adapter.import_dino()
    from functools import partial

    import utils
    import vision_transformer as vits

    utils.MetricLogger.synchronize_between_processes = lambda self: None
    # the launcher's command line: DINO's own parser plus the SER flags (torch.hub.list needs the network)
    torch.hub.list = lambda *a, **k: []
    cli = adapter.parse_args(["--arch", "vit_small", "--data_path", "x", "--ser-layer", "4", "--ser-lam", "0.5", "--ser-late-cls"])
    c = adapter.ser_config(cli)  # recipe (dino) -> flags given
    cli_ok = (c.layer, c.lam, c.tau, c.b2_share, c.late_cls, cli.arch, cli.batch_size_per_gpu) == (4, 0.5, 0.5, 0.01, True, "vit_small", 64)
    args = argparse.Namespace(
        dino_dir=os.environ[adapter.ENV_VAR], ser_layer=opts.layer, ser_lam=0.3, ser_tau=0.5, ser_b2_share=0.25,
        ser_head=opts.head, ser_late_cls=opts.late_cls, epochs=1, clip_grad=3.0, freeze_last_layer=1,
    )
    plain_aug = main_dino.DataAugmentationDINO
    state = adapter.install(args)
    depth, out_dim, ncrops = 4, 64, 4
    vit = partial(vits.VisionTransformer, patch_size=8, embed_dim=64, depth=depth, num_heads=4, mlp_ratio=2, qkv_bias=True,
                  norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    head = partial(vits.DINOHead, 64, out_dim, hidden_dim=64, bottleneck_dim=32)
    student = utils.MultiCropWrapper(vit(drop_path_rate=0.1), head())
    teacher = utils.MultiCropWrapper(vit(), head(use_bn=False))
    student = torch.nn.parallel.DistributedDataParallel(student)
    teacher_without_ddp = teacher
    params_groups = utils.get_params_groups(student)  # adapter: attaches SER to the student backbone here
    teacher_without_ddp.load_state_dict(student.module.state_dict())  # strict, as in train_dino
    for p in teacher.parameters():
        p.requires_grad = False
    dino_loss = main_dino.DINOLoss(out_dim, ncrops, 0.04, 0.04, 0, 1)
    optimizer = torch.optim.AdamW(params_groups)

    aug = main_dino.DataAugmentationDINO((0.5, 1.0), (0.2, 0.5), ncrops - 2)  # the adapter's subclass
    for t, s in ((aug.global_transfo1, 32), (aug.global_transfo2, 32), (aug.local_transfo, 16)):
        t.transforms[0].size = (s, s)  # main_dino crops 224/96; tiny sizes here
    from ser_plugin.integrations import BaseCrop

    aug.base_crop = BaseCrop(32, (0.5, 1.0))
    data = torch.utils.data.DataLoader(_smoke.Images(8, 48, aug, seed=rank), batch_size=8, drop_last=True)
    lr = utils.cosine_scheduler(5e-4, 1e-6, 1, len(data))
    wd = utils.cosine_scheduler(0.04, 0.4, 1, len(data))
    mom = utils.cosine_scheduler(0.996, 1, 1, len(data))
    ser = state.ser
    head_before = [p.detach().clone() for p in ser.parameters()]
    stats = main_dino.train_one_epoch(student, teacher, teacher_without_ddp, dino_loss, data, optimizer, lr, wd, mom, 0, None, args)
    ser_loss = float(ser.last_loss)
    head_in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]} >= {id(p) for p in ser.parameters()}
    head_moved = [bool((a != b.detach()).any()) for a, b in zip(head_before, ser.parameters())]
    if opts.world_size > 1:  # DDP over gloo: every rank must end the step with the same weights, SER's included
        _smoke.report_ranks(rank, opts.world_size, list(student.module.parameters()) + list(ser.parameters()), ser, ser_loss, head_moved)
        return

    # the SER term's own gradient, on a fresh batch through the adapter's loader and loss wrappers
    gen = iter(adapter.SERBatches(data, state))
    images, _ = next(gen)
    wrapped = adapter.DINOLossWithSER(dino_loss, state)
    center = dino_loss.center.clone()
    t_out = teacher(images[:2])
    torch.manual_seed(1)
    s_out = student(images)
    loss1 = wrapped(s_out, t_out, 0)
    norms = _smoke.block_grad_norms(state.last_ser_term, list(student.module.backbone.blocks))
    # lambda = 0: the adapter's loss equals the host's loss of an unmodified student with the same weights
    dino_loss.center.copy_(center)
    ser.lam = 0.0
    torch.manual_seed(1)
    s_out0 = student(images)
    l_adapter0 = float(wrapped(s_out0, t_out, 0))
    gen.close()
    plain = utils.MultiCropWrapper(vit(drop_path_rate=0.1), head())
    plain.load_state_dict(student.module.state_dict())
    if opts.late_cls:
        from ser_plugin import convert_late_cls

        convert_late_cls(plain.backbone, opts.layer)
    dino_loss.center.copy_(center)
    torch.manual_seed(1)
    l_plain = float(dino_loss(plain(images), t_out, 0))
    ser.lam = 0.3

    report = {
        "step_loss": stats["loss"],
        "ser_loss": ser_loss,
        "ser_loss_finite": math.isfinite(ser_loss),
        "layer": opts.layer,
        "depth": depth,
        "ser_grad_norms": norms,
        "online_hook_blocks": [i + 1 for i, b in enumerate(student.module.backbone.blocks) if _smoke.capture_hooks([b])],
        "online_capture_hooks": _smoke.capture_hooks(student.module.backbone.blocks),
        "momentum_capture_hooks": _smoke.capture_hooks(teacher.backbone.blocks),
        "momentum_has_ser_params": len(teacher.state_dict()) != len(student.module.state_dict()),
        "ser_params": sum(p.numel() for p in ser.parameters()),
        "ser_params_in_optimizer": bool(head_in_opt),
        "ser_params_updated": all(head_moved) if head_moved else None,
        "b2": len(state.pair.g1),
        "lam0_adapter_loss": l_adapter0,
        "lam0_host_loss": l_plain,
        "lam1_loss": float(loss1),
        "plain_aug_class": plain_aug.__name__,
        "cli_ok": cli_ok,
    }
    dist.destroy_process_group()
    _smoke.report(report)


if __name__ == "__main__":
    main()
