"""attach_ser on real timm, torchvision, HF and lightly ViTs, DINO/DINOv2-style layouts; reversibility; deepcopy; errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_hf, tiny_timm, tiny_torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from ser_plugin import SERError, ViewPair, attach_ser, convert_late_cls, remove_ser
from ser_plugin.tap import _InertHook


class Grab:
    """Reference capture of a block's raw output (independent of ser_plugin)."""

    def __init__(self, block):
        self.out = None
        self.h = block.register_forward_hook(self)

    def __call__(self, m, a, o):
        self.out = o[0] if isinstance(o, tuple) else o


def _run_views(ser, model, x, call=None):
    call = call or model
    pair = ser.views(x)
    with ser.capture():
        call(pair.x1), call(pair.x2)
    return pair


# ---------------------------------------------------------------- families
FAMILIES = {
    "timm_cls": (lambda: tiny_timm(), "blocks", 1),
    "timm_registers": (lambda: tiny_timm(reg_tokens=4), "blocks", 5),
    "timm_no_cls": (lambda: tiny_timm(class_token=False, global_pool="avg"), "blocks", 0),
    "torchvision": (tiny_torchvision, "encoder.layers", 1),
    "hf": (tiny_hf, "layers", 1),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_equals_block_output_without_prefix(family):
    make, path, prefix = FAMILIES[family]
    model = make()
    ser = attach_ser(model, layer=2, photometric=None)
    block = ser._block
    ref = Grab(block)
    x = torch.rand(3, 3, 32, 32)
    with ser.capture():
        model(x)
    (fmap,) = ser.captures
    assert fmap.shape == (3, ref.out.shape[-1], 4, 4)
    assert ser._prefix == prefix
    assert torch.equal(fmap.flatten(2).transpose(1, 2), ref.out[:, prefix:])
    ser.clear()
    ref.h.remove()
    # the full step works and sends gradient
    pair = _run_views(ser, model, torch.rand(3, 3, 32, 32))
    loss = ser.loss(pair)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_hf_keyword_call_and_tuple_block_outputs():
    """HF models are called with pixel_values=...; HF <= 4.55 blocks return tuples (emulated here)."""
    model = tiny_hf()

    class TupleBlock(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **k):
            return (self.inner(*a, **k),)

    class OldLayout(nn.Module):  # `encoder.layer` list of tuple-returning layers, as in transformers 4.x
        def __init__(self, m):
            super().__init__()
            self.embeddings = m.embeddings
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList([TupleBlock(b) for b in m.layers])

        def forward(self, pixel_values):
            h = self.embeddings(pixel_values)
            for blk in self.encoder.layer:
                h = blk(h)[0]
            return h

    old = OldLayout(model)
    ser = attach_ser(old, layer=1, photometric=None)  # finds encoder.layer, patch size and [CLS] via embeddings
    pair = ser.views(torch.rand(2, 3, 32, 32))
    with ser.capture():
        old(pixel_values=pair.x1), old(pixel_values=pair.x2)
    assert torch.isfinite(ser.loss(pair))
    ser.remove()
    ser2 = attach_ser(model, layer=1, photometric=None)
    with ser2.capture():
        model(pixel_values=pair.x1), model(pixel_values=pair.x2)
    assert torch.isfinite(ser2.loss(pair))


def test_timm_dynamic_size_with_scale_views():
    model = tiny_timm(dynamic_img_size=True)
    ser = attach_ser(model, layer=2, photometric=None, scale=(0.5, 1.5))
    torch.manual_seed(3)
    sizes = set()
    for _ in range(4):
        pair = _run_views(ser, model, torch.rand(3, 3, 32, 32))
        sizes.add((tuple(pair.x1.shape[-2:]), tuple(pair.x2.shape[-2:])))
        f1, f2 = ser.captures
        assert f1.shape[-2:] == (pair.x1.shape[-2] // 8, pair.x1.shape[-1] // 8)
        assert f2.shape[-2:] == (pair.x2.shape[-2] // 8, pair.x2.shape[-1] // 8)
        loss = ser.loss(pair)
        assert torch.isfinite(loss)
    assert len(sizes) > 1, "scale views should vary in size"


def test_lightly_timm_wrapper():
    from lightly.models.modules import MaskedVisionTransformerTIMM

    wrapper = MaskedVisionTransformerTIMM(vit=tiny_timm(reg_tokens=2))
    ser = attach_ser(wrapper, layer=3, photometric=None)
    assert ser._prefix == 3 and ser.patch_size == (8, 8)
    pair = _run_views(ser, wrapper, torch.rand(2, 3, 32, 32))
    assert torch.isfinite(ser.loss(pair))


class DinoStyle(nn.Module):
    """Written for this test: the DINO layout (cls_token, pos_embed, blocks ModuleList, interpolate_pos_encoding)."""

    def __init__(self, dim=16, depth=3, patch=8, registers=0, chunks=0):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.patch_embed.patch_size = patch
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.num_register_tokens = registers
        if registers:
            self.register_tokens = nn.Parameter(torch.randn(1, registers, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + 16, dim))
        blocks = [nn.TransformerEncoderLayer(dim, 2, 32, batch_first=True, dropout=0.0) for _ in range(depth)]
        if chunks:  # DINOv2's chunked layout: each chunk a ModuleList padded with Identity
            per = depth // chunks
            lists = []
            for c in range(chunks):
                lists.append(nn.ModuleList([nn.Identity()] * (c * per) + blocks[c * per : (c + 1) * per]))
            self.blocks = nn.ModuleList(lists)
            self.chunked_blocks = True
        else:
            self.blocks = nn.ModuleList(blocks)
            self.chunked_blocks = False
        self.norm = nn.LayerNorm(dim)

    def interpolate_pos_encoding(self, x, w, h):
        return self.pos_embed

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1) + self.interpolate_pos_encoding(t, 0, 0)
        if self.num_register_tokens:
            t = torch.cat([t[:, :1], self.register_tokens.expand(len(t), -1, -1), t[:, 1:]], 1)
        blocks = [b for c in self.blocks for b in c] if self.chunked_blocks else list(self.blocks)
        for b in blocks:
            if not isinstance(b, nn.Identity):
                t = b(t)
        return self.norm(t)[:, 0]


@pytest.mark.parametrize("kw, prefix", [({}, 1), ({"registers": 4, "chunks": 3, "depth": 6}, 5)])
def test_dino_and_dinov2_layouts(kw, prefix):
    model = DinoStyle(**kw)
    ser = attach_ser(model, layer=4 if kw else 2, photometric=None)
    assert ser._prefix == prefix
    assert ser.depth == kw.get("depth", 3)
    ref = Grab(ser._block)
    x = torch.rand(2, 3, 32, 32)
    with ser.capture():
        model(x)
    assert torch.equal(ser.captures[0].flatten(2).transpose(1, 2), ref.out[:, prefix:])
    ser.clear()
    pair = _run_views(ser, model, torch.rand(2, 3, 32, 32))
    assert torch.isfinite(ser.loss(pair))


def test_explicit_block_path_for_unknown_model():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 8, 8)
            self.stages = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

        def forward(self, x):
            t = self.stem(x).flatten(2).transpose(1, 2)
            for s in self.stages:
                t = s(t)
            return t

    m = Odd()
    with pytest.raises(SERError, match="no transformer blocks found.*blocks="):
        attach_ser(m, layer=1)
    ser = attach_ser(m, layer=2, blocks="stages", patch_size=8, num_prefix_tokens=0, photometric=None)
    pair = _run_views(ser, m, torch.rand(2, 3, 32, 32))
    assert torch.isfinite(ser.loss(pair))
    ser.remove()
    ser = attach_ser(m, layer=1, blocks=list(m.stages), patch_size=8, num_prefix_tokens=0, photometric=None)
    assert ser._block is m.stages[0]


# ---------------------------------------------------------------- reversibility
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("late", [False, True])
def test_remove_restores_outputs_state_dict_and_hooks(late):
    model = tiny_timm().eval()
    x = torch.rand(2, 3, 32, 32)
    before_out, before_sd = model(x), _state(model)
    ser = attach_ser(model, layer=2, late_cls=late, photometric=None)
    during = model(x)
    assert torch.equal(during, before_out) != late  # late [CLS] changes the architecture, a plain hook does not
    ser.remove()
    after_sd = _state(model)
    assert torch.equal(model(x), before_out)
    assert before_sd.keys() == after_sd.keys() and all(torch.equal(before_sd[k], after_sd[k]) for k in before_sd)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not ser.is_attached
    with pytest.raises(SERError, match="removed"):
        ser.loss(None)


def test_context_manager_removes():
    model = tiny_timm()
    with attach_ser(model, layer=1) as ser:
        assert ser.is_attached
    assert not ser.is_attached and all(not m._forward_hooks for m in model.modules())
    attach_ser(model, layer=1).remove()  # attaching again after removal is fine


def test_late_cls_matches_manual_forward():
    """Late [CLS]: blocks 1..L on patch tokens only, then raw cls_token (no pos-embed) concatenated."""
    model = tiny_timm(depth=4).eval()
    x = torch.rand(2, 3, 32, 32)
    with convert_late_cls(model, layer=2):
        out = model.forward_features(x)
    t = model.patch_embed(x) + model.pos_embed[:, 1:]
    for b in model.blocks[:2]:
        t = b(t)
    t = torch.cat([model.cls_token.expand(2, -1, -1), t], 1)
    for b in model.blocks[2:]:
        t = b(t)
    assert torch.allclose(out, model.norm(t), atol=1e-6)
    assert torch.allclose(model.forward_features(x), model.forward_features(x))  # restored, deterministic


def test_late_cls_via_attach_captures_patch_tokens_and_lambda0_control():
    model = tiny_timm(reg_tokens=2)
    ser = attach_ser(model, layer=2, late_cls=True, lam=0.0, head=True, photometric=None)
    assert ser._prefix == 0
    pair = _run_views(ser, model, torch.rand(3, 3, 32, 32))
    loss = ser.loss(pair)
    assert loss.item() == 0.0 and ser.last_loss is not None and ser.last_loss > 0
    loss.backward()  # λ = 0: the head is in the graph with zero gradient (DDP-safe), encoder gets nothing
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in ser.parameters())


