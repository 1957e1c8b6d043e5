"""SERCallback on a tiny LightningModule (timm ViT backbone, EMA teacher by deepcopy), CPU, a few steps.

Also: the module's own LR schedulers (SequentialLR warm-up + cosine, OneCycleLR, LambdaLR, CosineAnnealingLR)
untouched, the head reaching the optimizer through ``configure_optimizers`` (or a clear error), strict
``load_from_checkpoint`` without SER, resume with ``ckpt_path``, Lightning's SWA callback, LightningCLI, and a
2-process DDP run equal to one process.
"""

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

from ser_plugin import SERConfig, SERError  # noqa: E402
from ser_plugin.integrations import replace_rows  # noqa: E402
from ser_plugin.integrations.lightning import SERCallback, SERModuleState, first_image_batch, ser_parameters  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTH, LAYER = 3, 2


class TinySSL(L.LightningModule):
    """BYOL-like: online backbone + predictor, EMA teacher built with copy.deepcopy; batch = (x1, x2)."""

    def __init__(self, scheduler: str = "none", ser_in_optimizer: bool = True, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.scheduler, self.ser_in_optimizer, self.lr = scheduler, ser_in_optimizer, lr
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
        # explicit parameter lists, the head in its own group without weight decay (ser_parameters: [] without SER)
        groups = [{"params": [*self.backbone.parameters(), *self.predictor.parameters()]}]
        if self.ser_in_optimizer:
            groups.append({"params": ser_parameters(self), "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=0.05)
        sched = make_scheduler(self.scheduler, opt)
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_scheduler(name: str, opt: torch.optim.Optimizer):  # noqa: ANN201
    S = torch.optim.lr_scheduler
    if name == "none":
        return None
    if name == "sequential":  # linear warm-up then cosine: the standard ViT SSL recipe
        return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=0.1, total_iters=2), S.CosineAnnealingLR(opt, T_max=4)], milestones=[2])
    if name == "onecycle":
        return S.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    if name == "lambda":
        return S.LambdaLR(opt, lambda s: 0.5**s)
    if name == "cosine":
        return S.CosineAnnealingLR(opt, T_max=5)
    raise ValueError(name)


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
    cb = SERCallback(LAYER, backbone="backbone", b2_share=0.5, images=lambda b: b[0], lam=1.0, photometric=None)
    probe = _fit(module, cb)
    assert len(probe.norms) == 2
    for norms in probe.norms:
        assert all(n > 0 for n in norms[:LAYER]) and all(n == 0 for n in norms[LAYER:]), norms
    for total, host in probe.losses:
        assert total > host  # the SER term (InfoNCE > 0) was added
    assert torch.isfinite(probe.trainer.callback_metrics["train_ser_loss"])
    # teardown: training_step, hooks and the child module are gone; the teacher copy never had a live hook
    assert "training_step" not in vars(module) and not hasattr(module, "ser_state")
    assert all(not b._forward_hooks for b in module.backbone.blocks)
    assert all(type(h).__name__ != "_CaptureHook" for b in module.teacher.blocks for h in b._forward_hooks.values())


def test_lambda_zero_returns_the_host_loss_exactly() -> None:
    cb = SERCallback(LAYER, backbone="backbone", b2_share=0.5, images=lambda b: b[0], lam=0.0, photometric=None)
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
    module = TinySSL(scheduler="lambda")

    def inject(batch, pair):  # noqa: ANN001
        x1, x2 = batch
        return replace_rows(x1, pair.x1), replace_rows(x2, pair.x2)

    cb = SERCallback(LAYER, backbone="backbone", b2_share=0.25, images=lambda b: b[0], inject=inject, head=True, photometric=None)
    head_before = None

    class Snap(L.Callback):
        def on_fit_start(self, trainer, pl_module):  # noqa: ANN001
            nonlocal head_before
            head_before = [p.detach().clone() for p in ser_parameters(pl_module)]
            held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            assert head_before and {id(p) for p in ser_parameters(pl_module)} <= held

    probe = Probe(cb)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, Snap(), probe])
    ser = None

    class Keep(L.Callback):
        def on_train_end(self, trainer, pl_module):  # noqa: ANN001
            nonlocal ser
            ser = cb.ser

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
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.05


def test_errors_name_the_fix() -> None:
    with pytest.raises(SERError, match="b2_share"):
        SERCallback(2, b2_share=0.0)
    with pytest.raises(SERError, match="did you mean 'b2_share'"):
        SERCallback(2, b2_shar=0.1)
    with pytest.raises(SERError, match="needs a layer"):
        SERCallback()
    with pytest.raises(SERError, match="no .*image tensor"):
        first_image_batch([torch.zeros(3), "x"])
    module = TinySSL()
    cb = SERCallback(LAYER, backbone="encoder")
    with pytest.raises(SERError, match="no submodule 'encoder'"):
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


