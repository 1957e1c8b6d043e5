"""Official DINO pre-training (facebookresearch/dino, ``main_dino.py``) with SER added.

Runs the user's own checkout, unmodified: the launcher imports ``main_dino`` from it, adds the ``--ser-*`` flags
of :class:`ser_plugin.SERConfig` to its parser (``ser_plugin.integrations.add_ser_args``, starting from the
``dino`` recipe of ``ser_plugin.integrations.HOST_RECIPES``) and replaces three names before ``train_dino`` runs:

* ``main_dino.DataAugmentationDINO`` → a subclass that also returns a plain uint8 224 crop per image (the base
  the equivariant views are made from, on the GPU).
* ``utils.get_params_groups`` → the original, plus: attaches SER to the **student** backbone (never the
  teacher, which is built separately and EMA-updated by zipping parameters — nothing is registered under the
  student) and appends the optional token head as an extra parameter group (weight decay 0).
* ``main_dino.train_one_epoch`` → the original, fed through a loader wrapper that puts the b2 views in place of
  the last ``|b2|`` rows of the two *global* crops and arms the capture, and through a wrapper around
  ``DINOLoss`` that adds ``λ·L_equiv`` computed from the student's own pass over the global crops.

Matched 2-view budget: ``MultiCropWrapper`` runs the two global crops as one backbone call, so the b2 views
(224, D4 only) ride in that call and also enter the DINO loss (teacher and student); no extra encoder pass, no
extra crop in ``student(images)`` (which would break ``DINOLoss``'s crop chunking). Local crops of b2 images
are untouched. Scale views (other sizes) cannot replace rows of fixed-size global crops, so this adapter uses
D4 only.

Usage (ViT-S/16, 100 epochs, 8 GPUs, the README's recipe plus SER)::

    torchrun --nproc_per_node=8 examples/dino/main_dino_ser.py --dino_dir /path/to/dino \\
      --arch vit_small --data_path /path/to/imagenet/train --output_dir /path/to/out \\
      --ser-layer 3 --ser-lam 0.3 --ser-tau 0.5 --ser-b2-share 0.01

``--dino_dir`` may be replaced by the environment variable ``SER_DINO_DIR``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Iterator, Optional

ENV_VAR = "SER_DINO_DIR"
#: the objective whose recipe (ser_plugin.integrations.HOST_RECIPES) gives this launcher's defaults
RECIPE = "dino"


def ser_config(args: Any) -> Any:
    """The :class:`ser_plugin.SERConfig` of a parsed command line: the DINO recipe, then ``--ser-preset``, then the
    ``--ser-*`` flags given. The views are normalised like DINO's crops (ImageNet mean/std) unless
    ``--ser-mean``/``--ser-std`` say otherwise."""
    from ser_plugin.integrations import IMAGENET_MEAN, IMAGENET_STD
    from ser_plugin.integrations.launch import launcher_config

    return launcher_config(args, RECIPE, IMAGENET_MEAN, IMAGENET_STD)


class SERState:
    """What the adapter keeps per process: the SER handle (set when the student's optimizer groups are built)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.ser: Any = None
        self.pair: Any = None
        self.teacher_late: Any = None
        self.last_host_loss: Any = None
        self.last_ser_term: Any = None


STATE: Optional[SERState] = None


def import_dino(path: Optional[str] = None) -> Any:
    """Imports ``main_dino`` (and with it DINO's ``utils`` and ``vision_transformer``) from the user's checkout."""
    from ser_plugin.integrations.launch import import_checkout

    import_checkout(path, env_var=ENV_VAR, marker="main_dino.py", flag="--dino_dir", repo="facebookresearch/dino")
    import main_dino

    return main_dino


def augmentation_with_base(base_cls: type, size: int = 224) -> type:
    """Subclass of ``DataAugmentationDINO`` returning ``crops + [base_uint8]`` (the base crop uses DINO's
    ``global_crops_scale``)."""
    from ser_plugin.integrations.launch import with_base_crop

    return with_base_crop(base_cls, size, scale_arg="global_crops_scale")


def params_groups_with_ser(orig: Any, state: SERState) -> Any:
    """Wraps DINO's ``utils.get_params_groups(student)``: attaches SER to the student backbone first."""
    from ser_plugin import attach_ser
    from ser_plugin.integrations import average_grads_across_ranks

    def get_params_groups(model: Any) -> Any:
        groups = orig(model)
        if state.ser is None:
            student = model.module if hasattr(model, "module") else model
            state.ser = attach_ser(student.backbone, config=state.cfg)
            dev = next(student.parameters()).device
            state.ser.to(dev)
            head = [p for p in state.ser.parameters() if p.requires_grad]
            if head:
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():  # same initial head on every rank
                    for p in state.ser.parameters():
                        dist.broadcast(p.data, src=0)
                average_grads_across_ranks(state.ser)  # the head lives outside the student's DDP
                groups = list(groups) + [{"params": head, "weight_decay": 0.0}]
        return groups

    return get_params_groups


class SERBatches:
    """Loader wrapper: strips the base crops, puts the b2 views in the global crops, arms the capture."""

    def __init__(self, loader: Any, state: SERState) -> None:
        self.loader, self.state = loader, state

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # e.g. data_loader.sampler
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        from ser_plugin.integrations import replace_rows
        from ser_plugin.integrations.launch import b2_views_of_batch

        ser = self.state.ser
        for images, target in self.loader:
            device = next(ser.model.parameters()).device
            images, pair = b2_views_of_batch(images, ser, device)
            images[0] = replace_rows(images[0].to(device, non_blocking=True), pair.x1)
            images[1] = replace_rows(images[1].to(device, non_blocking=True), pair.x2)
            self.state.pair = pair
            ser.clear()
            with ser.capture():  # armed for this step; only the student backbone carries the hook
                yield images, target


class DINOLossWithSER:
    """Calls the host's ``DINOLoss`` unchanged and adds ``λ·L_equiv`` from the student's global-crop pass."""

    def __init__(self, dino_loss: Any, state: SERState) -> None:
        self.inner, self.state = dino_loss, state

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, student_output: Any, teacher_output: Any, epoch: int) -> Any:
        from ser_plugin.integrations import b2_maps, loss_from_maps

        loss = self.inner(student_output, teacher_output, epoch)
        ser, pair = self.state.ser, self.state.pair
        caps = ser.captures
        ser.clear()
        # MultiCropWrapper runs the two global crops as one call: rows 0..b crop 1, rows b..2b crop 2 (local crops: later captures)
        f1, f2 = b2_maps(caps, len(pair.g1), concatenated=True)
        term = loss_from_maps(ser, pair, f1, f2)
        self.state.last_host_loss, self.state.last_ser_term = loss.detach(), term
        return loss + term


