"""The last silent edges of the handle (issue 17): empty b2 batches, container block lists, skipped steps,
portable whole-model saves, one image with gather=True, entry points other than the root forward.

Each test was run against the code before the fix and failed there (see the commit message of the fix).
The 2-process half of class 1 is in tests/test_distributed.py (``test_rank_without_b2_images_through_the_handle``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers.common import LAYER, make_images, make_pair, make_vit  # noqa: E402

from ser_plugin import SERError, SERLoss, TokenInfoNCE, ViewPair, attach_ser, remove_ser  # noqa: E402
from ser_plugin.group import GroupElement  # noqa: E402


def _step(ser, model, pair) -> Tensor:
    with ser.capture():
        model(pair.x1), model(pair.x2)
    return ser.loss(pair)


# ------------------------------------------------------------------------------------------------ 1. empty b2
def test_empty_b2_batch_flows_through_views_capture_and_loss_as_an_exact_zero():
    """One process, a step whose b2 share is 0 images: views, capture, loss and backward all run; the loss is
    exactly 0 and every gradient it sends is exactly 0 (no hang, no NaN)."""
    model = make_vit(0)
    ser = attach_ser(model, LAYER, head=True, head_dims=(8, 8))  # built-in photometrics on the empty batch too
    pair = ser.views(torch.rand(0, 3, 16, 16))
    assert pair.x1.shape == (0, 3, 16, 16) == pair.x2.shape and len(pair.g1) == 0 == len(pair.g2)
    loss = _step(ser, model, pair)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in list(model.parameters()) + list(ser.parameters()) if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    assert ser.captures == []
    # and the next, non-empty step is an ordinary step
    pair = make_pair(make_images(4, seed=1), seed=2)
    assert torch.isfinite(_step(ser, model, pair)) and ser.last_loss > 0
    ser.remove()


def test_empty_b2_batch_with_scale_views_skipping_the_passes_and_the_stateless_loss():
    """timm with dynamic_img_size cannot run a batch of 0 images (a reshape in its position embedding): such a
    rank skips the passes, and ser.loss of the empty pair with nothing captured is the same exact zero."""
    model = make_vit(0, dynamic=True)
    ser = attach_ser(model, LAYER, scale=(0.5, 1.5), rotations=False, head=True, head_dims=(8, 8))
    pair = ser.views(torch.rand(0, 3, 16, 16))
    assert pair.x1.shape[0] == 0 and pair.x1.shape[-1] % 4 == 0 and pair.x1.shape[-2] % 4 == 0
    loss = ser.loss(pair)
    loss.backward()
    assert loss.item() == 0.0 and all(torch.count_nonzero(p.grad) == 0 for p in ser.parameters())
    ser.remove()
    f = torch.zeros(0, 6, 3, 3, requires_grad=True)
    g = GroupElement.from_d4(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    for gather in (False, True, "auto"):
        loss = SERLoss(gather=gather)(f, f, g)
        loss.backward()
        assert loss.item() == 0.0 and f.grad.shape == f.shape


# ----------------------------------------------------------------------------------- 2. container block lists
class Attention(nn.Module):
    """Pre-norm self-attention WITHOUT the residual (the parent's loop adds it), as in minimal ViT code."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return self.attn(h, h, h, need_weights=False)[0]


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """``layers`` holds ``ModuleList([attention, feed_forward])`` pairs; the residuals are added here."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([Attention(dim), FeedForward(dim, 2 * dim)]) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class PairViT(nn.Module):
    """A minimal ViT of that style: linear patch embedding, [CLS], learned positions, the pair transformer."""

    def __init__(self, img: int = 16, patch: int = 4, dim: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.patch_size = patch
        self.num_prefix_tokens = 1
        self.embed_dim = dim
        self.to_patch_embedding = nn.Linear(3 * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, 1 + (img // patch) ** 2, dim) * 0.02)
        self.transformer = Transformer(dim, depth)

    def tokens(self, x: Tensor) -> Tensor:
        p = self.patch_size
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
        x = self.to_patch_embedding(x)
        return torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embedding

    def forward(self, x: Tensor) -> Tensor:
        return self.transformer(self.tokens(x))[:, 0]


class ResidualPair(nn.Module):
    """The thin wrapper the refusal recommends: one block, the residual stream in and out."""

    def __init__(self, attn: nn.Module, ff: nn.Module) -> None:
        super().__init__()
        self.attn, self.ff = attn, ff

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(x) + x
        return self.ff(x) + x


class BlockTransformer(Transformer):
    def __init__(self, pairs: Transformer) -> None:
        nn.Module.__init__(self)
        self.layers = nn.ModuleList([ResidualPair(a, f) for a, f in pairs.layers])
        self.norm = pairs.norm

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers:
            x = block(x)
        return self.norm(x)


@pytest.mark.parametrize("given", ["path", "list"])
def test_block_list_of_attention_feed_forward_pairs_is_refused_with_the_fix(given):
    """Passing the pair list used to flatten it (depth 6 instead of 3) and hook a feed-forward output, which is
    not the residual stream: a silently wrong map. Now refused, naming the pairs and the wrapper to write."""
    torch.manual_seed(0)
    model = PairViT()
    blocks = "transformer.layers" if given == "path" else list(model.transformer.layers)
    with pytest.raises(SERError) as err:
        attach_ser(model, 2, blocks=blocks)
    msg = str(err.value)
    for part in ("ModuleList", "Attention", "FeedForward", "residual stream", "x = attn(x) + x", "blocks=", "SERLoss"):
        assert part in msg, (part, msg)
    assert not any(type(h).__module__.startswith("ser_plugin") for m in model.modules() for h in m._forward_hooks.values())


def test_auto_detection_that_finds_nothing_names_the_candidate_lists():
    torch.manual_seed(0)
    model = PairViT()
    with pytest.raises(SERError) as err:
        attach_ser(model, 2)
    msg = str(err.value)
    assert "'transformer.layers'" in msg and "3 entries" in msg and "ModuleList" in msg, msg
    assert "x = attn(x) + x" in msg, msg


def test_the_wrapper_the_message_recommends_hooks_the_residual_stream():
    """With each pair wrapped (ResidualPair) the captured map is the residual stream after 2 blocks, computed here
    by hand, and the handle's loss equals the stateless loss on the hand-made maps."""
    torch.manual_seed(0)
    model = PairViT()
    model.transformer = BlockTransformer(model.transformer)
    ser = attach_ser(model, 2, blocks="transformer.layers", photometric=None)
    assert ser.depth == 3
    pair = make_pair(make_images(4, seed=1), seed=2)
    got = _step(ser, model, pair)

    def by_hand(x: Tensor) -> Tensor:
        z = model.tokens(x)
        for attn, ff in [(b.attn, b.ff) for b in model.transformer.layers[:2]]:
            z = attn(z) + z
            z = ff(z) + z
        return z[:, 1:].transpose(1, 2).reshape(4, 32, 4, 4)

    want = SERLoss(ser.config)(by_hand(pair.x1), by_hand(pair.x2), pair)
    torch.testing.assert_close(got, want)
    ser.remove()


# ------------------------------------------------------------------------------------------- 3. skipped steps
def test_step_skipped_after_complete_captures_does_not_break_the_next_step():
    """Capture both views, then skip the batch before ser.loss (host loss not finite): the next step works and
    gives the loss of a fresh handle (the unconsumed pair is dropped when the next capture block begins)."""
    model = make_vit(0)
    pair = make_pair(make_images(4, seed=1), seed=2)
    fresh = attach_ser(model, LAYER, photometric=None)
    ref = _step(fresh, model, pair).detach()
    fresh.remove()
    ser = attach_ser(model, LAYER, photometric=None)
    stale = make_pair(make_images(4, seed=5), seed=6)
    for _ in range(2):  # two skipped steps in a row
        with ser.capture():
            model(stale.x1), model(stale.x2)
    assert len(ser.captures) == 2, "a new block drops the earlier block's complete pair, keeps its own"
    torch.testing.assert_close(_step(ser, model, pair).detach(), ref)
    # the two-blocks-one-per-view pattern, after a skipped step
    with ser.capture():
        model(stale.x1), model(stale.x2)
    with ser.capture():
        model(pair.x1)
    with ser.capture():
        model(pair.x2)
    torch.testing.assert_close(ser.loss(pair).detach(), ref)
    ser.remove()


def test_skipped_concatenated_step_is_refused_naming_the_earlier_step_and_clear():
    """One capture of both views concatenated, skipped, then the next step: the held map cannot be told apart from
    the first view of a two-block step, so it is kept, and the loss names it and ser.clear()."""
    model = make_vit(0)
    ser = attach_ser(model, LAYER, photometric=None)
    stale, pair = make_pair(make_images(4, seed=5), seed=6), make_pair(make_images(4, seed=1), seed=2)
    with ser.capture():
        model(torch.cat([stale.x1, stale.x2]))
    with ser.capture():
        model(torch.cat([pair.x1, pair.x2]))
    with pytest.raises(SERError) as err:
        ser.loss(pair)
    msg = str(err.value)
    assert "ser.clear()" in msg and "earlier" in msg and "2 capture blocks" in msg, msg
    with ser.capture():  # consumed by the failed loss: the next step is clean
        model(torch.cat([pair.x1, pair.x2]))
    assert torch.isfinite(ser.loss(pair))
    ser.remove()


# ------------------------------------------------------------------------------------ 4. portable whole-model saves
_BLOCK_SER_PLUGIN = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ser_plugin" or name.startswith("ser_plugin."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, _Block())
"""


def _load_without_ser_plugin(path: str, x_path: str, code: str) -> subprocess.CompletedProcess:
    script = _BLOCK_SER_PLUGIN + textwrap.dedent(f"""
        import torch
        try:
            import ser_plugin
        except ImportError:
            pass
        else:
            raise SystemExit("ser_plugin is importable: the test would prove nothing")
        model = torch.load({path!r}, weights_only=False)
        x = torch.load({x_path!r})
    """) + textwrap.dedent(code)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd="/")


def test_model_saved_with_ser_attached_loads_and_runs_where_ser_plugin_is_not_installed(tmp_path):
    model = make_vit(0).eval()
    x = make_images(3, seed=1)
    with torch.no_grad():
        stock = model(x)
    ser = attach_ser(model, LAYER, photometric=None)
    with ser.capture():  # saved in the middle of training, even while armed
        model(x)
        torch.save(model, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    torch.save(stock, tmp_path / "stock.pt")
    proc = _load_without_ser_plugin(str(tmp_path / "model.pt"), str(tmp_path / "x.pt"), f"""
        with torch.no_grad():
            out = model(x)
        stock = torch.load({str(tmp_path / "stock.pt")!r})
        assert torch.equal(out, stock), (out - stock).abs().max()
        hooks = [h for m in model.modules() for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())]
        assert all("ser_plugin" not in type(h).__module__ for h in hooks), hooks
        print("OK", len(hooks))
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    # where ser_plugin is installed the loaded hooks are still ser_plugin's: remove_ser finds and removes them
    clone = torch.load(tmp_path / "model.pt", weights_only=False)
    from ser_plugin.tap import is_ser_hook

    assert sum(is_ser_hook(h) for m in clone.modules() for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())) >= 2
    remove_ser(clone)
    assert not any(is_ser_hook(h) for m in clone.modules() for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()))
    with torch.no_grad():
        assert torch.equal(clone(x), stock)
    ser.remove()


