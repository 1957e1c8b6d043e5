"""Issue 9: the SER handle in real training stacks — every failure class either works or is a clear SERError.

One section per failure class (2 exceptions, 3 nesting, 4 copies and saves, 5 dtypes, 6 never a wrong hook,
7 masked inputs, 10 pairing, 12 impossible configurations). Classes 1, 8, 9, 11 are tested with views/loss.
"""

from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers.common import IMG, LAYER, make_images, make_pair, make_vit  # noqa: E402

from ser_plugin import SERError, attach_ser, equivariance_score, remove_ser  # noqa: E402
from ser_plugin.tap import is_ser_hook  # noqa: E402


def ser_hooks(model: nn.Module) -> list:
    """Every hook object of ser_plugin left anywhere in ``model`` (forward, pre-forward, backward)."""
    out = []
    for m in model.modules():
        for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks):
            out += [h for h in d.values() if is_ser_hook(h)]
    return out


def fresh_loss(model: nn.Module, pair, **kw) -> torch.Tensor:
    """The loss of one correct step on a freshly attached handle (the reference)."""
    ser = attach_ser(model, LAYER, photometric=None, **kw)
    with ser.capture():
        model(pair.x1), model(pair.x2)
    out = ser.loss(pair).detach()
    ser.remove()
    return out


def correct_step(ser, model, pair) -> torch.Tensor:
    with ser.capture():
        model(pair.x1), model(pair.x2)
    return ser.loss(pair).detach()


# ----------------------------------------------------------------------------- 2. exceptions mid-step
def test_exception_inside_capture_drops_that_blocks_captures():
    model = make_vit(0)
    pair = make_pair(make_images(4, seed=1), seed=2)
    ref = fresh_loss(model, pair)
    ser = attach_ser(model, LAYER, photometric=None)
    with pytest.raises(RuntimeError, match="out of memory"):
        with ser.capture():
            model(pair.x1)
            raise RuntimeError("CUDA out of memory (simulated): batch skipped")
    assert ser.captures == [], "the failed block's capture must be dropped"
    assert torch.allclose(correct_step(ser, model, pair), ref)


def test_serror_in_hook_does_not_poison_next_step():
    model = make_vit(0)
    pair = make_pair(make_images(4, seed=1), seed=2)
    ref = fresh_loss(model, pair)
    ser = attach_ser(model, LAYER, photometric=None)
    with pytest.raises(SERError, match="without autograd"):
        with ser.capture():
            model(pair.x1)
            with torch.no_grad():
                model(pair.x2)  # the hook refuses a no-grad pass inside an armed capture
    assert ser.captures == []
    assert torch.allclose(correct_step(ser, model, pair), ref)


# ----------------------------------------------------------------------------- 3. nesting
def test_nested_capture_keeps_outer_armed():
    model = make_vit(0)
    pair = make_pair(make_images(4, seed=1), seed=2)
    ref = fresh_loss(model, pair)
    ser = attach_ser(model, LAYER, photometric=None)
    with ser.capture():
        model(pair.x1)
        with ser.capture():
            pass
        model(pair.x2)
    assert len(ser.captures) == 2
    assert torch.allclose(ser.loss(pair).detach(), ref)


def test_nested_capture_records_into_the_same_step():
    model = make_vit(0)
    pair = make_pair(make_images(4, seed=1), seed=2)
    ser = attach_ser(model, LAYER, photometric=None)
    with ser.capture():
        model(pair.x1)
        with ser.capture():
            model(pair.x2)
    assert len(ser.captures) == 2
    ser.clear()


