"""benchmarks/sync_counter.py: every kind of host sync it claims to see is seen, and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from sync_counter import count_collectives, count_syncs  # noqa: E402


def test_each_kind_of_sync_is_counted_once():
    x = torch.randn(16)
    cases = {
        "item": (lambda: x.sum().item(), "aten._local_scalar_dense"),
        "bool": (lambda: bool(x.sum() > 0), "Tensor.__bool__"),
        "int": (lambda: int(x.argmax()), "aten._local_scalar_dense"),
        "if": (lambda: 1 if (x > 0).any() else 0, "Tensor.__bool__"),
        "tolist": (lambda: x.tolist(), "Tensor.tolist"),
        "numpy": (lambda: x.numpy(), "Tensor.numpy"),
        "asarray": (lambda: np.asarray(x), "Tensor.__array__"),
        "nonzero": (lambda: x.nonzero(), "aten.nonzero"),
        "unique": (lambda: torch.unique(x), "aten._unique2"),
        "masked_select": (lambda: x.masked_select(x > 0), "aten.masked_select"),
        "bool_index": (lambda: x[x > 0], "aten.index"),
        "bool_setitem": (lambda: x.clone().__setitem__(x > 0, 0.0), "aten.index_put_"),
        "repeat_interleave": (lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 1])), "aten.repeat_interleave"),
    }
    for name, (fn, op) in cases.items():
        with count_syncs() as c:
            fn()
        assert c.total == 1 and c.by_op == {op: 1}, (name, c.report())


def test_sync_free_ops_are_not_counted_and_methods_are_restored():
    x = torch.randn(4, 8, requires_grad=True)
    before = torch.Tensor.tolist
    with count_syncs() as c:
        y = (x @ x.t()).softmax(-1)
        y = y.masked_fill(y > 0.5, 0.0)
        idx = torch.arange(4).repeat_interleave(3)  # int repeats: shape known on the host
        y = y.index_select(0, idx[:4]) + torch.where(y > 0, y, -y)
        y.sum().backward()
    assert c.total == 0, c.report()
    assert torch.Tensor.tolist is before


def test_nested_blocks_both_count_and_report_names_the_line():
    x = torch.randn(3)
    with count_syncs() as outer:
        x.tolist()
        with count_syncs() as inner:
            x.max().item()
    assert outer.total == 2 and inner.total == 1
    assert "test_sync_counter.py" in inner.report()


def test_backward_and_custom_functions_are_seen():
    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            float(g.sum())  # a sync hidden in backward
            return g * 2

    a = torch.randn(3, requires_grad=True)
    with count_syncs() as c:
        F.apply(a).sum().backward()
    assert c.by_op == {"aten._local_scalar_dense": 1}, c.report()


def test_collective_counter_wraps_and_restores_without_a_process_group():
    import torch.distributed as dist

    before = dist.all_gather
    with count_collectives() as c:
        assert dist.all_gather is not before
    assert dist.all_gather is before and c.total == 0