# ---------------------------------------------------------------------------------------------- optimizers
class LRs(L.Callback):
    """Records every group's lr before each step, and SER's parameters after the last step."""

    def __init__(self) -> None:
        self.lrs: list = []
        self.head_first: list = []
        self.head_last: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])
        if not self.head_first:
            self.head_first = [p.detach().clone() for p in ser_parameters(pl_module)]

    def on_train_end(self, trainer, pl_module):  # noqa: ANN001
        self.head_last = [p.detach().clone() for p in ser_parameters(pl_module)]


def _trainer(callbacks, steps: int = 3, **kw) -> L.Trainer:  # noqa: ANN001
    kw = {"logger": False, "enable_checkpointing": False, **kw}
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, **kw)


@pytest.mark.parametrize("scheduler", ["sequential", "onecycle", "lambda", "cosine"])
def test_the_modules_scheduler_drives_the_head_untouched(scheduler: str) -> None:
    """SequentialLR(LinearLR, CosineAnnealingLR) crashed inside torch when the callback appended a group to a
    built optimizer; now the head is in the module's own optimizer and every group follows the module's schedule."""
    module = TinySSL(scheduler=scheduler)
    cb = SERCallback(LAYER, b2_share=0.5, images=lambda b: b[0], photometric=None, head=True, head_dims=(16, 16))
    rec = LRs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer([cb, rec], steps=4).fit(module, _data(batches=4))
    # the same schedule replayed on a plain optimizer with the same two groups
    ref_opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))], "weight_decay": 0.0}], lr=0.05)
    ref_sched = make_scheduler(scheduler, ref_opt)
    want = []
    for _ in range(4):
        want.append([g["lr"] for g in ref_opt.param_groups])
        ref_opt.step()
        ref_sched.step()
    assert [v for r in rec.lrs for v in r] == pytest.approx([v for r in want for v in r]), (rec.lrs, want)
    assert len(set(round(r[1], 12) for r in rec.lrs)) > 1  # the schedule moved the head's lr
    assert rec.head_first and all(bool((a != b).any()) for a, b in zip(rec.head_first, rec.head_last)), "token head not trained"