@pytest.mark.parametrize("inner", ["encode", "forward_loss", "equivariance_score"])
def test_inner_calls_do_not_disarm_or_add_records(inner):
    model = make_vit(0)
    pair = make_pair(make_images(4, seed=1), seed=2)
    ref = fresh_loss(model, pair)
    ser = attach_ser(model, LAYER, photometric=None)
    other = make_pair(make_images(4, seed=5), seed=6)
    with ser.capture():
        model(pair.x1)
        if inner == "encode":
            assert ser.encode(other.x1).shape == (4, 32, IMG // 4, IMG // 4)
        elif inner == "forward_loss":
            assert torch.isfinite(ser.forward_loss(other))
        else:
            equivariance_score(model, other.x1, layers=[LAYER])
        model(pair.x2)
    assert len(ser.captures) == 2, f"{inner} inside capture left {len(ser.captures)} captures (want the 2 view passes)"
    assert torch.allclose(ser.loss(pair).detach(), ref)


# ----------------------------------------------------------------------------- 4. copies and saves
class Holder(nn.Module):
    """A module that holds the model and its SER handle (a LightningModule does this)."""

    def __init__(self, model: nn.Module, **kw) -> None:
        super().__init__()
        self.model = model
        self.ser = attach_ser(model, LAYER, photometric=None, head=True, **kw)

    def forward(self, x):
        return self.model(x)


def _check_copy(copy_model: nn.Module, ser, pair, late: bool) -> None:
    with ser.capture():
        copy_model(pair.x1), copy_model(pair.x2)
    assert ser.captures == [], "a copy's hook wrote into the original handle"
    stock = make_vit(0)
    stock.load_state_dict(copy_model.state_dict())
    if late:  # the copy keeps running as the late-[CLS] model it was copied from
        assert not torch.allclose(copy_model(pair.x1), stock(pair.x1))
    assert remove_ser(copy_model) >= 0
    assert ser_hooks(copy_model) == [], f"SER hooks left on the copy after remove_ser: {ser_hooks(copy_model)}"
    assert torch.allclose(copy_model(pair.x1), stock(pair.x1), atol=1e-6)


@pytest.mark.parametrize("late", [False, True])
def test_timm_model_ema_copy(late):
    from timm.utils import ModelEmaV3

    model = make_vit(0)
    ser = attach_ser(model, LAYER, photometric=None, late_cls=late)
    ema = ModelEmaV3(model, decay=0.9)
    ema.update(model)
    pair = make_pair(make_images(4, seed=1), seed=2)
    _check_copy(ema.module, ser, pair, late)
    assert ser.is_attached and len(ser_hooks(model)) >= 2


def test_averaged_model_of_a_module_holding_the_handle():
    from torch.optim.swa_utils import AveragedModel

    holder = Holder(make_vit(0))
    avg = AveragedModel(holder)
    avg.update_parameters(holder)
    copied = avg.module.ser
    assert not copied.is_attached
    with pytest.raises(SERError, match="attach again"):
        with copied.capture():
            pass
    assert {n for n, _ in avg.module.named_parameters() if n.startswith("ser.head.")}, "the head must be averaged too"
    pair = make_pair(make_images(4, seed=1), seed=2)
    _check_copy(avg.module.model, holder.ser, pair, late=False)


class _LitSER:
    """A LightningModule holding the handle (built lazily: lightning is an optional extra)."""

    @staticmethod
    def make():
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.backbone = make_vit(0)
                self.ser = attach_ser(self.backbone, LAYER, photometric=None, head=True)

            def training_step(self, batch, idx):
                pair = self.ser.views(batch[0])
                with self.ser.capture():
                    a, b = self.backbone(pair.x1), self.backbone(pair.x2)
                return (a - b).pow(2).mean() + self.ser.loss(pair)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return Module


def test_lightning_swa_callback_with_handle_on_module():
    import lightning as L
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    data = torch.utils.data.TensorDataset(make_images(8, seed=3))
    module = _LitSER.make()()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert module.ser.is_attached


def test_lightning_checkpoint_save_and_load(tmp_path):
    import lightning as L

    Module = _LitSER.make()
    module = Module()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(make_images(8, seed=3)), batch_size=4))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    loaded = Module.load_from_checkpoint(path)
    assert loaded.ser.is_attached and loaded.ser.model is loaded.backbone
    assert torch.equal(loaded.ser.head.fc1.weight, module.ser.head.fc1.weight), "the token head is in the checkpoint"
    pair = make_pair(make_images(4, seed=1), seed=2)
    assert torch.allclose(correct_step(loaded.ser, loaded.backbone, pair), correct_step(module.ser, module.backbone, pair))