def test_late_cls_refused_for_unsupported():
    with pytest.raises(SERError, match="late \\[CLS\\]"):
        attach_ser(tiny_torchvision(), layer=1, late_cls=True)


# ---------------------------------------------------------------- capture semantics
def test_captures_only_when_armed_and_concatenated_views():
    model = tiny_timm()
    ser = attach_ser(model, layer=2, photometric=None)
    model(torch.rand(2, 3, 32, 32))
    assert ser.captures == []
    pair = ser.views(torch.rand(3, 3, 32, 32))
    with ser.capture():
        model(torch.cat([pair.x1, pair.x2]))  # one pass on both views (e.g. DINO's MultiCropWrapper)
    assert torch.isfinite(ser.loss(pair))
    assert ser.captures == []  # consumed


def test_encode_early_exit_and_forward_loss():
    model = tiny_timm(depth=4)
    ser = attach_ser(model, layer=1, photometric=None)
    ran = []
    h = model.blocks[1].register_forward_hook(lambda *a: ran.append(1))
    fmap = ser.encode(torch.rand(2, 3, 32, 32))
    assert fmap.shape == (2, 32, 4, 4) and ran == []  # blocks above L never ran
    pair = ser.views(torch.rand(2, 3, 32, 32))
    loss = ser.forward_loss(pair)
    loss.backward()
    assert ran == [] and torch.isfinite(loss)
    h.remove()


