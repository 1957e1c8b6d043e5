"""SER on backbones with a spatial map that are not plain ViTs (issue 18): timm ResNet / ConvNeXt / Swin,
torchvision ResNet / ConvNeXt / Swin and a user's CNN through ``blocks=`` (ser_plugin/backbones.py).

One layer convention per family (timm's ``forward_intermediates`` indices), the map taken as NCHW (NHWC
permuted, no copy), and the handle's guarantees: gradient to the stem, none above the layer, ``remove()``
restoring the model, refusals that name the layers.
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from torch import nn

from ser_plugin import SERConfig, SERError, SERLoss, attach_ser, remove_ser
from ser_plugin.backbones import MapDescription, describe_backbone

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


# ------------------------------------------------------------------------------------------------ models


def timm_resnet18():
    return timm.create_model("resnet18", pretrained=False, num_classes=0)


def timm_convnext_atto():
    return timm.create_model("convnext_atto", pretrained=False, num_classes=0)


def timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2, 2), num_heads=(2, 4, 8), num_classes=0, drop_path_rate=0.0)


def tv_resnet18():
    return torchvision.models.resnet18()


def tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, 48, 1), CNBlockConfig(48, 64, 1), CNBlockConfig(64, None, 1)])


def tv_swin():
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=[4, 4])


class UserCNN(nn.Module):
    """A user's CNN: three stages in ``stages`` (strides 1, 2, 4), global average pooling."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.GroupNorm(4, width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, width * 2, 3, 2, 1), nn.GroupNorm(4, width * 2), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width * 2, width * 2, 3, 2, 1), nn.GroupNorm(4, width * 2), nn.ReLU()),
        )

    def forward(self, x):
        return self.stages(x).mean((2, 3))


# name: (factory, depth, layer names, strides, middle layer, stem parameter name, a parameter above the middle layer)
FAMILIES = {
    "timm_resnet18": (timm_resnet18, 5, ("act1", "layer1", "layer2", "layer3", "layer4"), (2, 4, 8, 16, 32), 3, "conv1.weight", "layer3.0.conv1.weight"),
    "timm_convnext_atto": (timm_convnext_atto, 4, ("stages.0", "stages.1", "stages.2", "stages.3"), (4, 8, 16, 32), 2, "stem.0.weight", "stages.2.downsample.1.weight"),
    "timm_swin": (timm_swin, 3, ("layers.0", "layers.1", "layers.2"), (4, 8, 16), 2, "patch_embed.proj.weight", "layers.2.downsample.reduction.weight"),
    "tv_resnet18": (tv_resnet18, 5, ("relu", "layer1", "layer2", "layer3", "layer4"), (2, 4, 8, 16, 32), 3, "conv1.weight", "layer3.0.conv1.weight"),
    "tv_convnext": (tv_convnext, 4, ("features.1", "features.3", "features.5", "features.7"), (4, 8, 16, 32), 2, "features.0.0.weight", "features.5.0.block.0.weight"),
    "tv_swin": (tv_swin, 3, ("features.1", "features.3", "features.5"), (4, 8, 16), 2, "features.0.0.weight", "features.5.0.attn.qkv.weight"),
}
DONE_WHEN = ("timm_resnet18", "timm_convnext_atto", "timm_swin", "tv_resnet18")
IMG = 32


