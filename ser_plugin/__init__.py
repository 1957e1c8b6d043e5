"""ser_plugin: Soft Equivariance Regularization (SER, ICLR 2026) for any self-supervised ViT training loop.

    from ser_plugin import attach_ser
    ser = attach_ser(model, layer=6)
"""

from .attach import SER, attach_ser, remove_ser
from .config import PRESETS, SERConfig, resolve_config
from .errors import SERError
from .group import D4_ELEMENTS, GroupElement, act_image, rho
from .late_cls import LateCLS, convert_late_cls
from .loss import TokenHead, TokenInfoNCE
from .metrics import equivariance_score
from .objective import SERLoss
from .views import EquivariantViews, ViewPair, ViewTransform, collate_views, rescale_pair

__version__ = "0.1.0"

__all__ = [
    "attach_ser",
    "SER",
    "remove_ser",
    "SERConfig",
    "PRESETS",
    "resolve_config",
    "SERLoss",
    "SERError",
    "GroupElement",
    "D4_ELEMENTS",
    "act_image",
    "rho",
    "EquivariantViews",
    "ViewPair",
    "ViewTransform",
    "collate_views",
    "rescale_pair",
    "TokenInfoNCE",
    "TokenHead",
    "convert_late_cls",
    "LateCLS",
    "equivariance_score",
]
