"""solo-learn pre-training (vturrisi/solo-learn, ``main_pretrain.py``) with SER, through the Lightning callback.

Runs the user's own checkout, unmodified: the launcher imports ``main_pretrain`` from it and replaces four
names before its Hydra ``main`` runs:

* ``main_pretrain.parse_cfg`` → the original, after taking the ``ser:`` node out of the config
  (``++ser.layer=3 ++ser.lam=1.0 ...``: the fields of :class:`ser_plugin.SERConfig`, checked against its
  structured config ``ser_plugin.integrations.SERStructuredConfig``; defaults: the recipe of ``cfg.method`` in
  ``ser_plugin.integrations.HOST_RECIPES`` when there is one — mocov3, dino, barlow_twins —, else the library
  defaults with ``layer=3``; ``++ser.enabled=false`` runs solo-learn without SER);
* ``main_pretrain.FullTransformPipeline`` → a subclass that appends one plain uint8 crop per image (the base
  of the b2 views) after the method's crops — not listed in ``cfg.augmentations``, so solo's crop-count
  checks are unaffected;
* ``main_pretrain.Trainer`` → a subclass that adds :class:`ser_plugin.integrations.lightning.SERCallback`
  in matched-budget mode: on the **online** ``backbone`` (never ``momentum_backbone``), the b2 views replace
  the last ``|b2|`` rows of the two large crops, layer L is captured during solo's own ``training_step`` and
  ``λ·L_equiv`` is added to its loss. The SER handle (and optional token head) is a child module of the
  method, so Lightning's DDP syncs it;
* ``main_pretrain.METHODS`` → the same methods, each subclassed so that ``learnable_params`` (which solo's
  ``configure_optimizers`` turns into parameter groups) also lists the optional token head
  (``ser_parameters(self)``, weight decay 0).

Works with every solo method whose ``training_step`` forwards the large crops one by one through
``self.backbone`` (BaseMethod / BaseMomentumMethod: mocov3, byol, dino, barlow, simclr, vicreg, ...), with the
``image_folder`` (or ``h5``) data format — not DALI, whose pipeline runs outside these Python transforms.

Usage (ImageNet-100, ViT-S/16, MoCo-v3 recipe shipped with solo-learn, 2 GPUs)::

    cd /path/to/solo-learn
    python /path/to/ser_plugin/examples/solo_learn/main_pretrain_ser.py --solo-dir . \\
      --config-path scripts/pretrain/imagenet-100/ --config-name mocov3_vit.yaml data.format=image_folder \\
      ++ser.layer=3 ++ser.lam=1.0 ++ser.tau=0.3 ++ser.b2_share=0.05

``--solo-dir`` may be replaced by the environment variable ``SER_SOLO_DIR``.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

ENV_VAR = "SER_SOLO_DIR"
#: extra Lightning callbacks appended next to SER's (used by the smoke test)
EXTRA_CALLBACKS: List[Any] = []


def base_config(method: Optional[str]) -> Any:
    """The defaults for a solo-learn method: its recipe when there is one, else the library defaults at layer 3."""
    from ser_plugin.integrations import HOST_RECIPES, recipe

    return recipe(method) if method in HOST_RECIPES else recipe(None, layer=3)


def ser_config(node: Any, method: Optional[str]) -> Tuple[Any, bool]:
    """``(SERConfig, enabled)`` of the ``ser:`` config node (``++ser.<field>=<value>``): the method's defaults,
    then ``preset``, then the keys given; ``enabled`` (default true) is this launcher's on/off switch."""
    from ser_plugin.integrations import config_from_structured

    raw: Dict[str, Any] = {}
    if node is not None:
        try:
            from omegaconf import OmegaConf

            raw = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        except ImportError:  # pragma: no cover - solo-learn needs OmegaConf anyway
            raw = dict(node)
    enabled = bool(raw.pop("enabled", True))
    return config_from_structured(raw, base_config(method)), enabled


def with_ser_params(cls: type) -> type:
    """Subclass of a solo method whose ``learnable_params`` also lists SER's token head (when there is one)."""

    class WithSER(cls):  # type: ignore[misc, valid-type]
        @property
        def learnable_params(self) -> List[Dict[str, Any]]:
            from ser_plugin.integrations.lightning import ser_parameters

            params = list(super().learnable_params)
            head = ser_parameters(self)
            return params + ([{"name": "ser_head", "params": head, "weight_decay": 0.0}] if head else [])

    WithSER.__name__, WithSER.__qualname__ = cls.__name__, cls.__qualname__
    return WithSER


class _Run:
    cfg: Any = None
    enabled: bool = True
    solo_cfg: Any = None
    callback: Any = None
    mean_std: Any = None


RUN = _Run()


def import_solo(path: Optional[str] = None) -> Any:
    path = path or os.environ.get(ENV_VAR)
    if not path:
        raise SystemExit(f"give the solo-learn checkout: --solo-dir /path/to/solo-learn or {ENV_VAR}=/path/to/solo-learn")
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "main_pretrain.py")) or not os.path.isdir(os.path.join(path, "solo")):
        raise SystemExit(f"{path} is not a vturrisi/solo-learn checkout (no main_pretrain.py and solo/)")
    if path not in sys.path:
        sys.path.insert(0, path)
    import main_pretrain

    return main_pretrain