def _images(n=4, size=IMG, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _hooks(model):
    return {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ the convention


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_layers_depth_and_repr(name):
    make, depth, names, strides, mid, *_ = FAMILIES[name]
    model = make()
    desc = describe_backbone(model)
    assert isinstance(desc, MapDescription)
    assert desc.depth == depth and desc.layer_names == names and desc.strides == strides
    ser = attach_ser(model, mid, photometric=None)
    assert ser.depth == depth and ser.layer == mid
    assert ser.patch_size == (strides[mid - 1],) * 2  # the layer's stride plays the patch size's part
    text = repr(ser)
    assert f"layer={mid}/{depth} ({names[mid - 1]} output (stride {strides[mid - 1]}" in text, text
    assert all(n in text for n in names), text  # every layer is listed with what it is
    ser.remove()


@pytest.mark.parametrize("name", [n for n in FAMILIES if n.startswith("timm")])
def test_hook_map_is_forward_intermediates_map(name):
    """layer L = forward_intermediates(indices=[L-1]): the hook path and timm's stateless path agree exactly."""
    make, depth, *_ = FAMILIES[name]
    model = make().eval()
    x = _images()
    want = model.forward_intermediates(x, intermediates_only=True)
    for L in range(1, depth + 1):
        ser = attach_ser(model, L, photometric=None)
        got = ser.encode(x)
        ser.remove()
        assert got.shape == want[L - 1].shape and torch.equal(got, want[L - 1]), (name, L)


def test_torchvision_layers_match_feature_extraction():
    """torchvision ResNet / Swin: the captured map is the stage output (Swin NHWC permuted to NCHW)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    x = _images()
    for make, nodes, nhwc in ((tv_resnet18, ["relu", "layer1", "layer2", "layer3", "layer4"], False), (tv_swin, ["features.1", "features.3", "features.5"], True)):
        model = make().eval()
        feats = create_feature_extractor(model, nodes)(x)
        for L, node in enumerate(nodes, 1):
            ser = attach_ser(model, L, photometric=None)
            got = ser.encode(x)
            ser.remove()
            want = feats[node].permute(0, 3, 1, 2) if nhwc else feats[node]
            assert torch.equal(got, want), (make.__name__, node)


def test_nhwc_map_is_a_view_not_a_copy():
    model = timm_swin().eval()
    seen = []
    h = model.layers[1].register_forward_hook(lambda m, a, o: seen.append(o))  # before SER's (which ends encode's pass)
    ser = attach_ser(model, 2, photometric=None)
    got = ser.encode(_images())
    h.remove()
    ser.remove()
    assert seen[0].shape[-1] == got.shape[1]  # the stage output is NHWC
    assert got.data_ptr() == seen[0].data_ptr() and not got.is_contiguous()


def test_modified_stem_strides_are_measured():
    """A CIFAR ResNet (3x3 stride-1 conv1, no max-pool) is described as it runs, not as its class declares."""
    model = timm_resnet18()
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    before = _state(model)
    ser = attach_ser(model, 3, photometric=None)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "measuring the strides must not touch buffers"
    assert model.training and all(m.training for m in model.modules()), "the training flags are restored"
    assert ser.vit.strides == (1, 1, 2, 4, 8) and ser.patch_size == (2, 2)
    assert ser.encode(_images()).shape == (4, 128, 16, 16)
    ser.remove()


def test_padded_cifar_stem_border_cells():
    """solo-learn's CIFAR ResNet: conv1 3x3 stride 1 with padding=2, no max-pool, so a 32-px image gives 34-cell
    first maps and 17 / 9 / 5 after. Strides are read from two probe sizes (1, 1, 2, 4, 8), the extra cells are
    the layers' borders, captures of that size are accepted, other sizes are still refused, scale views refused."""
    model = tv_resnet18()
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 2, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    ser = attach_ser(model, 3, photometric=None)
    assert ser.vit.strides == (1, 1, 2, 4, 8) and ser.vit.borders == (2, 2, 1, 1, 1) and ser.patch_size == (2, 2)
    assert "layer2 output (stride 2, 128 ch, +1 border cell)" in repr(ser)
    assert ser.encode(_images()).shape == (4, 128, 17, 17)
    pair = ser.views(_images())
    with ser.capture():
        model(pair.x1), model(pair.x2)
    loss = ser.loss(pair)
    loss.backward()
    assert torch.isfinite(loss) and model.conv1.weight.grad.abs().sum() > 0 and model.layer3[0].conv1.weight.grad is None
    # a map that is not side/stride + border (here a capture of other images' maps) is still refused
    with ser.capture():
        model(_images(4, 64)), model(_images(4, 64))
    with pytest.raises(SERError, match=r"grid \(16, 16\) plus \+1 border cells.*captured map is \(4, 128, 33, 33\)"):
        ser.loss(pair)
    ser.remove()
    with pytest.raises(SERError, match="layer 3 of ResNet has \\+1 border cells"):
        attach_ser(model, 3, scale=(0.7, 1.3))
    stock = tv_resnet18()
    assert attach_ser(stock, 3).vit.borders == (0, 0, 0, 0, 0)  # every stock family: no border, the exact check


def test_user_cnn_through_blocks():
    model = UserCNN()
    ser = attach_ser(model, 2, blocks="stages", photometric=None, head=True)
    assert ser.depth == 3 and ser.vit.strides == (1, 2, 4) and ser.patch_size == (2, 2) and ser.vit.width == 32
    assert "layer L = output of blocks[L-1]" in repr(ser)
    pair = ser.views(_images())
    with ser.capture():
        model(pair.x1), model(pair.x2)
    loss = ser.loss(pair)
    loss.backward()
    assert torch.isfinite(loss) and model.stages[0][0].weight.grad.abs().sum() > 0
    assert model.stages[2][0].weight.grad is None  # above layer 2
    ser.remove()
    with pytest.raises(SERError, match="patch_size=4 but layer 2 .* has stride 2"):
        attach_ser(model, 2, blocks="stages", patch_size=4)


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("name", list(FAMILIES))
def test_out_of_range_layers_refused_with_the_layers_named(name):
    make, depth, names, *_ = FAMILIES[name]
    model = make()
    for bad in (depth + 1, -(depth + 1)):
        with pytest.raises(SERError, match=rf"layer={bad} is out of range .* {depth} layers.*{names[-1]} output.*Valid: 1\.\.{depth}"):
            attach_ser(model, bad)
    assert not any(_hooks(model)[n][0] or _hooks(model)[n][1] for n in _hooks(model))


def test_late_cls_refused_for_maps_with_the_reason():
    with pytest.raises(SERError, match="late_cls=True needs a \\[CLS\\] token, and timm ResNet has none: it pools"):
        attach_ser(timm_resnet18(), 3, late_cls=True)
    with pytest.raises(SERError, match="has none"):
        attach_ser(timm_swin(), 2, late_cls=True)


def test_unsupported_model_names_candidates():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
            self.extra = nn.ModuleList([nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)])

        def forward(self, x):
            return self.body(x)

    with pytest.raises(SERError, match=r"no transformer blocks found in Plain.*ResNet / ConvNeXt / Swin.*blocks=.*'body', 'extra'"):
        attach_ser(Plain(), 1)


def test_ambiguous_wrapper_refused_naming_both():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm_resnet18()
            self.base_encoder = tv_resnet18()

    with pytest.raises(SERError, match="several backbones.*timm ResNet at 'backbone'.*torchvision ResNet at 'base_encoder'"):
        attach_ser(Two(), 3)


def test_wrapped_backbone_found_and_prefix_options_refused():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm_convnext_atto()
            self.head = nn.Linear(320, 8)

        def forward(self, x):
            return self.head(self.backbone(x))

    w = Wrapper()
    ser = attach_ser(w, 2, photometric=None)
    assert ser.vit.layer_names[1] == "backbone.stages.1" and ser._block is w.backbone.stages[1]
    ser.remove()
    with pytest.raises(SERError, match="no prefix tokens"):
        attach_ser(w, 2, num_prefix_tokens=1)
    with pytest.raises(SERError, match="their own strides"):
        attach_ser(w, 2, patch_size=16)


# ------------------------------------------------------------------------------------------------ done when


@pytest.mark.parametrize("name", list(FAMILIES))  # the four (DONE_WHEN) and torchvision's ConvNeXt and Swin
def test_trains_from_the_one_line_attach(name):
    """Middle layer: the SER gradient reaches the stem, nothing above the layer gets any, a few SGD steps on a
    fixed pair lower L_equiv, and remove() leaves the model's state and hooks as they were before attach."""
    make, depth, names, strides, mid, stem, above = FAMILIES[name]
    model = make()
    before_state, before_hooks = _state(model), _hooks(model)
    ser = attach_ser(model, mid, photometric=None)
    assert all(torch.equal(before_state[k], v) for k, v in _state(model).items()), "attach changed the model's state"
    params = dict(model.named_parameters())
    x = _images(6, seed=1)
    pair = ser.views(x, generator=torch.Generator().manual_seed(2))
    model.eval()  # fixed BatchNorm statistics: the state comparison below is about SER, not about training
    opt = torch.optim.SGD(model.parameters(), lr=0.003)
    losses = []
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        with ser.capture():
            model(pair.x1), model(pair.x2)
        loss = ser.loss(pair)
        loss.backward()
        if step == 0:
            assert params[stem].grad is not None and params[stem].grad.abs().sum() > 0, "no SER gradient at the stem"
            assert params[above].grad is None, f"{above} (above layer {mid}) got an SER gradient"
            grads_above = [n for n, p in params.items() if p.grad is not None and n.startswith(names[-1])]
            assert not grads_above, grads_above
            before_step = _state(model)
        losses.append(float(loss.detach()))
        opt.step()
    assert losses[-1] < losses[0], losses
    # remove(): the hooks are gone, and a model that took no step equals its state before attach
    ser.remove()
    assert _hooks(model) == before_hooks
    fresh = make()
    fresh.load_state_dict(before_step)
    ser2 = attach_ser(fresh, mid, photometric=None)
    ser2.remove()
    assert all(torch.equal(before_step[k], v) for k, v in _state(fresh).items())
    assert _hooks(fresh) == {n: ({}, {}) for n, _ in fresh.named_modules()}


def test_token_head_gets_the_layer_width():
    model = timm_convnext_atto()
    ser = attach_ser(model, 2, head=True, photometric=None)
    assert ser.head.norm.normalized_shape == (80,)  # stages.1 has 80 channels
    pair = ser.views(_images())
    with ser.capture():
        model(torch.cat([pair.x1, pair.x2]))
    ser.loss(pair).backward()
    assert ser.head.fc1.weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0


def test_amp_bfloat16_on_cnn_maps():
    model = timm_resnet18()
    ser = attach_ser(model, 3, photometric=None)
    pair = ser.views(_images())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with ser.capture():
            model(pair.x1), model(pair.x2)
        assert ser.captures[0].dtype == torch.bfloat16
        loss = ser.loss(pair)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and model.conv1.weight.grad.abs().sum() > 0


def test_copies_and_saves_of_a_cnn_with_ser():
    model = timm_resnet18()
    ser = attach_ser(model, 3, photometric=None)
    twin = copy.deepcopy(model)  # an EMA teacher
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = _images()
    pair = ser.views(x)
    with ser.capture():
        twin(pair.x1), loaded(pair.x1), loaded(pair.x2)
    assert ser.captures == []  # copies record nothing
    with ser.capture():
        model(pair.x1), model(pair.x2)
    assert torch.isfinite(ser.loss(pair))
    assert remove_ser(twin) == 0 and remove_ser(loaded) == 0
    assert _hooks(twin) == {n: ({}, {}) for n, _ in twin.named_modules()}
    clone = copy.deepcopy(ser)
    assert not clone.is_attached
    ser.remove()


def test_compile_after_attach_on_a_cnn():
    model = UserCNN()
    ser = attach_ser(model, 2, blocks="stages", photometric=None)
    compiled = torch.compile(model, backend="eager")
    pair = ser.views(_images())
    with ser.capture():
        compiled(pair.x1), compiled(pair.x2)
    loss = ser.loss(pair)
    loss.backward()
    ref = UserCNN()
    ref.load_state_dict(model.state_dict())
    ser_ref = attach_ser(ref, 2, blocks="stages", photometric=None)
    with ser_ref.capture():
        ref(pair.x1), ref(pair.x2)
    assert torch.allclose(loss, ser_ref.loss(pair), atol=1e-6)


def test_refused_compiled_cnn():
    model = UserCNN()
    model.stages.compile()
    with pytest.raises(SERError, match="compiled module"):
        attach_ser(model, 2, blocks="stages")


def test_scale_views_on_a_cnn():
    """CNNs take other sizes: scale views give maps of other grids, aligned by ρ_g's resampling."""
    model = timm_convnext_atto()
    ser = attach_ser(model, 2, scale=(0.5, 1.5), photometric=None)
    pair = ser.views(_images(size=64), generator=torch.Generator().manual_seed(3))
    with ser.capture():
        model(pair.x1), model(pair.x2)
    f1, f2 = ser.captures
    assert f1.shape[-1] == pair.x1.shape[-1] // 8 and f2.shape[-1] == pair.x2.shape[-1] // 8
    assert torch.isfinite(ser.loss(pair))
    with pytest.raises(SERError, match="scale views need"):
        attach_ser(timm_swin(), 2, scale=(0.5, 1.5))


def test_map_size_mismatch_refused():
    model = timm_resnet18()
    ser = attach_ser(model, 3, photometric=None)
    with pytest.raises(SERError, match=r"input of \(36, 36\) at stride 8 gives \(4, 4\)"):
        with ser.capture():
            model(torch.rand(2, 3, 36, 36))
    ser.remove()


# ------------------------------------------------------------------------------------------------ stateless path


@pytest.mark.parametrize("name", ["timm_resnet18", "timm_convnext_atto", "timm_swin"])
def test_stateless_forward_intermediates_equals_hook_path(name):
    """forward_intermediates(indices=[L-1]) feeding SERLoss: maps exact, loss and gradients to 1e-6."""
    make, depth, names, strides, mid, *_ = FAMILIES[name]
    model = make()
    x = _images(4, seed=5)
    ser = attach_ser(model, mid, photometric=None)
    pair = ser.views(x, generator=torch.Generator().manual_seed(6))
    with ser.capture():
        model(pair.x1), model(pair.x2)
    f1h, f2h = [f.detach().clone() for f in ser.captures]
    hook_loss = ser.loss(pair)
    hook_loss.backward()
    hook_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ser.remove()
    model.zero_grad(set_to_none=True)

    def maps(v):
        return model.forward_intermediates(v, indices=[mid - 1], stop_early=True, intermediates_only=True)[0]

    crit = SERLoss(SERConfig(layer=mid))
    f1, f2 = maps(pair.x1), maps(pair.x2)
    assert torch.equal(f1, f1h) and torch.equal(f2, f2h)
    loss = crit(f1, f2, pair)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert abs(float(loss) - float(hook_loss)) < 1e-6
    assert grads.keys() == hook_grads.keys()
    for n in grads:
        assert torch.allclose(grads[n], hook_grads[n], atol=1e-6, rtol=1e-5), n


# ------------------------------------------------------------------------------------------------ sync-free step


def test_cnn_step_makes_no_host_sync_beyond_the_views():
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dist_helpers.common import VIEW_SITES, step_syncs

    model = timm_convnext_atto()
    ser = attach_ser(model, 2, check_finite=False)
    c = step_syncs(model, ser, _images(8, seed=7))
    others = [e for e in c.events if not e[1].startswith(VIEW_SITES)]
    assert not others, c.report()


def test_ddp_gather_path_accepts_cnn_maps():
    """The loss under a (1-process) gloo group goes through the gathered path with the same value."""
    import os
    import tempfile

    import torch.distributed as dist

    model = timm_convnext_atto()
    ser = attach_ser(model, 2, photometric=None)
    pair = ser.views(_images(), generator=torch.Generator().manual_seed(8))
    with ser.capture():
        model(pair.x1), model(pair.x2)
    f1, f2 = [f.detach() for f in ser.captures]
    ref = ser.loss(pair)
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'pg')}", rank=0, world_size=1)
        try:
            got = ser.loss_from_maps(pair, f1, f2)
        finally:
            dist.destroy_process_group()
    assert torch.allclose(got, ref.detach(), atol=1e-6)
    ser.remove()



