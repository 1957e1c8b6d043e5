"""Official MoCo-v3 pre-training (facebookresearch/moco-v3, ``main_moco.py``) with SER added.

Runs the user's own checkout, unmodified: the launcher imports ``main_moco`` from it, adds the ``--ser-*`` flags
of :class:`ser_plugin.SERConfig` to its parser (``ser_plugin.integrations.add_ser_args``, starting from the
``mocov3`` recipe of ``ser_plugin.integrations.HOST_RECIPES``) and replaces three names before ``main_worker``
runs (in every spawned process):

* ``moco.builder.MoCo_ViT`` → a subclass that attaches SER to the **online** ``base_encoder`` (never the
  momentum encoder), holds the SER handle as its own child (so DDP syncs the optional token head, LARS gets
  its parameters through ``model.parameters()``, checkpoints save it), and in ``forward`` puts the b2 views in
  place of the last ``|b2|`` rows of both crops, captures block L during the host's own two passes, and
  returns ``host_loss + λ·L_equiv``.
* ``moco.loader.TwoCropsTransform`` → a subclass that also returns a plain uint8 crop per image (the base the
  equivariant views are made from, on the GPU).
* ``main_moco.train`` → the original ``train`` fed through a loader wrapper that moves the b2 base crops to
  the GPU and draws the views.

Usage (one node, 8 GPUs, ViT-S/16, 100 epochs, the official recipe of CONFIG.md plus SER)::

    python examples/moco_v3/main_moco_ser.py --moco-dir /path/to/moco-v3 \\
      -a vit_small -b 1024 --optimizer=adamw --lr=1.5e-4 --weight-decay=.1 --epochs=100 --warmup-epochs=40 \\
      --stop-grad-conv1 --moco-m-cos --moco-t=.2 \\
      --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 \\
      --ser-layer 3 --ser-lam 1.0 --ser-tau 0.3 --ser-b2-share 0.01 \\
      /path/to/imagenet

``--moco-dir`` may be replaced by the environment variable ``SER_MOCOV3_DIR``. MoCo-v3 needs timm 0.4.9
(0.5.4 also works) and tensorboard.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Iterator, Optional, Tuple

ENV_VAR = "SER_MOCOV3_DIR"


def _ser():
    # imported lazily so that this file can be unpickled by spawned workers before sys.path is complete
    import ser_plugin
    import ser_plugin.integrations as integ

    return ser_plugin, integ


#: the objective whose recipe (ser_plugin.integrations.HOST_RECIPES) gives this launcher's defaults
RECIPE = "mocov3"


def ser_config(args: Any) -> Any:
    """The :class:`ser_plugin.SERConfig` of a parsed command line: the MoCo-v3 recipe, then ``--ser-preset``, then
    the ``--ser-*`` flags given. The views are normalised like MoCo-v3's crops (ImageNet mean/std) unless
    ``--ser-mean``/``--ser-std`` say otherwise."""
    _, integ = _ser()
    return launch().launcher_config(args, RECIPE, integ.IMAGENET_MEAN, integ.IMAGENET_STD)


def launch() -> Any:
    import ser_plugin.integrations.launch as launch_mod

    return launch_mod


def import_mocov3(path: Optional[str] = None) -> Tuple[Any, Any, Any]:
    """Imports ``main_moco``, ``moco.builder`` and ``moco.loader`` from the user's checkout."""
    launch().import_checkout(path, env_var=ENV_VAR, marker="main_moco.py", flag="--moco-dir", repo="facebookresearch/moco-v3")
    import timm

    major, minor = (int(v) for v in timm.__version__.split(".")[:2])
    if (major, minor) >= (0, 6):
        raise SystemExit(
            f"MoCo-v3's vits.py needs timm 0.4.9 (or 0.5.4); this environment has timm {timm.__version__}. "
            "Install it in the MoCo-v3 environment: pip install timm==0.4.9"
        )
    import main_moco
    import moco.builder
    import moco.loader

    return main_moco, moco.builder, moco.loader