def test_torch_save_whole_model_leaves_removable_inert_hooks():
    model = make_vit(0)
    ser = attach_ser(model, LAYER, photometric=None, late_cls=True)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)
    pair = make_pair(make_images(4, seed=1), seed=2)
    _check_copy(clone, ser, pair, late=True)
    attach_ser(clone, LAYER, photometric=None).remove()  # and it can be attached again


def test_handle_out_of_a_pickle_is_detached():
    holder = Holder(make_vit(0))
    buf = io.BytesIO()
    torch.save(holder, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.ser.is_attached is False
    for call in (lambda s: s.capture().__enter__(), lambda s: s.encode(make_images(2, 0)), lambda s: s.loss(None)):
        with pytest.raises(SERError, match="attach again"):
            call(loaded.ser)
    assert "attached=False" in repr(loaded.ser)
    again = attach_ser(loaded.model, LAYER, photometric=None)  # not "already attached"
    again.remove()
    remove_ser(loaded.model)
    assert ser_hooks(loaded.model) == []


def test_deepcopy_of_handle_is_detached_and_original_unharmed():
    model = make_vit(0)
    ser = attach_ser(model, LAYER, photometric=None, head=True)
    dup = copy.deepcopy(ser)
    assert not dup.is_attached and ser.is_attached
    assert dup.head is not ser.head and torch.equal(dup.head.fc1.weight, ser.head.fc1.weight)
    pair = make_pair(make_images(4, seed=1), seed=2)
    assert torch.isfinite(correct_step(ser, model, pair))


# ----------------------------------------------------------------------------- 5. dtypes
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("head_dtype", ["fp32", "model"])
def test_half_models_with_head(dtype, tol, head_dtype):
    pair = make_pair(make_images(4, seed=1), seed=2)
    torch.manual_seed(7)
    ref_model = make_vit(0)
    ser = attach_ser(ref_model, LAYER, photometric=None, head=True)
    head_state = copy.deepcopy(ser.head.state_dict())
    ref = correct_step(ser, ref_model, pair)
    ser.remove()
    model = make_vit(0).to(dtype)
    ser = attach_ser(model, LAYER, photometric=None, head=True)
    ser.head.load_state_dict(head_state)
    if head_dtype == "model":
        ser.to(dtype)
    with ser.capture():
        model(pair.x1.to(dtype)), model(pair.x2.to(dtype))
    loss = ser.loss(pair)
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) <= tol * ref.item(), (loss.item(), ref.item())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ser.head.parameters())


def test_autocast_with_head_matches_fp32():
    pair = make_pair(make_images(4, seed=1), seed=2)
    model = make_vit(0)
    ser = attach_ser(model, LAYER, photometric=None, head=True)
    ref = correct_step(ser, model, pair)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with ser.capture():
            model(pair.x1), model(pair.x2)
        loss = ser.loss(pair)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 6e-2 * ref.item()


def test_fp16_maps_into_fp32_head():
    pair = make_pair(make_images(4, seed=1), seed=2)
    model = make_vit(0)
    ser = attach_ser(model, LAYER, photometric=None, head=True)
    f1, f2 = ser.encode(pair.x1), ser.encode(pair.x2)
    ref = ser.loss_from_maps(pair, f1, f2)
    out = ser.loss_from_maps(pair, f1.half(), f2.half())
    assert torch.isfinite(out) and abs(out.item() - ref.item()) <= 1e-2 * ref.item()