def install(args: Any) -> SERState:
    """Patches the imported DINO modules (once per process) and returns the adapter state."""
    global STATE
    main_dino = import_dino(args.dino_dir)
    if STATE is not None:
        return STATE
    import utils  # DINO's utils, from the checkout

    state = STATE = SERState(ser_config(args))
    main_dino.DataAugmentationDINO = augmentation_with_base(main_dino.DataAugmentationDINO)
    utils.get_params_groups = params_groups_with_ser(utils.get_params_groups, state)
    orig_train_one_epoch = main_dino.train_one_epoch

    def train_one_epoch(student, teacher, teacher_without_ddp, dino_loss, data_loader, *rest):  # noqa: ANN001
        if state.ser is None:
            raise RuntimeError("SER was not attached: utils.get_params_groups(student) must run before training (it does in train_dino).")
        if state.cfg.late_cls and state.teacher_late is None:
            from ser_plugin import convert_late_cls

            # the teacher is an EMA of the student: same architecture (late [CLS]), no capture hook
            state.teacher_late = convert_late_cls(teacher_without_ddp.backbone, state.ser.layer)
        return orig_train_one_epoch(
            student, teacher, teacher_without_ddp, DINOLossWithSER(dino_loss, state), SERBatches(data_loader, state), *rest
        )

    main_dino.train_one_epoch = train_one_epoch
    return state


def add_ser_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dino_dir`` (DINO's own flag style) and the ``--ser-*`` flags of :class:`ser_plugin.SERConfig`, with the
    DINO recipe's defaults in ``--help``."""
    from ser_plugin.integrations import add_ser_args, recipe

    parser.add_argument("--dino_dir", default=os.environ.get(ENV_VAR), help=f"DINO checkout (or {ENV_VAR})")
    add_ser_args(parser, base=recipe(RECIPE))


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """DINO's own arguments (``get_args_parser``) plus ``--dino_dir`` and the ``--ser-*`` flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dino_dir", default=None)
    known, _ = pre.parse_known_args(argv if argv is not None else sys.argv[1:])
    main_dino = import_dino(known.dino_dir)
    parser = argparse.ArgumentParser("DINO + SER", parents=[main_dino.get_args_parser()])
    add_ser_arguments(parser)
    args = parser.parse_args(argv)
    args.dino_dir = os.path.abspath(args.dino_dir or os.environ[ENV_VAR])
    return args


def main(argv: Optional[list] = None) -> None:
    from pathlib import Path

    args = parse_args(argv)
    main_dino = import_dino(args.dino_dir)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    install(args)
    main_dino.train_dino(args)


if __name__ == "__main__":
    main()