def ser_moco_class(base: type, cfg: Any) -> type:
    """Subclass of ``moco.builder.MoCo_ViT`` (``base``) that adds SER to the online encoder."""
    ser_plugin, integ = _ser()

    class MoCoSER(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # child of the MoCo module, not of base_encoder: momentum updates zip the encoders' parameters
            self.ser = ser_plugin.attach_ser(self.base_encoder, config=cfg)
            # the momentum encoder is an EMA of the online one: same architecture, so late [CLS] there too (no hook)
            self.momentum_late_cls = ser_plugin.convert_late_cls(self.momentum_encoder, self.ser.layer) if cfg.late_cls else None
            self.ser_pair = None  # set by the loader wrapper before every step
            self.last_host_loss = None
            self.last_ser_term = None

        def forward(self, x1, x2, m):  # noqa: ANN001 - the host's signature
            pair, self.ser_pair = self.ser_pair, None
            if pair is None:
                raise ser_plugin.SERError(
                    "MoCoSER.forward got no b2 views: feed the loader through main_moco_ser.SERBatches (done by the launcher)."
                )
            n = len(pair.g1)
            x1, x2 = integ.replace_rows(x1, pair.x1), integ.replace_rows(x2, pair.x2)
            with self.ser.capture():
                loss = super().forward(x1, x2, m)
            caps = self.ser.captures
            self.ser.clear()
            f1, f2 = integ.b2_maps(caps, n, exact=True)  # MoCo_ViT runs the online encoder once per crop
            term = integ.loss_from_maps(self.ser, pair, f1, f2)
            self.last_host_loss, self.last_ser_term = loss.detach(), term
            return loss + term

    MoCoSER.__name__ = MoCoSER.__qualname__ = "MoCoSER"
    return MoCoSER


class SERBatches:
    """Wraps the training loader: strips the base crops and draws this step's b2 views on the model's device."""

    def __init__(self, loader: Any, model: Any) -> None:
        self.loader, self.model = loader, model

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        core = self.model.module if hasattr(self.model, "module") else self.model
        for images, target in self.loader:
            images, core.ser_pair = launch().b2_views_of_batch(images, core.ser, next(core.base_encoder.parameters()).device)
            yield images, target


def install(args: Any) -> None:
    """Replaces MoCo_ViT, TwoCropsTransform and train in the imported host modules (idempotent per process)."""
    main_moco, builder, loader = import_mocov3(args.moco_dir)
    if getattr(main_moco, "_ser_installed", False):
        return
    cfg = ser_config(args)
    builder.MoCo_ViT = ser_moco_class(builder.MoCo_ViT, cfg)
    loader.TwoCropsTransform = launch().with_base_crop(loader.TwoCropsTransform, 224, (args.crop_min, 1.0))  # main_moco crops 224
    orig_train = main_moco.train

    def train(train_loader, model, *rest):  # noqa: ANN001
        return orig_train(SERBatches(train_loader, model), model, *rest)

    main_moco.train = train
    main_moco._ser_installed = True


def ser_main_worker(gpu: Any, ngpus_per_node: int, args: Any) -> None:
    """``main_worker`` with SER installed first (module-level so that ``mp.spawn`` can pickle it)."""
    install(args)
    import main_moco

    orig = getattr(main_moco, "_ser_orig_main_worker", main_moco.main_worker)  # spawned workers import main_moco afresh
    return orig(gpu, ngpus_per_node, args)


def add_ser_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--ser-*`` flags of :class:`ser_plugin.SERConfig`, with the MoCo-v3 recipe's defaults in ``--help``."""
    _, integ = _ser()
    integ.add_ser_args(parser, base=integ.recipe(RECIPE))


def main(argv: Optional[list] = None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--moco-dir", default=None)
    known, rest = pre.parse_known_args(argv if argv is not None else sys.argv[1:])
    main_moco, _, _ = import_mocov3(known.moco_dir)
    add_ser_arguments(main_moco.parser)
    main_moco.parser.set_defaults(moco_dir=os.path.abspath(known.moco_dir or os.environ[ENV_VAR]))
    main_moco._ser_orig_main_worker = main_moco.main_worker
    main_moco.main_worker = ser_main_worker
    sys.argv = [sys.argv[0]] + rest
    main_moco.main()


if __name__ == "__main__":
    main()