# ----------------------------------------------------------------------------- 6. never a wrong hook
def test_blocks_list_of_block_submodules_refused():
    model = make_vit(0)
    pairs = [m for b in model.blocks for m in (b.attn, b.mlp)]
    with pytest.raises(SERError, match=r"sub-modules of .*blocks\.0.*blocks='blocks'"):
        attach_ser(model, LAYER, blocks=pairs, photometric=None)
    assert ser_hooks(model) == []


def test_blocks_path_inside_a_block_refused():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.branches = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

        def forward(self, x):
            return x + self.branches(self.norm(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 4, 4)
            self.stack = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            for b in self.stack:
                t = b(t)
            return t

    with pytest.raises(SERError, match=r"sub-modules of 'stack\.0'.*blocks='stack'"):
        attach_ser(Net(), 1, blocks="stack.0.branches", patch_size=4, num_prefix_tokens=0, photometric=None)
    ser = attach_ser(Net(), 1, blocks="stack", patch_size=4, num_prefix_tokens=0, photometric=None)
    assert ser.depth == 2
    ser.remove()


def test_hf_dinov2_with_registers_prefix_from_config():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=16, patch_size=4, num_register_tokens=4)
    model = Dinov2WithRegistersModel(cfg).eval()
    ser = attach_ser(model, 1, photometric=None)
    x = make_images(2, seed=0)
    out = model(x, output_hidden_states=True)
    with ser.capture():
        model(x)
    (cap,) = ser.captures
    ref = out.hidden_states[1][:, 5:].transpose(1, 2).reshape(2, 32, 4, 4)
    assert torch.allclose(cap, ref, atol=1e-6)
    assert "prefix_tokens=5" in repr(ser)
    ser.remove()


@pytest.mark.parametrize("kw, prefix", [(dict(class_token=False, global_pool="avg"), 0), (dict(reg_tokens=4), 5),
                                        (dict(class_token=False, reg_tokens=2, global_pool="avg"), 2)])
def test_timm_pooled_and_register_models(kw, prefix):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=3,
                              num_heads=2, num_classes=0, **kw)
    ser = attach_ser(model, LAYER, photometric=None)
    x = make_images(2, seed=0)
    grab = {}
    h = model.blocks[LAYER - 1].register_forward_hook(lambda m, a, o: grab.setdefault("t", o))
    with ser.capture():
        model(x)
    h.remove()
    assert torch.equal(ser.captures[0], grab["t"][:, prefix:].transpose(1, 2).reshape(2, 32, 4, 4))
    assert f"prefix_tokens={prefix}" in repr(ser)
    ser.remove()


def test_grid_mismatch_names_num_prefix_tokens():
    model = make_vit(0)
    ser = attach_ser(model, LAYER, photometric=None, num_prefix_tokens=3)
    with pytest.raises(SERError, match="num_prefix_tokens="):
        with ser.capture():
            model(make_images(2, seed=0))
    ser.remove()


def test_compiled_submodule_refused():
    model = make_vit(0)
    model.blocks[2].compile()
    with pytest.raises(SERError, match=r"compiled.*blocks\.2"):
        attach_ser(model, LAYER, photometric=None)
    model = make_vit(0)
    model.blocks[0] = torch.compile(model.blocks[0])
    with pytest.raises(SERError, match="compile"):
        attach_ser(model, LAYER, photometric=None)


def test_dataparallel_refused_with_ddp_recipe():
    with pytest.raises(SERError, match="DistributedDataParallel"):
        attach_ser(nn.DataParallel(make_vit(0)), LAYER, photometric=None)


def test_repr_shows_resolved_description():
    ser = attach_ser(make_vit(0), LAYER, photometric=None)
    r = repr(ser)
    for part in ("layer=2/3", "patch_size=(4, 4)", "prefix_tokens=1", "width=32", "blocks='blocks'"):
        assert part in r, (part, r)
    ser.remove()


