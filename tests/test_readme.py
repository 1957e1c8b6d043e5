"""The README's training step runs as written, and the Compatibility table names tests that exist."""

from __future__ import annotations

import ast
import builtins
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
DOCUMENTED = {"encoder", "head", "loader", "host_augment", "host_loss", "n2"}


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def _training_step() -> str:
    section = _section("A complete training step")
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section should hold exactly one python block"
    return blocks[0]


def _free_names(code: str) -> set:
    """Names the block reads but never binds (imports, assignments, loop targets), builtins excluded."""
    tree = ast.parse(code)
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else read).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    return read - bound - set(dir(builtins))


def test_training_step_has_only_documented_free_names():
    free = _free_names(_training_step())
    assert free <= DOCUMENTED, f"undefined names in the README's training step: {sorted(free - DOCUMENTED)}"
    prose = _section("A complete training step").split("```", 2)[2]
    for name in free:
        assert f"`{name}`" in prose, f"{name} is used by the training step but not described under it"


def test_training_step_shows_mean_and_std():
    code = _training_step()
    assert "mean=" in code and "std=" in code


def test_training_step_runs_as_written():
    import timm

    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=4,
                                num_heads=2, num_classes=0)
    head = nn.Linear(32, 16)
    g = torch.Generator().manual_seed(1)
    loader = [(torch.rand(8, 3, 32, 32, generator=g) - mean) / std for _ in range(2)]  # a normalising loader

    def host_augment(x):
        return x.flip(-1)

    def host_loss(a, b):
        return -F.cosine_similarity(head(a), head(b)).mean()

    before = [p.detach().clone() for p in encoder.parameters()]
    ns = dict(encoder=encoder, head=head, loader=loader, host_augment=host_augment, host_loss=host_loss, n2=2)
    exec(compile(_training_step(), "README.md:training-step", "exec"), ns)
    ser = ns["ser"]
    assert not ser.is_attached and torch.isfinite(ns["loss"]) and ser.last_loss is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.parameters())), "the step did not train"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in encoder.modules())


COMPAT = open(os.path.join(ROOT, "docs", "compatibility.md"), encoding="utf-8").read()


def test_compatibility_table_names_existing_tests():
    table = COMPAT
    refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`((?:, `::\w+`)*)", table)
    assert refs, "the Compatibility table cites no test"
    for path, name, more in refs:
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        names = ([name] if name else []) + re.findall(r"::(\w+)", more)
        for n in names:
            assert re.search(rf"def {n}\b", text), f"{path}::{n} cited in the Compatibility table does not exist"


@pytest.mark.parametrize("row", ["EMA", "SWA", "AveragedModel", "torch.save", "Lightning checkpoints", "DDP", "FSDP", "DataParallel",
                                 "compile", "checkpointing", "AMP", "half", "accumulation", "normalised loaders", "masked-image"])
def test_compatibility_table_covers_every_stack(row):
    rows = [line for line in COMPAT.splitlines() if line.startswith("| ") and row in line]
    assert rows, f"no Compatibility row for {row}"