def test_model_with_late_cls_saved_says_it_needs_ser_plugin(tmp_path):
    """late_cls=True changes where [CLS] joins: part of the trained architecture, so that save needs ser_plugin to
    load; the ImportError names the package (no silently different model)."""
    model = make_vit(0)
    attach_ser(model, LAYER, photometric=None, late_cls=True)
    torch.save(model, tmp_path / "late.pt")
    torch.save(make_images(2, seed=1), tmp_path / "x.pt")
    proc = _load_without_ser_plugin(str(tmp_path / "late.pt"), str(tmp_path / "x.pt"), "print('loaded')")
    assert proc.returncode != 0 and "ser_plugin" in proc.stderr, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- 5. one image, gather outside a group
@pytest.mark.parametrize("gather", [True, False, "auto"])
def test_one_image_is_refused_with_or_without_gather_outside_a_process_group(gather):
    """Gather=True without a process group used to return exactly 0 with zero gradients for 1 image; now every
    gather setting gives the same refusal (one image has no negatives)."""
    f = torch.randn(1, 6, 3, 3, requires_grad=True)
    g = GroupElement.from_d4(torch.tensor([1]), torch.tensor([False]))
    with pytest.raises(SERError, match="at least 2 images"):
        TokenInfoNCE(gather=gather)(f, f, g)
    model = make_vit(0)
    ser = attach_ser(model, LAYER, photometric=None, gather=gather)
    pair = make_pair(make_images(1, seed=1), seed=2)
    with pytest.raises(SERError, match="at least 2 images"):
        _step(ser, model, pair)
    ser.remove()


