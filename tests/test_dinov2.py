"""attach_ser on DINOv2's real ``DinoVisionTransformer`` (chunked blocks, register tokens), CPU.

Runs only with a checkout: ``SER_DINOV2_DIR=/path/to/dinov2`` (git clone https://github.com/facebookresearch/dinov2).
No xFormers needed: the example sets ``XFORMERS_DISABLED=1`` when there is no GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not os.environ.get("SER_DINOV2_DIR"),
    reason="SER_DINOV2_DIR is not set: clone facebookresearch/dinov2 and set SER_DINOV2_DIR to run the DINOv2 tests",
)

DEPTH, LAYER, REG, PATCH = 4, 2, 4, 8


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("ser_dinov2_step", os.path.join(ROOT, "examples", "dinov2", "ser_dinov2_step.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ser_dinov2_step"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def vt(ex):
    return ex.import_dinov2()


def _manual_map(model, x, layer):  # noqa: ANN001
    """Layer-L patch-token map computed by hand from the model's own pieces (prefix = CLS + registers)."""
    blocks = [b for chunk in model.blocks for b in chunk if not isinstance(b, torch.nn.Identity)]
    t = model.prepare_tokens_with_masks(x)
    for b in blocks[:layer]:
        t = b(t)
    h, w = x.shape[-2] // PATCH, x.shape[-1] // PATCH
    return t[:, 1 + model.num_register_tokens :].transpose(1, 2).reshape(x.shape[0], -1, h, w)


def test_chunked_blocks_and_registers_give_the_exact_layer_map(ex, vt) -> None:
    torch.manual_seed(0)
    student, teacher, ser = ex.build(vt, depth=DEPTH, layer=LAYER, registers=REG, chunks=2)
    assert (ser.config.tau, ser.config.scale, ser.config.photometric) == (0.5, (0.7, 1.3), None)  # DEFAULTS: dino recipe + scale
    student.eval()
    assert len(student.blocks) == 2 and ser.depth == DEPTH and ser._prefix == 1 + REG
    x = torch.randn(3, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(ser.encode(x), _manual_map(student, x, LAYER), rtol=0, atol=0)
    # the same weights without chunking give the same map
    plain = vt.DinoVisionTransformer(img_size=32, patch_size=PATCH, embed_dim=64, depth=DEPTH, num_heads=4, mlp_ratio=2,
                                     block_chunks=0, num_register_tokens=REG, init_values=1e-5)
    state = {}
    for k, v in student.state_dict().items():
        parts = k.split(".")
        if parts[0] == "blocks":  # blocks.<chunk>.<index> -> blocks.<index>
            k = ".".join(["blocks"] + parts[2:])
        state[k] = v
    plain.load_state_dict(state)
    plain.eval()
    ser2 = ex.attach_ser(plain, LAYER, photometric=None)
    with torch.no_grad():
        torch.testing.assert_close(ser2.encode(x), ser.encode(x), rtol=1e-6, atol=1e-6)
    ser2.remove()
    ser.remove()


def test_step_gradients_teacher_and_lambda_zero(ex, vt) -> None:
    torch.manual_seed(0)
    student, teacher, ser = ex.build(vt, depth=DEPTH, layer=LAYER, registers=REG)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    out = ex.step(student, teacher, ser, x1, x2)
    assert torch.isfinite(out["loss"]) and float(ser.last_loss) > 0
    blocks = [b for chunk in student.blocks for b in chunk if not isinstance(b, torch.nn.Identity)]
    grads = torch.autograd.grad(out["term"], [p for b in blocks for p in b.parameters()], allow_unused=True)
    norms, i = [], 0
    for b in blocks:
        k = len(list(b.parameters()))
        norms.append(sum(float(g.norm()) ** 2 for g in grads[i : i + k] if g is not None) ** 0.5)
        i += k
    assert all(n > 0 for n in norms[:LAYER]) and all(n == 0 for n in norms[LAYER:]), norms
    assert not any(type(h).__name__ == "_CaptureHook" for c in teacher.blocks for b in c for h in b._forward_hooks.values())
    # the teacher still loads the student's state_dict strictly: nothing registered under the student
    teacher.load_state_dict(student.state_dict())
    ser.lam = 0.0
    out0 = ex.step(student, teacher, ser, x1, x2)
    assert float(out0["term"]) == 0.0 and float(out0["loss"]) == float(out0["host"])


def test_example_runs_with_the_ser_flags(ex) -> None:
    """The example's command line: DINOv2 checkout + the --ser-* flags of SERConfig over its DEFAULTS."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "dinov2", "ser_dinov2_step.py"), "--ser-lam", "0.5", "--ser-head",
                          "--ser-head-dims", "16", "16"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "4 blocks in 2 chunks, 4 registers" in out.stdout and "λ·L_equiv" in out.stdout, out.stdout


def test_late_cls_with_registers_matches_a_hand_written_reference(ex, vt) -> None:
    torch.manual_seed(0)
    student, _, ser = ex.build(vt, depth=DEPTH, layer=LAYER, registers=REG, late_cls=True, scale=None)
    student.eval()
    x = torch.randn(2, 3, 32, 32)
    blocks = [b for chunk in student.blocks for b in chunk if not isinstance(b, torch.nn.Identity)]
    with torch.no_grad():
        got = student(x)
    ser.remove()  # the reference calls the blocks directly: without the conversion's hooks
    with torch.no_grad():
        t = student.prepare_tokens_with_masks(x)[:, 1 + REG :]  # blocks 1..L see patch tokens only
        for b in blocks[:LAYER]:
            t = b(t)
        prefix = torch.cat([student.cls_token, student.register_tokens], dim=1).expand(2, -1, -1)
        t = torch.cat([prefix, t], dim=1)  # raw [CLS] + registers, no position embedding, after block L
        for b in blocks[LAYER:]:
            t = b(t)
        ref = student.norm(t)[:, 0]
        stock = student(x)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(stock, got)  # removed: the stock forward again