def test_head_missing_from_the_optimizer_is_a_clear_error() -> None:
    module = TinySSL(ser_in_optimizer=False)
    cb = SERCallback(LAYER, images=lambda b: b[0], photometric=None, head=True, head_dims=(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SERError, match=r"in no optimizer.*ser_parameters\(self\)"):
            _trainer([cb]).fit(module, _data())
    # without a head there is nothing to optimise: no error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer([SERCallback(LAYER, images=lambda b: b[0], photometric=None)], steps=1).fit(TinySSL(ser_in_optimizer=False), _data())


def test_manual_optimisation_is_refused() -> None:
    module = TinySSL()
    module.automatic_optimization = False
    with pytest.raises(SERError, match="manual optimisation"):
        SERCallback(LAYER).setup(None, module, "fit")


def test_module_parameters_include_the_state_while_fitting() -> None:
    """configure_optimizers with self.parameters() picks the head up without the helper."""
    seen = {}

    class AllParams(TinySSL):
        def configure_optimizers(self):
            seen["n"] = sum(1 for m in self.children() if isinstance(m, SERModuleState))
            return torch.optim.SGD([p for n, p in self.named_parameters() if not n.startswith("teacher.")], lr=0.05)

    cb = SERCallback(LAYER, images=lambda b: b[0], photometric=None, head=True, head_dims=(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer([cb], steps=1).fit(AllParams(), _data())
    assert seen["n"] == 1


# ---------------------------------------------------------------------------------------------- checkpoints
def _ckpt_trainer(tmp_path, callbacks, steps: int) -> L.Trainer:  # noqa: ANN001
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, save_top_k=-1, filename="{step}")
    return _trainer([*callbacks, ckpt], steps=steps, enable_checkpointing=True, default_root_dir=str(tmp_path))


def test_checkpoint_loads_strictly_without_ser_and_resume_restores_the_head(tmp_path) -> None:  # noqa: ANN001
    module = TinySSL(scheduler="cosine")
    cb = SERCallback(LAYER, images=lambda b: b[0], photometric=None, head=True, head_dims=(16, 16))
    rec = LRs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _ckpt_trainer(tmp_path, [cb, rec], steps=2).fit(module, _data(batches=4))
    path = tmp_path / "step=2.ckpt"
    ckpt = torch.load(path, weights_only=False)
    assert not [k for k in ckpt["state_dict"] if k.startswith("ser_state")], "SER's state leaked into the module's state_dict"
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("SERCallback")]
    saved_head = ckpt["callbacks"][key]["objective"]
    assert saved_head and all(torch.equal(a, b) for a, b in zip(saved_head.values(), rec.head_last))

    # 1) the plain module class loads the checkpoint strictly (no SER keys, no SER needed)
    plain = TinySSL.load_from_checkpoint(path, strict=True)
    for (n, p), q in zip(plain.backbone.named_parameters(), module.backbone.parameters()):
        assert torch.equal(p, q), n
    # strict loading of a module state into a *fitting* module (SER state present) accepts the missing SER keys
    state = SERModuleState(torch.nn.Linear(2, 2))
    holder = nn.Module()
    holder.add_module("x", nn.Linear(2, 2))
    holder.add_module("ser_state", state)
    assert list(holder.state_dict()) == ["x.weight", "x.bias"]
    holder.load_state_dict({"x.weight": torch.zeros(2, 2), "x.bias": torch.zeros(2)}, strict=True)

    # 2) resume: the head, optimizer state and step come back; training continues to step 4
    resumed, seen = TinySSL(scheduler="cosine"), {}

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):  # noqa: ANN001
            seen["step"] = trainer.global_step
            seen["head"] = [p.detach().clone() for p in ser_parameters(pl_module)]
            seen["exp_avg"] = [trainer.optimizers[0].state[p]["exp_avg"].clone() for p in ser_parameters(pl_module)]

    cb2 = SERCallback(LAYER, images=lambda b: b[0], photometric=None, head=True, head_dims=(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = _ckpt_trainer(tmp_path / "resumed", [cb2, AtStart()], steps=4)
        tr.fit(resumed, _data(batches=4), ckpt_path=str(path))
    assert seen["step"] == 2 and tr.global_step == 4
    assert all(torch.equal(a, b) for a, b in zip(seen["head"], saved_head.values())), "token head not restored"
    assert all(float(m.abs().sum()) > 0 for m in seen["exp_avg"])  # AdamW moments of the head restored too

    # 3) a checkpoint whose SER state does not fit (no head now) is refused with the fix
    cb3 = SERCallback(LAYER, images=lambda b: b[0], photometric=None, head=True, head_dims=(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SERError, match="does not fit this SERCallback"):
            _ckpt_trainer(tmp_path / "bad", [cb3], steps=4).fit(TinySSL(scheduler="cosine"), _data(batches=4), ckpt_path=str(path))


def test_swa_callback_averages_with_ser_attached() -> None:
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    module = TinySSL()
    cb = SERCallback(LAYER, images=lambda b: b[0], photometric=None, head=True, head_dims=(16, 16))
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1, annealing_epochs=1)
    rec = LRs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, callbacks=[cb, swa, rec])
        tr.fit(module, _data(batches=2))
    assert len(rec.lrs) == 6
    assert rec.lrs[-1] == pytest.approx([0.02, 0.02])  # SWALR drives both groups, the head's included
    # the averaged weights were copied into the module at the end, and the copy's backbone had no live hook
    avg = swa._average_model
    for (n, p), q in zip(module.backbone.named_parameters(), avg.backbone.parameters()):
        assert torch.equal(p, q.to(p)), n
    assert all(type(h).__name__ != "_CaptureHook" for b in avg.backbone.blocks for h in b._forward_hooks.values())
    assert not [k for k in avg.state_dict() if k.startswith("ser_state")]


def test_lightning_cli_configures_the_callback_from_its_signature(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (pip install 'jsonargparse[signatures]')")
    from lightning.pytorch.cli import LightningCLI

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "trainer:\n  logger: false\n  callbacks:\n    - class_path: ser_plugin.integrations.lightning.SERCallback\n"
        "      init_args:\n        layer: 2\n        backbone: backbone\n        config:\n          lam: 0.5\n          head: true\n          b2_share: 0.5\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(TinySSL, run=False, save_config_kwargs={"overwrite": True},
                           args=["--config", str(cfg), "--trainer.callbacks.init_args.config.tau=0.3", "--trainer.max_steps=1",
                                 "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                                 f"--trainer.default_root_dir={tmp_path}"])  # its config.yaml goes there, not into the cwd
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, SERCallback)]
    assert isinstance(cb.config, SERConfig)
    assert (cb.config.layer, cb.config.lam, cb.config.tau, cb.config.head, cb.config.b2_share) == (2, 0.5, 0.3, True, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.trainer.fit(cli.model, _data())
    assert cli.trainer.global_step == 1


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_two_processes_equal_one_process(tmp_path) -> None:  # noqa: ANN001
    """SERCallback under Trainer(strategy='ddp', devices=2) on CPU: the step equals one process on the global
    batch (host loss averaged over ranks, SER's keys gathered with gradient, head synchronised by DDP)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from dist_helpers import lightning_step

    out = tmp_path / "cb"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "dist_helpers", "lightning_step.py"), "--callback", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    ref = lightning_step.callback_reference(ranks)
    assert ranks[0]["world"] == 2
    got_host = (ranks[0]["host"] + ranks[1]["host"]) / 2
    got_ser = (ranks[0]["ser"] + ranks[1]["ser"]) / 2
    torch.testing.assert_close(got_host, ref["host"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_ser, ref["ser"], atol=2e-5, rtol=1e-4)
    assert ranks[0]["params"].keys() == ref["params"].keys() and any(k.startswith("ser_state.") for k in ref["params"])
    for name, want in ref["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], want, atol=2e-5, rtol=1e-4, msg=f"{name} differs from one process")
        torch.testing.assert_close(ranks[1]["params"][name], want, atol=2e-5, rtol=1e-4, msg=f"{name} differs between ranks")
