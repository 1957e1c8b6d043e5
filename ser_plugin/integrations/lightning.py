"""SER for any LightningModule with a ViT backbone: :class:`SERCallback`.

Lightning is not a dependency of ser_plugin: this module imports it (``lightning``, else ``pytorch_lightning``)
when it is imported itself.

The callback attaches SER to the module's backbone at ``setup``, registers the SER handle as a child of the
module (so it moves with the module, DDP syncs the optional token head, checkpoints hold it), wraps the
module's ``training_step`` so that the returned loss becomes ``host_loss + λ·L_equiv``, logs ``L_equiv``,
and undoes all of it at ``teardown``. Two modes:

* **extra pass** (default, any module): after the host's step, ``|b2|`` images of the batch get two
  equivariant views and SER runs its own forward, stopping after block L (cost: ``2·|b2|`` images through L
  blocks, forward and backward).
* **matched 2-view budget** (``inject=``): the views replace the last ``|b2|`` rows of the host's two views
  (``inject(batch, pair) -> batch`` does that for the module's batch layout); layer L is captured during the
  host's own step (its first two backbone passes, or one pass over both views concatenated with
  ``concatenated=True``), so the views also enter the host's loss and there is no extra pass.

Example::

    from ser_plugin.integrations.lightning import SERCallback
    trainer = L.Trainer(callbacks=[SERCallback(layer=3, backbone="backbone", b2=0.1,
                                               images=lambda batch: batch[0], photometric=None)])
    trainer.fit(MySSLModule(), loader)

The momentum/teacher network, if the module has one, is never hooked: give the online backbone's path. A
teacher made by ``copy.deepcopy`` of a hooked backbone gets an inert hook (records nothing).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..attach import SER, attach_ser
from ..errors import SERError
from ..late_cls import convert_late_cls
from ..views import ViewPair
from . import add_params_to_optimizer, b2_count, loss_from_maps

try:  # Lightning 2.x
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
    except ImportError as err:
        raise ImportError("ser_plugin.integrations.lightning needs Lightning: pip install lightning") from err

__all__ = ["SERCallback", "first_image_batch"]


def first_image_batch(batch: Any) -> Tensor:
    """The first 4-D tensor in a batch (tensor, or nested list/tuple/dict): the default b2 image source."""
    if isinstance(batch, Tensor):
        if batch.dim() == 4:
            return batch
    elif isinstance(batch, dict):
        for v in batch.values():
            try:
                return first_image_batch(v)
            except SERError:
                pass
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            try:
                return first_image_batch(v)
            except SERError:
                pass
    raise SERError(
        f"no (B, C, H, W) image tensor found in the batch ({type(batch).__name__}); pass images=lambda batch: <the images> to SERCallback."
    )


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise SERError(f"SERCallback(backbone={path!r}): {type(obj).__name__} has no attribute {part!r}; give the dotted path of the online ViT.")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        raise SERError(f"SERCallback(backbone={path!r}) is a {type(obj).__name__}, not an nn.Module.")
    return obj


def _extend_schedulers(trainer: Trainer, opt: torch.optim.Optimizer) -> None:
    """After a group was appended to ``opt``: let the schedulers built for it drive that group like group 0."""
    group = opt.param_groups[-1]
    for cfg in getattr(trainer, "lr_scheduler_configs", []) or []:
        sched = cfg.scheduler
        if getattr(sched, "optimizer", None) is not opt:
            continue
        group.setdefault("initial_lr", group["lr"])
        for name in ("base_lrs", "_last_lr"):
            values = getattr(sched, name, None)
            if isinstance(values, list) and len(values) == len(opt.param_groups) - 1:
                values.append(values[0] if name == "_last_lr" else group["initial_lr"])
        for name in ("lr_lambdas", "max_lrs", "min_lrs"):  # LambdaLR / OneCycleLR / ReduceLROnPlateau
            values = getattr(sched, name, None)
            if isinstance(values, list) and len(values) == len(opt.param_groups) - 1:
                values.append(values[0])


class SERCallback(Callback):
    """Adds SER to a LightningModule's training without changing its code.

    Args:
        layer: ``L`` — the token map after the first ``L`` blocks of the backbone.
        backbone: dotted path of the **online** ViT on the LightningModule (``"backbone"``, ``"student.vit"``).
        b2: share of each (per-process) batch that gets equivariant views (at least 2 images).
        images: ``batch -> (B, C, H, W)`` images the b2 rows are taken from (the last ``|b2|`` rows). In
            ``[0, 1]`` when the photometric part is on (the default); with ``photometric=None`` any
            normalisation works (the group action is exact on any values). Default: the first 4-D tensor.
        inject: matched-budget mode: ``(batch, pair) -> batch`` that puts ``pair.x1``/``pair.x2`` in place of
            the last ``len(pair.g1)`` rows of the host's two views (see :func:`ser_plugin.integrations.replace_rows`).
        concatenated: with ``inject``, the host forwards both views in one backbone call (rows: view 1 then view 2).
        late_cls_also: with ``late_cls=True``: dotted paths of networks that must share the online ViT's
            architecture — momentum encoders, EMA teachers — converted to late [CLS] as well (no hook).
        log_name: name under which ``L_equiv`` (unweighted) is logged; ``None`` to not log.
        attribute: name of the child module that holds the SER handle on the LightningModule.
        **ser_kwargs: passed to :func:`ser_plugin.attach_ser` (``lam``, ``tau``, ``head``, ``late_cls``, ``scale``,
            ``photometric``, ``mean``/``std``, ...).

    Attributes:
        ser: the :class:`ser_plugin.SER` handle while fitting.
        last_host_loss, last_term: the host's loss and the added ``λ·L_equiv`` (with graph) of the last step.
    """

    def __init__(
        self,
        layer: int,
        *,
        backbone: str = "backbone",
        b2: float = 0.25,
        images: Optional[Callable[[Any], Tensor]] = None,
        inject: Optional[Callable[[Any, ViewPair], Any]] = None,
        concatenated: bool = False,
        late_cls_also: Sequence[str] = (),
        log_name: Optional[str] = "train_ser_loss",
        attribute: str = "ser",
        **ser_kwargs: Any,
    ) -> None:
        super().__init__()
        b2_count(1000, b2)  # validates the share
        self.layer, self.backbone, self.b2 = layer, backbone, b2
        self.images = images or first_image_batch
        self.inject, self.concatenated = inject, concatenated
        self.late_cls_also = tuple(late_cls_also)
        if self.late_cls_also and not ser_kwargs.get("late_cls", False):
            raise SERError("late_cls_also converts momentum/teacher networks to late [CLS]; it needs late_cls=True.")
        self._late_handles: List[Any] = []
        self.log_name, self.attribute = log_name, attribute
        self.ser_kwargs: Dict[str, Any] = ser_kwargs
        self.ser: Optional[SER] = None
        self.last_host_loss: Optional[Tensor] = None
        self.last_term: Optional[Tensor] = None
        self._module: Optional[LightningModule] = None

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.ser is not None:
            return
        if "training_step" in vars(pl_module):
            raise SERError("training_step of this LightningModule is already wrapped (two SERCallbacks?); use one SERCallback per module.")
        if hasattr(pl_module, self.attribute):
            raise SERError(f"{type(pl_module).__name__} already has an attribute {self.attribute!r}; pass SERCallback(attribute='...').")
        backbone = _get_path(pl_module, self.backbone)
        others = [_get_path(pl_module, p) for p in self.late_cls_also]
        self.ser = attach_ser(backbone, self.layer, **self.ser_kwargs)
        self._late_handles = [convert_late_cls(m, self.layer) for m in others]
        pl_module.add_module(self.attribute, self.ser)  # moves with the module, DDP syncs its parameters
        self._module = pl_module
        orig = pl_module.training_step

        def training_step(batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
            return self._step(pl_module, orig, batch, batch_idx, *args, **kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.ser is None or not list(self.ser.parameters()):
            return
        if not trainer.optimizers:
            raise SERError("SER has parameters (token head) but the trainer has no optimizer.")
        if len(trainer.optimizers) > 1:
            held = [{id(p) for g in o.param_groups for p in g["params"]} for o in trainer.optimizers]
            if not any({id(p) for p in self.ser.parameters()} <= h for h in held):
                raise SERError("several optimizers and none holds SER's parameters: add pl_module.ser.parameters() to one in configure_optimizers.")
            return
        opt = trainer.optimizers[0]
        base_lr = opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"])
        if add_params_to_optimizer(opt, list(self.ser.parameters()), lr=base_lr, weight_decay=0.0):
            _extend_schedulers(trainer, opt)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.ser is None:
            return
        self.ser.remove()
        for h in self._late_handles:
            h.remove()
        self._late_handles = []
        if "training_step" in vars(pl_module):
            del pl_module.training_step
        if self.attribute in pl_module._modules:
            del pl_module._modules[self.attribute]
        self.ser, self._module = None, None

    # ------------------------------------------------------------------ the step
    def _views(self, batch: Any, device: torch.device) -> ViewPair:
        x = self.images(batch)
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise SERError(f"SERCallback(images=...) must return a (B, C, H, W) tensor, got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}.")
        n = b2_count(x.shape[0], self.b2)
        x = x[x.shape[0] - n :].to(device)
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        assert self.ser is not None
        return self.ser.views(x)

    def _step(self, pl_module: LightningModule, orig: Callable[..., Any], batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        ser = self.ser
        assert ser is not None
        device = next(ser.model.parameters()).device
        pair = self._views(batch, device)
        n = len(pair.g1)
        if self.inject is None:
            out = orig(batch, batch_idx, *args, **kwargs)
            if out is None:
                return None
            term = ser.forward_loss(pair)
        else:
            batch = self.inject(batch, pair)
            ser.clear()
            with ser.capture():
                out = orig(batch, batch_idx, *args, **kwargs)
            caps = ser.captures
            ser.clear()
            if out is None:
                return None
            if self.concatenated:
                if not caps or caps[0].shape[0] % 2:
                    raise SERError(f"concatenated=True expects one pass over both views first; captured {[tuple(c.shape) for c in caps]}.")
                b = caps[0].shape[0] // 2
                f1, f2 = caps[0][b - n : b], caps[0][2 * b - n :]
            else:
                if len(caps) < 2:
                    raise SERError(
                        f"the training step ran the backbone {len(caps)} time(s) on the views; matched mode expects one pass per view "
                        "(or concatenated=True for one pass over both)."
                    )
                f1, f2 = caps[0][caps[0].shape[0] - n :], caps[1][caps[1].shape[0] - n :]
            term = loss_from_maps(ser, pair, f1, f2)
        host = out["loss"] if isinstance(out, dict) else out
        if not isinstance(host, Tensor):
            raise SERError(f"training_step returned {type(host).__name__}; SERCallback needs a loss tensor (or a dict with 'loss').")
        self.last_host_loss, self.last_term = host.detach(), term
        if self.log_name and ser.last_loss is not None:
            pl_module.log(self.log_name, ser.last_loss, on_step=True, on_epoch=False, prog_bar=False, batch_size=n)
        if isinstance(out, dict):
            out = dict(out)
            out["loss"] = host + term
            return out
        return host + term
