"""The solo-learn adapter (via SERCallback) against the real repository: one training step on the CPU.

Runs only with a checkout: ``SER_SOLO_DIR=/path/to/solo-learn`` (git clone https://github.com/vturrisi/solo-learn;
its head, 1.0.6, not the PyPI release). solo-learn's own dependencies (hydra-core, omegaconf, timm, lightning,
``setuptools<81``) must be importable. The step runs in a subprocess (Hydra, patched host modules).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "solo_learn", "smoke_step.py")

pytestmark = pytest.mark.skipif(
    not os.environ.get("SER_SOLO_DIR"),
    reason="SER_SOLO_DIR is not set: clone vturrisi/solo-learn and set SER_SOLO_DIR to run the solo-learn adapter test",
)


def _run(*flags: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, SCRIPT, *flags], env=env, capture_output=True, text=True, timeout=400)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SER_REPORT ")]
    assert proc.returncode == 0 and lines, f"smoke step failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("SER_REPORT ") :])


def test_solo_mocov3_one_step_with_head() -> None:
    r = _run("--head", "--layer", "3")
    layer = r["layer"]
    assert r["ser_loss_finite"] and r["ser_loss"] > 0
    assert len(r["ser_grad_norms"]) == r["depth"]
    assert all(g > 0 for g in r["ser_grad_norms"][:layer]), r["ser_grad_norms"]
    assert all(g == 0 for g in r["ser_grad_norms"][layer:]), r["ser_grad_norms"]
    assert r["online_hook_blocks"] == [layer] and r["online_capture_hooks"] == 1
    assert r["momentum_capture_hooks"] == 0
    assert r["ser_params"] > 0 and r["ser_params_in_optimizer"]
    assert r["ser_group"] == ["ser_head"]  # through solo's own learnable_params -> configure_optimizers
    # ++ser.* over the method's recipe (mocov3: lam 1.0, tau 0.3), the names of SERConfig
    assert r["ser_config"] == [3, 1.0, 0.3, 0.25]
    assert r["total_loss"] > r["host_loss"]
    assert r["late_cls_pre_hooks"] == {"backbone": 0, "momentum_backbone": 0}
    lo, hi = r["crop_scale"]  # the base crop follows the config's own random-resized-crop range
    assert r["base_crop"] == f"BaseCrop(size=32, scale=({lo}, {hi}))", r["base_crop"]
    # the views are normalised like solo's crops: the Normalize found in its pipeline (custom data: ImageNet's)
    assert r["mean_std"] == [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]
    # solo's own training_step, unwrapped, gives the same host loss on the same batch
    assert r["host_loss"] == pytest.approx(r["host_loss_recomputed"], abs=1e-6, rel=1e-6)


def test_solo_lambda_zero_leaves_the_host_loss() -> None:
    r = _run("--lam", "0", "--late-cls")  # the paper's control: late [CLS] + views, no loss
    assert r["ser_loss_finite"]
    assert r["total_loss"] == r["host_loss"]
    assert r["host_loss"] == pytest.approx(r["host_loss_recomputed"], abs=1e-6, rel=1e-6)
    assert all(g == 0 for g in r["ser_grad_norms"])  # lambda = 0: no gradient from SER
    assert r["late_cls_pre_hooks"] == {"backbone": 1, "momentum_backbone": 1}  # both encoders: late [CLS]
    assert r["momentum_capture_hooks"] == 0


def test_solo_resnet18_cifar_config_one_step() -> None:
    """solo's CIFAR MoCo-v3 configuration as shipped (ResNet-18, dataset cifar10: solo itself swaps in its CIFAR stem,
    a 3x3 stride-1 conv1 with padding 2 and no max-pool); SER at layer 3 (layer2's output) with the token head."""
    r = _run("--backbone", "resnet18", "--layer", "3", "--head")
    assert r["backbone_class"] == "ResNet" and r["stem_conv"] == [[3, 3], [1, 1]] and r["maxpool"] == "Identity"
    assert r["layer_names"] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    # the strides as the CIFAR stem runs them (not the class's 2, 4, 8, 16, 32), with its border cells
    assert r["map_stride"] == [2, 2] and "layer2 output (stride 2, 128 ch, +1 border cell)" in r["handle"]
    assert "1=relu output (stride 1, 64 ch, +2 border cells)" in r["handle"]
    assert r["ser_loss_finite"] and r["ser_loss"] > 0 and r["total_loss"] > r["host_loss"]
    assert r["stem_grad"] > 0  # SER's gradient reaches the first convolution
    assert r["params_per_layer"][0] == 0  # layer 1 is the stem's ReLU: no parameters of its own
    assert all(g > 0 for g in r["ser_grad_norms"][1:3]), r["ser_grad_norms"]
    assert all(g == 0 for g in r["ser_grad_norms"][3:]), r["ser_grad_norms"]  # nothing above layer 3
    assert r["online_hook_blocks"] == [3] and r["online_capture_hooks"] == 1 and r["momentum_capture_hooks"] == 0
    assert r["ser_params"] > 0 and r["ser_params_in_optimizer"] and r["ser_group"] == ["ser_head"]
    assert r["ser_config"] == [3, 1.0, 0.3, 0.25] and r["b2"] == 2
    assert r["mean_std"] == [[0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616]]  # solo's CIFAR-10 Normalize
    assert r["host_loss"] == pytest.approx(r["host_loss_recomputed"], abs=1e-6, rel=1e-6)