# ------------------------------------------------------------------------------- 6. entry points other than forward
def test_forward_features_with_non_square_scale_views_equals_the_root_forward():
    """timm's forward_features (the root forward is never called) with non-square scale views: the input size is
    recorded at the patch embedding, so the maps and the loss equal those of model(x)."""
    model = make_vit(0, dynamic=True)
    ser = attach_ser(model, LAYER, photometric=None, scale=(0.5, 1.5), rotations=False)
    gen = torch.Generator().manual_seed(3)
    sizes = set()
    for _ in range(4):
        pair = ser.views(make_images(4, seed=1), generator=gen)
        sizes |= {tuple(pair.x1.shape[-2:]), tuple(pair.x2.shape[-2:])}
        with ser.capture():
            model.forward_features(pair.x1), model.forward_features(pair.x2)
        via_features = ser.loss(pair).detach()
        with ser.capture():
            model(pair.x1), model(pair.x2)
        torch.testing.assert_close(via_features, ser.loss(pair).detach())
    assert any(h != w for h, w in sizes), f"the test needs non-square views, got {sizes}"
    # a root pass of another size just before does not leak its size into the next forward_features pass
    other = ser.views(make_images(4, seed=7), generator=torch.Generator().manual_seed(11))
    with ser.capture():
        model(other.x1)
    ser.clear()
    with ser.capture():
        model.forward_features(pair.x1), model.forward_features(pair.x2)
    assert torch.isfinite(ser.loss(pair))
    ser.remove()


