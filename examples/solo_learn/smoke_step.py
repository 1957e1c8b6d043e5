"""One real solo-learn MoCo-v3 training step on the CPU through the SER adapter; prints a JSON report.

Used by tests/test_adapter_solo.py (in a subprocess). Writes a tiny image folder, then runs the checkout's
``main_pretrain.py`` (Hydra config ``scripts/pretrain/cifar/mocov3.yaml``, ViT-tiny at 32 px, batch 8, one
step, CPU) through the adapter, with a probe callback that records before the backward:

* the SER term's gradient norm per block of ``backbone`` (autograd.grad of λ·L_equiv);
* capture hooks on ``backbone`` and ``momentum_backbone``, SER parameters in the optimizer;
* the host's loss as returned by solo's training_step, the total, and the host's loss recomputed by the
  unwrapped ``training_step`` on the same (view-injected) batch.

    SER_SOLO_DIR=/path/to/solo-learn python examples/solo_learn/smoke_step.py [--lam 0] [--head]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import main_pretrain_ser as adapter  # noqa: E402


def _capture_hooks(blocks) -> int:  # noqa: ANN001
    return sum(type(h).__name__ == "_CaptureHook" for b in blocks for h in b._forward_hooks.values())


def _stand_in_cifar10() -> None:
    """torchvision's CIFAR10 downloads (and checks the archive's md5); this machine has no network. solo looks the
    class up by name (``vars(torchvision.datasets)["CIFAR10"]``) at run time, so a 16-image stand-in with the same
    constructor and item format takes its place for this one step. Only the test harness does this; the adapter
    and solo's code are unchanged."""
    import torchvision
    from PIL import Image

    class StandInCIFAR10(torch.utils.data.Dataset):
        def __init__(self, root, train=True, transform=None, target_transform=None, download=False):  # noqa: ANN001
            rng = np.random.default_rng(0 if train else 1)
            self.data = (rng.random((16, 32, 32, 3)) * 255).astype("uint8")
            self.targets = [i % 10 for i in range(16)]
            self.transform, self.target_transform = transform, target_transform

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int):  # noqa: ANN204
            img, target = Image.fromarray(self.data[i]), self.targets[i]
            return (self.transform(img) if self.transform else img), target

    torchvision.datasets.CIFAR10 = StandInCIFAR10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--head", action="store_true")
    ap.add_argument("--late-cls", action="store_true")
    ap.add_argument("--backbone", choices=["vit_tiny", "resnet18"], default="vit_tiny",
                    help="resnet18: solo's CIFAR configuration as shipped (dataset cifar10, so solo itself swaps in "
                         "its CIFAR stem), with a small stand-in for torchvision's CIFAR10 (no download here)")
    opts = ap.parse_args()
    from PIL import Image

    root = tempfile.mkdtemp(prefix="ser_solo_data_")
    rng = np.random.default_rng(0)
    for c in "ab":
        os.makedirs(os.path.join(root, c))
        for i in range(4):
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(os.path.join(root, c, f"{i}.png"))

    import lightning.pytorch as L

    report: dict = {"layer": opts.layer}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            self.batch = batch

        def on_before_backward(self, trainer, pl_module, loss):  # noqa: ANN001
            cb = adapter.RUN.callback
            ser = cb.ser
            blocks = list(ser.vit.blocks)  # the modules whose outputs are the layers (ViT blocks, ResNet stages)
            names = {id(m): n for n, m in pl_module.backbone.named_modules()}
            layer_names = [names[id(b)] for b in blocks]
            momentum_blocks = [pl_module.momentum_backbone.get_submodule(n) for n in layer_names]
            stem = next(pl_module.backbone.parameters())  # patch embedding / first convolution
            params = [stem] + [p for b in blocks for p in b.parameters()]
            grads = torch.autograd.grad(cb.last_term, params, allow_unused=True, retain_graph=True)
            stem_grad = 0.0 if grads[0] is None else float(grads[0].norm())
            norms, counts, i = [], [], 1
            for b in blocks:
                k = len(list(b.parameters()))
                norms.append(sum(float(g.norm()) ** 2 for g in grads[i : i + k] if g is not None) ** 0.5)
                counts.append(k)
                i += k
            opt = trainer.optimizers[0]
            held = {id(p) for g in opt.param_groups for p in g["params"]}
            # the host's loss recomputed by solo's own (unwrapped) training_step on the same injected batch
            pair_batch = adapter.inject(self.batch, cb._last_pair_for_probe)
            with torch.no_grad():
                host_again = type(pl_module).training_step(pl_module, pair_batch, 0)
            report.update(
                ser_grad_norms=norms,
                params_per_layer=counts,
                stem_grad=stem_grad,
                layer_names=layer_names,
                handle=repr(ser),
                backbone_class=type(pl_module.backbone).__name__,
                stem_conv=[list(pl_module.backbone.conv1.kernel_size), list(pl_module.backbone.conv1.stride)] if hasattr(pl_module.backbone, "conv1") else None,
                maxpool=type(getattr(pl_module.backbone, "maxpool", None)).__name__,
                map_stride=list(ser.patch_size) if ser.patch_size is not None else None,
                depth=len(blocks),
                ser_loss=float(ser.last_loss),
                ser_loss_finite=math.isfinite(float(ser.last_loss)),
                host_loss=float(cb.last_host_loss),
                total_loss=float(loss),
                host_loss_recomputed=float(host_again["loss"] if isinstance(host_again, dict) else host_again),
                online_hook_blocks=[j + 1 for j, b in enumerate(blocks) if _capture_hooks([b])],
                online_capture_hooks=_capture_hooks(blocks),
                momentum_capture_hooks=_capture_hooks(momentum_blocks),
                late_cls_pre_hooks={
                    name: sum(type(h).__name__ == "_StripPrefix" for b in mods for h in b._forward_pre_hooks.values())
                    for name, mods in (("backbone", blocks), ("momentum_backbone", momentum_blocks))
                },
                ser_params=sum(p.numel() for p in ser.parameters()),
                ser_params_in_optimizer={id(p) for p in ser.parameters()} <= held,
                ser_group=[g.get("name") for g in opt.param_groups if any(id(p) in {id(q) for q in ser.parameters()} for p in g["params"])],
                ser_config=[cb.config.layer, cb.config.lam, cb.config.tau, cb.config.b2_share],
                b2=len(cb._last_pair_for_probe.g1),
                base_crop=repr(getattr(getattr(getattr(trainer.train_dataloader, "dataset", None), "transform", None), "base_crop", None)),
                mean_std=adapter.RUN.mean_std,
                crop_scale=[float(adapter.RUN.solo_cfg.augmentations[0].rrc.crop_min_scale), float(adapter.RUN.solo_cfg.augmentations[0].rrc.crop_max_scale)],
            )

    # keep the step's pair for the probe (the callback draws it inside the wrapped training_step)
    from ser_plugin.integrations.lightning import SERCallback

    orig_views = SERCallback._views

    def views(self, batch, device):  # noqa: ANN001
        pair = orig_views(self, batch, device)
        self._last_pair_for_probe = pair
        return pair

    SERCallback._views = views
    adapter.EXTRA_CALLBACKS.append(Probe())
    solo = os.environ[adapter.ENV_VAR]
    if opts.backbone == "vit_tiny":
        model_and_data = ["backbone.name=vit_tiny", "++backbone.kwargs.img_size=32", "++backbone.kwargs.patch_size=8",
                          "data.dataset=custom", f"data.train_path={root}", "~data.val_path"]
    else:  # the config's own backbone (resnet18) and dataset (cifar10): solo replaces the stem for CIFAR
        _stand_in_cifar10()
        model_and_data = [f"data.train_path={root}", f"data.val_path={root}"]
    overrides = [
        "--config-path", "scripts/pretrain/cifar/", "--config-name", "mocov3.yaml", *model_and_data,
        "method_kwargs.proj_hidden_dim=64", "method_kwargs.pred_hidden_dim=64", "method_kwargs.proj_output_dim=32",
        "data.num_workers=0", "optimizer.batch_size=8", "++limit_val_batches=0", "++num_sanity_val_steps=0",
        "accelerator=cpu", "devices='1'", "strategy=auto", "precision=32", "max_epochs=1", "++max_steps=1",
        "checkpoint.enabled=False", "auto_resume.enabled=False", "++wandb.enabled=False",
        f"++ser.layer={opts.layer}", f"++ser.lam={opts.lam}", f"++ser.head={opts.head}", f"++ser.late_cls={opts.late_cls}", "++ser.b2_share=0.25",
    ]
    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="ser_solo_run_"))
    try:
        adapter.main(["--solo-dir", solo] + overrides)
    finally:
        os.chdir(cwd)
    report["solo_dir"] = solo
    print("SER_REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