def test_head_parameters_live_outside_the_model():
    model = tiny_timm()
    n_before = len(list(model.parameters()))
    ser = attach_ser(model, layer=2, head=True)
    assert len(list(model.parameters())) == n_before
    assert len(list(ser.parameters())) == 4
    assert not any(p is q for p in ser.parameters() for q in model.parameters())
    assert "model" not in dict(ser.named_children())


# ---------------------------------------------------------------- deepcopy
def test_deepcopy_teacher_never_writes_into_student_captures():
    student = tiny_timm()
    ser = attach_ser(student, layer=2, photometric=None)
    teacher = copy.deepcopy(student)
    hooks = [h for m in teacher.modules() for h in m._forward_hooks.values()]
    assert any(isinstance(h, _InertHook) for h in hooks)
    x = torch.rand(2, 3, 32, 32)
    with ser.capture():
        teacher(x)
    assert ser.captures == []
    with ser.capture():
        student(x)
    assert len(ser.captures) == 1
    tser = attach_ser(teacher, layer=2)  # the copy can get its own SER
    assert tser.is_attached
    dup = copy.deepcopy(ser)  # a copy of the handle is detached (issue 9, class 4): it says to attach again
    assert not dup.is_attached and ser.is_attached
    with pytest.raises(SERError, match="attach again"):
        dup.encode(x)