def find_normalize(transform: Any, depth: int = 0) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """Mean and std of the first ``Normalize`` inside solo's transform pipeline (the views get the same)."""
    if depth > 6 or transform is None:
        return None
    if type(transform).__name__ == "Normalize" and hasattr(transform, "mean") and hasattr(transform, "std"):
        return tuple(float(v) for v in transform.mean), tuple(float(v) for v in transform.std)
    children: List[Any] = list(transform) if isinstance(transform, (list, tuple)) else []
    for name in ("transforms", "transform"):
        v = getattr(transform, name, None)
        children.extend(v if isinstance(v, (list, tuple)) else [v])
    for c in children:
        found = find_normalize(c, depth + 1)
        if found is not None:
            return found
    return None


def inject(batch: Any, pair: Any) -> Any:
    """solo batch ``[idx, crops + [base], y]`` → ``[idx, crops, y]`` with the b2 views in the two large crops."""
    from ser_plugin.integrations import replace_rows

    idx, crops, y = batch
    crops = list(crops[:-1])
    crops[0], crops[1] = replace_rows(crops[0], pair.x1), replace_rows(crops[1], pair.x2)
    return [idx, crops, y]


def make_callback(cfg: Any, solo_cfg: Any) -> Any:
    from ser_plugin.integrations.lightning import SERCallback

    if cfg.mean is None:
        if RUN.mean_std is None:
            raise SystemExit("no Normalize found in solo's transform pipeline; give ++ser.mean=[...] ++ser.std=[...] (the crops' normalisation).")
        cfg = cfg.replace(mean=RUN.mean_std[0], std=RUN.mean_std[1])
    return SERCallback(
        config=cfg, backbone="backbone", images=lambda batch: batch[1][-1], inject=inject,
        # the momentum backbone is an EMA of the online one: same (late-[CLS]) architecture, no hook
        late_cls_also=("momentum_backbone",) if cfg.late_cls else (),
    )


def install() -> None:
    """Patches ``main_pretrain`` (once per process)."""
    import main_pretrain

    if getattr(main_pretrain, "_ser_installed", False):
        return
    orig_parse = main_pretrain.parse_cfg

    def parse_cfg(cfg: Any) -> Any:
        RUN.cfg, RUN.enabled = ser_config(cfg.pop("ser", None), cfg.get("method"))
        cfg = orig_parse(cfg)
        RUN.solo_cfg = cfg
        if RUN.enabled and cfg.data.format == "dali":
            raise SystemExit("the SER adapter needs data.format=image_folder (or h5): DALI pipelines run outside the Python transforms.")
        return cfg

    base_pipeline = main_pretrain.FullTransformPipeline

    class FullTransformPipelineWithBase(base_pipeline):  # type: ignore[misc, valid-type]
        def __init__(self, transforms: Any) -> None:
            super().__init__(transforms)
            from ser_plugin.integrations import BaseCrop

            RUN.mean_std = find_normalize(transforms)

            aug = RUN.solo_cfg.augmentations[0]
            rrc = aug.get("rrc", {}) or {}
            scale = (float(rrc.get("crop_min_scale", 0.08)), float(rrc.get("crop_max_scale", 1.0)))  # solo's rrc keys
            self.base_crop = BaseCrop(int(aug.crop_size), scale) if RUN.enabled else None

        def __call__(self, x: Any) -> Any:
            out = super().__call__(x)
            return out + [self.base_crop(x)] if self.base_crop is not None else out

    base_trainer = main_pretrain.Trainer

    class TrainerWithSER(base_trainer):  # type: ignore[misc, valid-type]
        @functools.wraps(base_trainer.__init__)  # main_pretrain reads the signature to pick Trainer kwargs
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            callbacks = list(kwargs.pop("callbacks", None) or [])
            if RUN.cfg is not None and RUN.enabled:
                RUN.callback = make_callback(RUN.cfg, RUN.solo_cfg)
                callbacks.append(RUN.callback)
            super().__init__(*args, callbacks=callbacks + list(EXTRA_CALLBACKS), **kwargs)

    main_pretrain.parse_cfg = parse_cfg
    main_pretrain.METHODS = {name: with_ser_params(cls) for name, cls in main_pretrain.METHODS.items()}
    main_pretrain.FullTransformPipeline = FullTransformPipelineWithBase
    main_pretrain.Trainer = TrainerWithSER
    main_pretrain._ser_installed = True


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    solo_dir = None
    for i, a in enumerate(argv):
        if a == "--solo-dir":
            solo_dir = argv[i + 1]
            del argv[i : i + 2]
            break
        if a.startswith("--solo-dir="):
            solo_dir = a.split("=", 1)[1]
            del argv[i]
            break
    main_pretrain = import_solo(solo_dir)
    install()
    # Hydra resolves a relative --config-path against the imported module, not the cwd: make it absolute
    solo_root = os.path.dirname(os.path.abspath(main_pretrain.__file__))
    for i, a in enumerate(argv):
        for flag in ("--config-path", "-cp"):
            if a == flag and i + 1 < len(argv) and not os.path.isabs(argv[i + 1]):
                cand = argv[i + 1]
                argv[i + 1] = os.path.abspath(cand) if os.path.isdir(cand) else os.path.join(solo_root, cand)
            elif a.startswith(flag + "=") and not os.path.isabs(a.split("=", 1)[1]):
                cand = a.split("=", 1)[1]
                argv[i] = flag + "=" + (os.path.abspath(cand) if os.path.isdir(cand) else os.path.join(solo_root, cand))
    sys.argv = [os.path.join(os.path.dirname(main_pretrain.__file__), "main_pretrain.py")] + argv
    main_pretrain.main()


if __name__ == "__main__":
    main()
