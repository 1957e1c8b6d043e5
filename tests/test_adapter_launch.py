"""The launcher helpers the MoCo-v3 and DINO adapters share (ser_plugin.integrations.launch), without a checkout:
tests/test_adapter_mocov3.py and test_adapter_dino.py run them against the official repositories."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from conftest import tiny_timm

from ser_plugin import attach_ser
from ser_plugin.integrations import IMAGENET_MEAN, IMAGENET_STD, add_ser_args
from ser_plugin.integrations.launch import b2_views_of_batch, import_checkout, launcher_config, with_base_crop

PIL = pytest.importorskip("PIL.Image", reason="Pillow is not installed (torchvision's transforms need it)")


class HostCrops:
    """A host transform shaped like DINO's DataAugmentationDINO (global crop range as a constructor argument)."""

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number):  # noqa: ANN001
        self.n = 2 + local_crops_number

    def __call__(self, image):  # noqa: ANN001
        return [torch.zeros(3, 8, 8)] * self.n


def test_with_base_crop_appends_a_uint8_crop_with_the_hosts_range():
    cls = with_base_crop(HostCrops, 16, scale_arg="global_crops_scale")
    t = cls((0.4, 1.0), (0.05, 0.4), local_crops_number=2)
    out = t(PIL.fromarray((torch.rand(24, 24, 3) * 255).byte().numpy()))
    assert len(out) == 5 and out[-1].dtype == torch.uint8 and tuple(out[-1].shape) == (3, 16, 16)
    assert t.base_crop.scale == (0.4, 1.0) and cls.__name__ == "HostCropsWithBase" and isinstance(t, HostCrops)
    fixed = with_base_crop(HostCrops, 16, (0.5, 1.0))((0.4, 1.0), (0.05, 0.4), 0)
    assert fixed.base_crop.scale == (0.5, 1.0)


def test_b2_views_of_batch_strips_the_base_and_draws_the_last_rows():
    vit = tiny_timm()
    ser = attach_ser(vit, 2, b2_share=0.25, photometric=None, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    base = (torch.rand(8, 3, 32, 32) * 255).byte()
    crops, pair = b2_views_of_batch([torch.zeros(8, 3, 32, 32), torch.ones(8, 3, 32, 32), base], ser, torch.device("cpu"))
    assert len(crops) == 2 and len(pair.g1) == 2  # round(0.25 * 8) images: the last two rows of the base
    assert tuple(pair.x1.shape) == (2, 3, 32, 32) and float(pair.x1.min()) < 0  # normalised like the host's crops
    ser.remove()


def test_launcher_config_and_checkout_errors(tmp_path):
    parser = argparse.ArgumentParser()
    add_ser_args(parser, base="dino")
    cfg = launcher_config(parser.parse_args(["--ser-lam", "0.5"]), "dino", IMAGENET_MEAN, IMAGENET_STD)
    assert (cfg.layer, cfg.lam, cfg.tau, cfg.mean, cfg.std) == (3, 0.5, 0.5, IMAGENET_MEAN, IMAGENET_STD)
    own = launcher_config(parser.parse_args(["--ser-mean", "0.5", "--ser-std", "0.2"]), "dino", IMAGENET_MEAN, IMAGENET_STD)
    assert (own.mean, own.std) == ((0.5,), (0.2,))
    with pytest.raises(SystemExit, match="--dino_dir /path/to/checkout or SER_TEST_DIR"):
        import_checkout(None, env_var="SER_TEST_DIR", marker="main_dino.py", flag="--dino_dir", repo="facebookresearch/dino")
    with pytest.raises(SystemExit, match="not a facebookresearch/dino checkout"):
        import_checkout(str(tmp_path), env_var="SER_TEST_DIR", marker="main_dino.py", flag="--dino_dir", repo="facebookresearch/dino")
    (tmp_path / "main_dino.py").write_text("")
    try:
        assert import_checkout(str(tmp_path), env_var="SER_TEST_DIR", marker="main_dino.py", flag="--dino_dir", repo="x") == str(tmp_path)
        assert sys.path[0] == str(tmp_path)
    finally:
        sys.path.remove(str(tmp_path))