# ----------------------------------------------------------------------------- 7. masked inputs
def test_hf_bool_masked_pos_refused_while_armed():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4)
    model = ViTModel(cfg, add_pooling_layer=False, use_mask_token=True)
    ser = attach_ser(model, 1, photometric=None)
    x = make_images(2, seed=0)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    model(x, bool_masked_pos=mask)  # unarmed: the host's own masked pass is fine
    with pytest.raises(SERError, match="bool_masked_pos"):
        with ser.capture():
            model(x, bool_masked_pos=mask)
    assert ser.captures == []
    ser.remove()


def test_lightly_masked_vit_idx_mask_refused():
    from lightly.models.modules import MaskedVisionTransformerTIMM

    model = MaskedVisionTransformerTIMM(vit=make_vit(0))
    ser = attach_ser(model, LAYER, photometric=None)
    x = make_images(2, seed=0)
    idx_mask = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(SERError, match="idx_mask"):
        with ser.capture():
            model(x, idx_mask=idx_mask)
    with ser.capture():
        model(x)
    assert len(ser.captures) == 1
    ser.remove()


def test_masks_keyword_refused_for_dinov2_style_forward():
    class MaskedViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = make_vit(0)
            self.mask_token = nn.Parameter(torch.zeros(32))

        def forward(self, x, masks=None):
            t = self.vit.patch_embed(x)
            if masks is not None:
                t = torch.where(masks[..., None], self.mask_token.to(t.dtype), t)
            t = self.vit._pos_embed(t)
            return self.vit.blocks(t)

    model = MaskedViT()
    ser = attach_ser(model, LAYER, photometric=None)
    with pytest.raises(SERError, match="masks"):
        with ser.capture():
            model(make_images(2, 0), masks=torch.rand(2, 16) > 0.5)
    ser.remove()


# ----------------------------------------------------------------------------- 10. pairing
def test_captures_of_other_images_detected():
    model = make_vit(0)
    ser = attach_ser(model, LAYER, photometric=None)
    pair = make_pair(make_images(4, seed=1), seed=2)
    other = make_pair(make_images(4, seed=9), seed=2)
    with ser.capture():
        model(other.x1), model(other.x2)
    with pytest.raises(SERError, match="not pair.x1"):
        ser.loss(pair)
    with ser.capture():
        model(torch.cat([other.x1, other.x2]))
    with pytest.raises(SERError, match="not pair.x1"):
        ser.loss(pair)
    ser.remove()


def test_normalised_and_converted_views_accepted_and_checked():
    model = make_vit(0)
    ser = attach_ser(model, LAYER, photometric=None)
    pair = make_pair(make_images(4, seed=1), seed=2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    norm = lambda x: ((x - mean) / std).to(torch.bfloat16).float()  # noqa: E731
    with ser.capture():
        model(norm(pair.x1)), model(norm(pair.x2))
    assert torch.isfinite(ser.loss(pair))
    other = make_pair(make_images(4, seed=9), seed=2)
    with ser.capture():
        model(norm(pair.x1)), model(norm(other.x2))
    with pytest.raises(SERError, match="not pair.x2"):
        ser.loss(pair)
    ser.remove()


# ----------------------------------------------------------------------------- 12. impossible configurations
@pytest.mark.parametrize("layer", [3, -1])
def test_late_cls_at_last_layer_refused(layer):
    model = make_vit(0)
    with pytest.raises(SERError, match="late_cls.*last block"):
        attach_ser(model, layer, late_cls=True, photometric=None)
    assert ser_hooks(model) == []


def test_mean_std_channels_must_match_the_model():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2,
                              num_heads=2, num_classes=0, in_chans=1)
    with pytest.raises(SERError, match="3 channels.*1"):
        attach_ser(model, 1, photometric=None, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


def test_identical_views_refused():
    with pytest.raises(SERError, match="identical"):
        attach_ser(make_vit(0), LAYER, photometric=None, rotations=False, flips=False)


def test_forward_must_be_callable():
    with pytest.raises(SERError, match="forward"):
        attach_ser(make_vit(0), LAYER, photometric=None, forward="model.forward_features")
