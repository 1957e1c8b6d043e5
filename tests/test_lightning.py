"""SERCallback on a tiny LightningModule (timm ViT backbone, EMA teacher by deepcopy), CPU, a few steps."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning.pytorch", reason="Lightning is not installed (pip install lightning)")
timm = pytest.importorskip("timm", reason="timm is not installed")

from ser_plugin import SERError  # noqa: E402
from ser_plugin.integrations import replace_rows  # noqa: E402
from ser_plugin.integrations.lightning import SERCallback, first_image_batch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTH, LAYER = 3, 2


class TinySSL(L.LightningModule):
    """BYOL-like: online backbone + predictor, EMA teacher built with copy.deepcopy; batch = (x1, x2)."""

    def __init__(self, scheduler: bool = False) -> None:
        super().__init__()
        self.scheduler = scheduler
        torch.manual_seed(0)
        self.backbone = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=0
        )
        self.predictor = nn.Linear(32, 32)
        self.teacher = copy.deepcopy(self.backbone)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.views_seen: list = []

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x1, x2 = batch
        self.views_seen.append((x1.detach().clone(), x2.detach().clone()))
        z1, z2 = self.predictor(self.backbone(x1)), self.predictor(self.backbone(x2))
        with torch.no_grad():
            t1, t2 = self.teacher(x1), self.teacher(x2)
        return 2 - F.cosine_similarity(z1, t2).mean() - F.cosine_similarity(z2, t1).mean()

    def configure_optimizers(self):
        opt = torch.optim.SGD([p for n, p in self.named_parameters() if not n.startswith("teacher.") and not n.startswith("ser.")], lr=0.05)
        if not self.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s), "interval": "step"}}


class Probe(L.Callback):
    """Records, before each backward, the SER term's gradient norm per backbone block and the two losses."""

    def __init__(self, ser_cb: SERCallback) -> None:
        self.ser_cb = ser_cb
        self.norms: list = []
        self.losses: list = []

    def on_before_backward(self, trainer, pl_module, loss):  # noqa: ANN001
        blocks = list(pl_module.backbone.blocks)
        params = [p for b in blocks for p in b.parameters()]
        grads = torch.autograd.grad(self.ser_cb.last_term, params, allow_unused=True, retain_graph=True)
        norms, i = [], 0
        for b in blocks:
            k = len(list(b.parameters()))
            norms.append(sum(float(g.norm()) ** 2 for g in grads[i : i + k] if g is not None) ** 0.5)
            i += k
        self.norms.append(norms)
        self.losses.append((float(loss), float(self.ser_cb.last_host_loss)))


def _data(n: int = 8, batches: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n * batches, 3, 16, 16, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.flip(-1))
    return torch.utils.data.DataLoader(ds, batch_size=n)


def _fit(module: L.LightningModule, cb: SERCallback, steps: int = 2) -> Probe:
    probe = Probe(cb)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, probe],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data())
    probe.trainer = trainer
    return probe


def test_extra_pass_mode_adds_ser_to_blocks_up_to_L_only() -> None:
    module = TinySSL()
    cb = SERCallback(LAYER, backbone="backbone", b2=0.5, images=lambda b: b[0], lam=1.0, photometric=None)
    probe = _fit(module, cb)
    assert len(probe.norms) == 2
    for norms in probe.norms:
        assert all(n > 0 for n in norms[:LAYER]) and all(n == 0 for n in norms[LAYER:]), norms
    for total, host in probe.losses:
        assert total > host  # the SER term (InfoNCE > 0) was added
    assert torch.isfinite(probe.trainer.callback_metrics["train_ser_loss"])
    # teardown: training_step, hooks and the child module are gone; the teacher copy never had a live hook
    assert "training_step" not in vars(module) and not hasattr(module, "ser")
    assert all(not b._forward_hooks for b in module.backbone.blocks)
    assert all(type(h).__name__ != "_CaptureHook" for b in module.teacher.blocks for h in b._forward_hooks.values())