# ---------------------------------------------------------------- errors
def test_error_layer_out_of_range_lists_valid_range():
    with pytest.raises(SERError, match=r"layer=9 is out of range.*1\.\.4"):
        attach_ser(tiny_timm(depth=4), layer=9)
    with pytest.raises(SERError, match="must be an int"):
        attach_ser(tiny_timm(), layer=1.5)


def test_error_token_count_not_a_grid():
    model = tiny_timm()
    ser = attach_ser(model, layer=1)
    model.blocks[0].register_forward_pre_hook(lambda m, a: (a[0][:, :-3],))  # drop tokens, as masking would
    with pytest.raises(SERError, match="do not form prefix \\+ grid.*masking"):
        with ser.capture():
            model(torch.rand(2, 3, 32, 32))


def test_error_views_do_not_match_elements():
    model = tiny_timm()
    ser = attach_ser(model, layer=1, photometric=None)
    pair = ser.views(torch.rand(3, 3, 32, 32))
    bad = ViewPair(pair.x1[:2], pair.x2, pair.g1, pair.g2)
    with ser.capture():
        model(bad.x1), model(bad.x2)
    with pytest.raises(SERError, match="views and elements disagree"):
        ser.loss(bad)


def test_error_scale_on_fixed_size_vit():
    for m in (tiny_timm(), tiny_torchvision()):
        with pytest.raises(SERError, match="dynamic_img_size=True"):
            attach_ser(m, layer=1, scale=(0.7, 1.3))


def test_error_attaching_twice():
    model = tiny_timm()
    attach_ser(model, layer=1)  # handle dropped on purpose
    with pytest.raises(SERError, match="already attached.*remove"):
        attach_ser(model, layer=2)
    assert remove_ser(model) == 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    attach_ser(model, layer=2)


def test_error_loss_with_nothing_or_wrong_captures():
    model = tiny_timm()
    ser = attach_ser(model, layer=1, photometric=None)
    pair = ser.views(torch.rand(2, 3, 32, 32))
    with pytest.raises(SERError, match="got 0 capture.*ser.capture"):
        ser.loss(pair)
    with ser.capture():
        model(pair.x1), model(pair.x2), model(pair.x1)
    with pytest.raises(SERError, match="got 3 capture"):
        ser.loss(pair)
    with ser.capture():
        model(pair.x2), model(torch.rand(2, 3, 32, 32))
    with pytest.raises(SERError, match="ran on other images"):  # same shapes, other inputs: detected (issue 9, class 10)
        ser.loss(pair)
    with pytest.raises(SERError, match="needs the ViewPair"):
        ser.loss()


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_error_reentrant_checkpointing_detected():
    model = tiny_timm()

    class Reentrant(nn.Module):
        def __init__(self, blk):
            super().__init__()
            self.blk = blk

        def forward(self, x):
            return checkpoint(self.blk, x, use_reentrant=True)

    model.blocks = nn.Sequential(*[Reentrant(b) for b in model.blocks])
    ser = attach_ser(model, layer=2, blocks=[b.blk for b in model.blocks], photometric=None)
    with pytest.raises(SERError, match="reentrant gradient checkpointing"):
        with ser.capture():
            model(torch.rand(2, 3, 32, 32))
    with torch.no_grad(), ser.capture():  # evaluation without grad is fine
        model(torch.rand(2, 3, 32, 32))
    assert len(ser.captures) == 1


def test_error_compiled_model_refused():
    model = tiny_timm()
    compiled = torch.compile(model)  # wrapping does not compile yet; the wrapper is recognised
    with pytest.raises(SERError, match="attach SER first, then compile|Attach SER first"):
        attach_ser(compiled, layer=1)


def test_error_not_a_module_and_nan_features():
    with pytest.raises(SERError, match="nn.Module"):
        attach_ser("vit", layer=1)
    model = tiny_timm()
    ser = attach_ser(model, layer=1, photometric=None)
    pair = ser.views(torch.rand(2, 3, 32, 32))
    x1 = pair.x1.clone()
    x1[0, 0, 0, 0] = float("nan")
    with ser.capture():
        model(x1), model(pair.x2)
    with pytest.raises(SERError, match="non-finite values"):
        ser.loss(pair)
