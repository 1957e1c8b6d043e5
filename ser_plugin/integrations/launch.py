"""What the launchers of official SSL repositories (MoCo-v3, DINO) share: finding the user's checkout, the
launcher's SERConfig, the loader-side base crop added to the host's transform, and the b2 views of a batch.

The launchers import the user's checkout and subclass or wrap its names; no file of the checkout is edited.

Example:
    >>> main_moco = import_checkout("/path/to/moco-v3", env_var="SER_MOCOV3_DIR", marker="main_moco.py",
    ...                             flag="--moco-dir", repo="facebookresearch/moco-v3")  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any, List, Optional, Sequence, Tuple

from ..config import SERConfig
from ..views import ViewPair

__all__ = ["import_checkout", "launcher_config", "with_base_crop", "b2_views_of_batch"]


def import_checkout(path: Optional[str], *, env_var: str, marker: str, flag: str, repo: str) -> str:
    """Puts the user's checkout of ``repo`` first on ``sys.path`` and returns its absolute path.

    Args:
        path: the checkout given on the command line (``None``: the environment variable ``env_var``).
        env_var: the environment variable naming the checkout.
        marker: a file that the checkout has at its root (e.g. ``main_moco.py``).
        flag: the launcher's flag for the checkout, named in the message.
        repo: ``owner/name`` of the official repository, named in the message.

    Raises:
        SystemExit: no checkout given, or the path is not a checkout of ``repo`` (a launcher's usage error).
    """
    path = path or os.environ.get(env_var)
    if not path:
        raise SystemExit(f"give the {repo} checkout: {flag} /path/to/checkout or {env_var}=/path/to/checkout")
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, marker)):
        raise SystemExit(f"{path} is not a {repo} checkout (no {marker})")
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


def launcher_config(args: Any, recipe_name: str, mean: Sequence[float], std: Sequence[float]) -> SERConfig:
    """A launcher's :class:`~ser_plugin.SERConfig`: the host's recipe, then ``--ser-preset``, then the ``--ser-*`` flags
    given (:func:`~ser_plugin.integrations.config_from_args`); the views are normalised with the host's crop
    statistics ``mean``/``std`` unless ``--ser-mean``/``--ser-std`` say otherwise."""
    from .options import config_from_args

    cfg = config_from_args(args, recipe_name)
    return cfg if cfg.mean is not None else cfg.replace(mean=tuple(mean), std=tuple(std))


def with_base_crop(transform_cls: type, size: int, scale: Optional[Tuple[float, float]] = None, scale_arg: Optional[str] = None) -> type:
    """Subclass of the host's multi-crop transform whose call also returns a plain uint8 crop (the last entry):
    the base the equivariant views are made from, on the device (:class:`~ser_plugin.integrations.BaseCrop`).

    Args:
        transform_cls: the host's class (MoCo-v3 ``TwoCropsTransform``, DINO ``DataAugmentationDINO``).
        size: the base crop's side (the host's global crop size).
        scale: the base crop's area range; or ``scale_arg``: the name of the constructor argument that holds
            the host's own global-crop range (DINO's ``global_crops_scale``).
    """
    from . import BaseCrop

    class WithBaseCrop(transform_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if scale_arg is not None:
                given = inspect.signature(transform_cls.__init__).bind(self, *args, **kwargs).arguments[scale_arg]
            self.base_crop = BaseCrop(size, tuple(given) if scale_arg is not None else (scale or (0.08, 1.0)))

        def __call__(self, image: Any) -> List[Any]:
            return list(super().__call__(image)) + [self.base_crop(image)]

    WithBaseCrop.__name__ = WithBaseCrop.__qualname__ = transform_cls.__name__ + "WithBase"
    return WithBaseCrop


def b2_views_of_batch(images: Sequence[Any], ser: Any, device: Any) -> Tuple[List[Any], ViewPair]:
    """Splits the base crops (the last entry, from :func:`with_base_crop`) off the host's crops and draws the b2
    views of the last ``|b2|`` images on ``device``.

    Returns:
        ``(crops, pair)``: the host's crops as it expects them, and the :class:`~ser_plugin.ViewPair`.
    """
    from . import b2_count, views_input

    crops = list(images)
    base = crops.pop()
    n = b2_count(base.shape[0], ser.config.b2_share)
    pair = ser.views(views_input(base[-n:].to(device, non_blocking=True), ser.config.mean, ser.config.std))
    return crops, pair