def test_lambda_zero_returns_the_host_loss_exactly() -> None:
    cb = SERCallback(LAYER, backbone="backbone", b2=0.5, images=lambda b: b[0], lam=0.0, photometric=None)
    probe = _fit(TinySSL(), cb)
    for total, host in probe.losses:
        assert total == host
    # same weights, same batch, no callback: the same first loss
    plain = TinySSL()
    x1, x2 = next(iter(_data()))
    with torch.no_grad():
        ref = float(plain.training_step((x1, x2), 0))
    assert probe.losses[0][1] == pytest.approx(ref, abs=1e-6)


def test_matched_mode_views_enter_the_host_loss_and_head_is_optimised() -> None:
    module = TinySSL(scheduler=True)  # the head's group is added after the scheduler was built

    def inject(batch, pair):  # noqa: ANN001
        x1, x2 = batch
        return replace_rows(x1, pair.x1), replace_rows(x2, pair.x2)

    cb = SERCallback(LAYER, backbone="backbone", b2=0.25, images=lambda b: b[0], inject=inject, head=True, photometric=None)
    head_before = None

    class Snap(L.Callback):
        def on_fit_start(self, trainer, pl_module):  # noqa: ANN001
            nonlocal head_before
            head_before = [p.detach().clone() for p in pl_module.ser.parameters()]
            held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            assert {id(p) for p in pl_module.ser.parameters()} <= held

    probe = Probe(cb)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, Snap(), probe])
    ser = None

    class Keep(L.Callback):
        def on_train_end(self, trainer, pl_module):  # noqa: ANN001
            nonlocal ser
            ser = pl_module.ser

    trainer.callbacks.append(Keep())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data())
    # the host's step saw the views in its last 2 rows (rotated/flipped copies of the batch's last images)
    x1, _ = module.views_seen[0]
    orig = next(iter(_data()))[0]
    assert torch.equal(x1[:6], orig[:6]) and not torch.equal(x1[6:], orig[6:])
    for norms in probe.norms:
        assert all(n > 0 for n in norms[:LAYER]) and all(n == 0 for n in norms[LAYER:]), norms
    assert head_before is not None and ser is not None
    assert all(bool((a != b).any()) for a, b in zip(head_before, ser.parameters())), "token head not updated"
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(groups[0]["lr"]) == pytest.approx(0.05 * 0.5**2)


def test_errors_name_the_fix() -> None:
    with pytest.raises(SERError, match="b2 share"):
        SERCallback(2, b2=0.0)
    with pytest.raises(SERError, match="no .*image tensor"):
        first_image_batch([torch.zeros(3), "x"])
    module = TinySSL()
    cb = SERCallback(LAYER, backbone="encoder")
    with pytest.raises(SERError, match="no attribute 'encoder'"):
        cb.setup(None, module, "fit")


def test_importing_ser_plugin_does_not_import_lightning() -> None:
    code = "import sys, ser_plugin, ser_plugin.integrations; print('lightning' in sys.modules, 'pytorch_lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_late_cls_also_converts_the_teacher_and_teardown_restores_it() -> None:
    module = TinySSL()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        stock = module.teacher(x)
    seen = {}

    class Check(L.Callback):
        def on_fit_start(self, trainer, pl_module):  # noqa: ANN001
            with torch.no_grad():  # same weights (deepcopy), same late-[CLS] architecture
                seen["teacher"], seen["online"] = pl_module.teacher(x), pl_module.backbone(x)

    cb = SERCallback(LAYER, backbone="backbone", images=lambda b: b[0], photometric=None, late_cls=True, late_cls_also=("teacher",))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, Check()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data())
    torch.testing.assert_close(seen["teacher"], seen["online"])
    assert not torch.allclose(seen["teacher"], stock)
    assert all(type(h).__name__ != "_CaptureHook" for b in module.teacher.blocks for h in b._forward_hooks.values())
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in module.teacher.blocks)  # removed at teardown
    with pytest.raises(SERError, match="late_cls=True"):
        SERCallback(LAYER, late_cls_also=("teacher",))