def test_sub_entry_point_without_a_patch_convolution_names_the_unseen_input_size():
    """A model with a linear patch embedding run through a sub-module (never the root): the input size cannot be
    seen; the message says so and names the fix instead of blaming the prefix count and the patch size."""
    torch.manual_seed(0)
    model = PairViT(img=16)
    model.transformer = BlockTransformer(model.transformer)
    ser = attach_ser(model, 2, blocks="transformer.layers", photometric=None)
    x = torch.rand(2, 3, 12, 16)
    model.pos_embedding = nn.Parameter(torch.zeros(1, 1 + 12, 32))
    with pytest.raises(SERError) as err:
        with ser.capture():
            model.transformer(model.tokens(x))
    msg = str(err.value)
    assert "input size was not seen" in msg and "forward_features" in msg and "root" in msg, msg
    ser.remove()


def test_views_of_an_empty_batch_keep_their_other_checks():
    views = attach_ser(make_vit(0), LAYER).view_policy
    with pytest.raises(SERError, match="multiple of patch_size"):
        views(torch.rand(0, 3, 15, 16))
    with pytest.raises(SERError, match="float images"):
        views(torch.zeros(0, 3, 16, 16, dtype=torch.uint8))
    assert isinstance(views(torch.rand(0, 3, 16, 16)), ViewPair)
