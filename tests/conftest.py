"""Shared fixtures: tiny ViTs of every supported family, built without downloads."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# hypothesis keeps no example database, and its other caches (.hypothesis/constants) go to a temporary directory
# instead of the working directory, which tests leave untouched (see pytest_sessionfinish below)
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="ser-plugin-hypothesis-")
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, database=None)
settings.register_profile("dev", max_examples=200, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------ tests write only under their tmp dirs
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _tree() -> dict:
    """{path: (size, mtime)} of the checkout's files, virtual environments and caches left out."""
    files = {}
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not os.path.exists(os.path.join(top, d, "pyvenv.cfg"))]
        for n in names:
            p = os.path.join(top, n)
            try:
                st = os.stat(p)
            except OSError:
                continue
            files[os.path.relpath(p, ROOT)] = (st.st_size, st.st_mtime_ns)
    return files


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config._ser_tree = _tree()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails the run if a test created, changed or removed a file in the checkout (outside caches): every test
    writes under its tmp_path."""
    before = getattr(session.config, "_ser_tree", None)
    if before is None:
        return
    after = _tree()
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = "tests wrote into the checkout (write under tmp_path instead): " + ", ".join(changed[:20])
        if reporter is not None:
            reporter.write_line(msg, red=True)
        else:
            print(msg)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def tiny_timm(**kw):
    import timm

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=0)
    args.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**args)


def tiny_torchvision():
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64)


def tiny_hf():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    return ViTModel(cfg, add_pooling_layer=False)
