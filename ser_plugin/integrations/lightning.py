"""SER for any LightningModule with a ViT backbone: :class:`SERCallback` and :func:`ser_parameters`.

Lightning is not a dependency of ser_plugin: this module imports it (``lightning``, else ``pytorch_lightning``)
when it is imported itself.

The callback observes and adds through Lightning's hooks; the module's ``configure_optimizers`` keeps owning
the optimizers and LR schedulers (the callback never edits them):

* ``setup``: attaches SER to the module's **online** backbone and registers SER's trainable state (the loss
  object with its optional token head) as a child of the module, so that it moves with the module, DDP syncs
  it, and ``self.parameters()`` in ``configure_optimizers`` include it. Optimizers built from explicit
  parameter lists add :func:`ser_parameters(self) <ser_parameters>`; ``on_fit_start`` raises a
  :class:`~ser_plugin.SERError` when a trainable SER parameter is in no optimizer.
* training: the module's ``training_step`` is wrapped so that it returns ``host_loss + λ·L_equiv``; the
  unweighted ``L_equiv`` is logged.
* checkpoints: SER's state is kept **out of** the module's ``state_dict`` and saved as the callback's own
  state (``checkpoint["callbacks"]``), so ``MyModule.load_from_checkpoint(path)`` loads strictly without SER,
  and ``trainer.fit(module, ckpt_path=path)`` with the callback restores the token head (and the optimizer
  state that includes it).
* ``teardown``: hooks, wrapper and child are removed; the module is as before.

Two modes:

* **extra pass** (default, any module): after the host's step, ``|b2|`` images of the batch get two
  equivariant views and SER runs its own forward, stopping after block L (cost: ``2·|b2|`` images through L
  blocks, forward and backward).
* **matched 2-view budget** (``inject=``): the views replace the last ``|b2|`` rows of the host's two views
  (``inject(batch, pair) -> batch`` does that for the module's batch layout); layer L is captured during the
  host's own step (its first two backbone passes, or one pass over both views concatenated with
  ``concatenated=True``), so the views also enter the host's loss and there is no extra pass.

Example::

    from ser_plugin.integrations.lightning import SERCallback, ser_parameters

    class MySSL(L.LightningModule):
        def configure_optimizers(self):
            return torch.optim.AdamW([*self.backbone.parameters(), *self.head.parameters(), *ser_parameters(self)])

    cb = SERCallback(layer=3, backbone="backbone", b2_share=0.1, images=lambda batch: batch[0], photometric=None)
    L.Trainer(callbacks=[cb]).fit(MySSL(), loader)

The momentum/teacher network, if the module has one, is never hooked: give the online backbone's path. A
teacher made by ``copy.deepcopy`` of a hooked backbone gets an inert hook (records nothing).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..attach import SER, attach_ser
from ..config import MODEL_OPTIONS, SERConfig, resolve_config
from ..errors import SERError
from ..late_cls import convert_late_cls
from ..views import ViewPair
from . import b2_count, b2_maps, loss_from_maps, views_input

try:  # Lightning 2.x
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
    except ImportError as err:
        raise ImportError("ser_plugin.integrations.lightning needs Lightning: pip install lightning") from err

__all__ = ["SERCallback", "SERModuleState", "ser_parameters", "first_image_batch"]


def first_image_batch(batch: Any) -> Tensor:
    """The first 4-D tensor in a batch (tensor, or nested list/tuple/dict): the default b2 image source.

    Raises:
        SERError: no ``(B, C, H, W)`` tensor in the batch.
    """
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


class SERModuleState(nn.Module):
    """SER's trainable state on a LightningModule while it fits: the loss object (``objective``, with the
    optional token head).

    As a child of the module it moves with ``.to()``, is synchronised by DDP and is included in
    ``module.parameters()``; but it is left out of the module's ``state_dict`` (and missing keys for it are
    accepted on load), because :class:`SERCallback` saves it as its own state. A checkpoint therefore loads
    strictly into the module class with or without the callback.
    """

    def __init__(self, objective: nn.Module) -> None:
        super().__init__()
        self.objective = objective
        if hasattr(self, "register_state_dict_post_hook"):  # torch >= 2.5 public names; the older private ones otherwise
            self.register_state_dict_post_hook(_drop_own_keys)
            self.register_load_state_dict_pre_hook(_keep_own_values)
        else:  # pragma: no cover
            self._register_state_dict_hook(_drop_own_keys)
            self._register_load_state_dict_pre_hook(_keep_own_values, with_module=True)


def _drop_own_keys(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _keep_own_values(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    # a module checkpoint never holds SER's keys: load the current values for them (a no-op) so that strict
    # loading does not report them missing; SERCallback.load_state_dict restores the saved ones
    for key, value in _own_state(module).items():
        state_dict.setdefault(prefix + key, value)


def _own_state(module: nn.Module) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    for name, p in module.named_parameters():
        out[name] = p.detach()
    for name, b in module.named_buffers():
        if b is not None:
            out[name] = b
    return out


def ser_parameters(module: nn.Module) -> List[nn.Parameter]:
    """The trainable parameters of the SER state a :class:`SERCallback` registered on ``module`` (the token
    head; empty without ``head=True`` or without a callback).

    Call it in ``configure_optimizers`` when the optimizer is built from explicit parameter lists (with
    ``self.parameters()`` they are already included)::

        def configure_optimizers(self):
            groups = [{"params": self.backbone.parameters()}, {"params": ser_parameters(self), "weight_decay": 0.0}]
            return torch.optim.AdamW(groups, lr=1e-3)

    Lightning calls ``configure_optimizers`` after the callbacks' ``setup``, so the state exists by then.

    Args:
        module: the LightningModule.

    Returns:
        A list of parameters with ``requires_grad`` (possibly empty).
    """
    return [p for m in module.children() if isinstance(m, SERModuleState) for p in m.parameters() if p.requires_grad]


class SERCallback(Callback):
    """Adds SER to a LightningModule's training without changing its code.

    Args:
        layer: ``L`` — the token map after the first ``L`` blocks of the backbone (or ``config.layer``).
        config: a :class:`~ser_plugin.SERConfig`, the base; ``preset`` and then ``options`` override it, as in
            :func:`~ser_plugin.attach_ser`. Its ``b2_share`` is the share of each (per-process) batch that gets
            equivariant views (at least 2 images).
        backbone: dotted path of the **online** ViT on the LightningModule (``"backbone"``, ``"student.vit"``).
        images: ``batch -> (B, C, H, W)`` images the b2 rows are taken from (the last ``|b2|`` rows). In
            ``[0, 1]`` when the photometric part is on (the default); with ``photometric=None`` any
            normalisation works (the group action is exact on any values). Default: the first 4-D tensor.
        inject: matched-budget mode: ``(batch, pair) -> batch`` that puts ``pair.x1``/``pair.x2`` in place of
            the last ``len(pair.g1)`` rows of the host's two views (see :func:`ser_plugin.integrations.replace_rows`).
        concatenated: with ``inject``, the host forwards both views in one backbone call (rows: view 1 then view 2).
        late_cls_also: with ``late_cls=True``: dotted paths of networks that must share the online ViT's
            architecture — momentum encoders, EMA teachers — converted to late [CLS] as well (no hook).
        log_name: name under which ``L_equiv`` (unweighted) is logged; ``None`` to not log.
        attribute: name of the child that holds SER's state on the LightningModule during fit.
        **options: :class:`~ser_plugin.SERConfig` fields (``lam``, ``tau``, ``b2_share``, ``head``,
            ``late_cls``, ``photometric``, ``mean``/``std``, ...), ``preset``, and ``attach_ser``'s
            model-description overrides (``blocks``, ``patch_size``, ``num_prefix_tokens``, ``forward``).

    Attributes:
        config: the resolved :class:`~ser_plugin.SERConfig`.
        ser: the :class:`ser_plugin.SER` handle while fitting.
        last_host_loss, last_term: the host's loss and the added ``λ·L_equiv`` (with graph) of the last step.

    Raises:
        SERError: at construction for a bad or unknown option or no layer; at ``setup`` for a wrong backbone
            path or manual optimisation; at ``on_fit_start`` when SER's trainable parameters are in no optimizer.
    """

    def __init__(
        self,
        layer: Optional[int] = None,
        *,
        config: Optional[SERConfig] = None,
        backbone: str = "backbone",
        images: Optional[Callable[[Any], Tensor]] = None,
        inject: Optional[Callable[[Any, ViewPair], Any]] = None,
        concatenated: bool = False,
        late_cls_also: Sequence[str] = (),
        log_name: Optional[str] = "train_ser_loss",
        attribute: str = "ser_state",
        **options: Any,
    ) -> None:
        super().__init__()
        self.attach_options = {k: options.pop(k) for k in list(options) if k in MODEL_OPTIONS}
        preset = options.pop("preset", None)
        self.config: SERConfig = resolve_config(config, preset, options, layer=layer, require_layer=True)
        self.backbone = backbone
        self.images = images or first_image_batch
        self.inject, self.concatenated = inject, concatenated
        self.late_cls_also = tuple(late_cls_also)
        if self.late_cls_also and not self.config.late_cls:
            raise SERError("late_cls_also converts momentum/teacher networks to late [CLS]; it needs late_cls=True.")
        self._late_handles: List[Any] = []
        self.log_name, self.attribute = log_name, attribute
        self.ser: Optional[SER] = None
        self._state: Optional[SERModuleState] = None
        self._pending_state: Optional[Dict[str, Any]] = None
        self._wrapped: Optional[LightningModule] = None
        self.last_host_loss: Optional[Tensor] = None
        self.last_term: Optional[Tensor] = None

    @property
    def b2_share(self) -> float:
        return self.config.b2_share

    @property
    def state_key(self) -> str:
        return self._generate_state_key(backbone=self.backbone, attribute=self.attribute)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.ser is not None:
            return
        if not pl_module.automatic_optimization:
            raise SERError(
                "SERCallback wraps training_step's returned loss, which manual optimisation does not use; with "
                "automatic_optimization=False attach SER yourself (ser = attach_ser(self.backbone, L)) and add ser.loss(pair) to your loss."
            )
        if "training_step" in vars(pl_module):
            raise SERError("training_step of this LightningModule is already wrapped (two SERCallbacks?); use one SERCallback per module.")
        if hasattr(pl_module, self.attribute):
            raise SERError(f"{type(pl_module).__name__} already has an attribute {self.attribute!r}; pass SERCallback(attribute='...').")
        backbone = self._get(pl_module, self.backbone)
        others = [self._get(pl_module, p) for p in self.late_cls_also]
        self.ser = attach_ser(backbone, config=self.config, **self.attach_options)
        self._late_handles = [convert_late_cls(m, self.ser.layer) for m in others]
        self._state = SERModuleState(self.ser.objective)
        pl_module.add_module(self.attribute, self._state)
        if self._pending_state is not None:
            self._load_objective(self._pending_state)
            self._pending_state = None
        orig = pl_module.training_step

        def training_step(batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
            return self._step(pl_module, orig, batch, batch_idx, *args, **kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = pl_module

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.ser is None:
            return
        self.ser.to(pl_module.device)  # the view policy's buffers (the state moved with the module)
        trainable = ser_parameters(pl_module)
        if not trainable:
            return
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [p for p in trainable if id(p) not in held]
        if missing:
            n = sum(p.numel() for p in missing)
            raise SERError(
                f"SER's token head ({len(missing)} tensors, {n} values) is in no optimizer, so it would never train. "
                "In configure_optimizers build the optimizer from self.parameters(), or add ser_parameters(self) "
                "(from ser_plugin.integrations.lightning import ser_parameters), e.g. "
                "torch.optim.AdamW([*self.backbone.parameters(), *self.head.parameters(), *ser_parameters(self)])."
            )

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
            delattr(pl_module, self.attribute)
        self.ser, self._state, self._wrapped = None, None, None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        if self._state is None:
            return {} if self._pending_state is None else dict(self._pending_state)
        return {"layer": self.ser.layer if self.ser is not None else self.config.layer, "objective": self._state.objective.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._state is None:  # restored before setup: applied when the state exists
            self._pending_state = dict(state_dict)
            return
        self._load_objective(state_dict)

    def _load_objective(self, state: Dict[str, Any]) -> None:
        assert self._state is not None
        try:
            self._state.objective.load_state_dict(state["objective"])
        except (KeyError, RuntimeError) as err:
            raise SERError(
                f"the checkpoint's SER state does not fit this SERCallback (saved at layer {state.get('layer')}; now head={self.config.head}, "
                f"head_dims={self.config.head_dims}): {err}. Resume with the same SER options, or start SER afresh without ckpt_path."
            ) from err

    # ------------------------------------------------------------------ the step
    @staticmethod
    def _get(root: nn.Module, path: str) -> nn.Module:
        try:
            obj = root.get_submodule(path)
        except AttributeError as err:
            raise SERError(f"SERCallback: {type(root).__name__} has no submodule {path!r} ({err}); give the dotted path of the online ViT, e.g. backbone='backbone'.") from None
        return obj

    def _views(self, batch: Any, device: torch.device) -> ViewPair:
        x = self.images(batch)
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise SERError(f"SERCallback(images=...) must return a (B, C, H, W) tensor, got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}.")
        n = b2_count(x.shape[0], self.config.b2_share)
        x = x[x.shape[0] - n :].to(device)
        if x.dtype == torch.uint8:  # raw pixels: [0, 1], then the config's normalisation (the views' input convention)
            x = views_input(x, self.config.mean, self.config.std)
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
            f1, f2 = b2_maps(caps, n, concatenated=self.concatenated)
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