# ------------------------------------------------------------------------------------------------ DDP


def _one_process_maps_step(step, lr=None, **options):
    from dist_helpers.common import make_images, make_pair, ser_step

    net = step.make_convnext(0)
    ser = attach_ser(net, step.LAYER, photometric=None, **options)
    return ser_step(net, ser, make_pair(make_images(step.N, seed=30), seed=31), net, lr=lr)


def _maps_step_module():
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dist_helpers import ddp_maps_step

    return ddp_maps_step


def test_memory_linear_loss_on_cnn_maps_equals_dense():
    """The chunked negative log-sum-exp (chunk_elements far below one image's (h*w)^2 similarities) gives the dense
    loss and gradients on a CNN map."""
    step = _maps_step_module()
    dense = _one_process_maps_step(step)
    chunked = _one_process_maps_step(step, chunk_elements=step.CHUNK)
    assert torch.allclose(chunked["ser"], dense["ser"], atol=1e-6, rtol=1e-6), (chunked["ser"], dense["ser"])
    bad = [n for n in dense["grads"] if not torch.allclose(chunked["grads"][n], dense["grads"][n], atol=1e-6, rtol=1e-5)]
    assert not bad and len(dense["grads"]) == len(chunked["grads"]) > 0, bad[:5]


@pytest.fixture(scope="module")
def maps_dist_results(tmp_path_factory):
    """One torchrun launch (2 gloo processes) of tests/dist_helpers/ddp_maps_step.py: DDP, FSDP2, DDP + chunked loss."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    out = tmp_path_factory.mktemp("maps_dist")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(here) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(here, "dist_helpers", "ddp_maps_step.py"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _close(a, b):
    return torch.allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("scenario", ["convnext", "convnext_fsdp", "convnext_chunked"])
def test_distributed_on_cnn_maps_equals_one_process(maps_dist_results, scenario):
    """2 gloo processes x 4 images (tiny timm ConvNeXt, SER at stages.1) under DDP, FSDP2 (fully_shard on each stage
    and the root) and DDP with the chunked loss: the same losses and gradients (and, DDP, SGD update) as one
    process on all 8 images."""
    step = _maps_step_module()
    res = [r[scenario] for r in maps_dist_results]
    for r in res:
        assert "error" not in r, r.get("traceback")
    fsdp = scenario == "convnext_fsdp"
    ref = _one_process_maps_step(step, lr=None if fsdp else step.LR)
    assert _close((res[0]["ser"] + res[1]["ser"]) / 2, ref["ser"]), (res[0]["ser"], res[1]["ser"], ref["ser"])
    assert not _close(res[0]["ser"], res[1]["ser"])  # the ranks saw different images
    if fsdp:
        assert res[0]["sharded"] == "DTensor"  # the parameters really are sharded
    for r in res:
        bad = [n for n in ref["grads"] if not _close(r["grads"][n], ref["grads"][n])]
        assert not bad and set(r["grads"]) == set(ref["grads"]), bad[:5]
        if not fsdp:
            assert all(_close(r["params"][n], ref["params"][n]) for n in ref["params"])
