"""1,000 SER steps: no growth of live tensors or memory, captures freed every step, no hook left after remove()."""

from __future__ import annotations

import gc
import os

import pytest
import timm
import torch

from ser_plugin import attach_ser

STEPS = 1000


def _live_tensors() -> int:
    gc.collect()
    n = 0
    for o in gc.get_objects():
        try:
            if torch.is_tensor(o):
                n += 1
        except Exception:  # objects whose isinstance check raises
            pass
    return n


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_forward_hooks_with_kwargs", {})) for m in model.modules())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc walk touches deprecated torch.distributed aliases
def test_thousand_steps_no_leak_and_clean_remove():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs dominate on shared cores (10x slower with 2 threads)
    try:
        _run()
    finally:
        torch.set_num_threads(threads)


def _run():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=16, depth=2,
                            num_heads=2, num_classes=0)
    hooks_before = _hooks(vit)
    ser = attach_ser(vit, 1, photometric=None, head=True, head_dims=(8, 8))
    opt = torch.optim.SGD(list(vit.parameters()) + list(ser.parameters()), lr=1e-2, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    counts, rss = {}, {}
    for step in range(1, STEPS + 1):
        pair = ser.views(x, generator=g)
        with ser.capture():
            o1, o2 = vit(pair.x1), vit(pair.x2)
        loss = (o1 - o2).pow(2).mean() + ser.loss(pair)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert not ser._captures, f"captures left after step {step}"
        if step in (100, STEPS):
            del pair, o1, o2, loss
            counts[step], rss[step] = _live_tensors(), _rss_mib()
    assert torch.isfinite(ser.last_loss)
    assert counts[STEPS] <= counts[100], f"live tensors grew from {counts[100]} (step 100) to {counts[STEPS]} (step {STEPS})"
    assert rss[STEPS] - rss[100] < 16, f"RSS grew by {rss[STEPS] - rss[100]:.1f} MiB between step 100 and {STEPS}"
    assert _hooks(vit) > hooks_before
    ser.remove()
    assert _hooks(vit) == hooks_before, "remove() left hooks on the model"
    assert not ser.is_attached
