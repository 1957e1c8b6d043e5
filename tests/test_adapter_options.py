"""One configuration everywhere: SERConfig as argparse flags and as an OmegaConf structured config, the per-host
recipes (and the docs that state them), and the b2 capture-slicing helper the adapters share."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re

import pytest
import torch

from ser_plugin import PRESETS, SERConfig, SERError
from ser_plugin.integrations import (
    HOST_RECIPES,
    SERStructuredConfig,
    add_ser_args,
    b2_maps,
    config_from_args,
    config_from_structured,
    recipe,
    structured,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = [f.name for f in dataclasses.fields(SERConfig)]


def _parser(base: SERConfig | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_ser_args(p, base=base)
    return p


# ------------------------------------------------------------------------------------------ argparse
def test_every_field_has_one_flag_with_the_same_name() -> None:
    p = _parser()
    flags = {s for a in p._actions for s in a.option_strings}
    for name in FIELDS:
        assert "--ser-" + name.replace("_", "-") in flags, name
    assert "--ser-preset" in flags
    # nothing given: exactly the base config, whatever it is
    for base in (SERConfig(), recipe("dino"), recipe("mocov3", head=True)):
        assert config_from_args(_parser(base).parse_args([]), base) == base


def test_flags_parse_into_the_config_with_recipe_preset_flag_precedence() -> None:
    base = recipe("dino")
    args = _parser(base).parse_args([
        "--ser-lam", "0.5", "--ser-head", "--ser-head-dims", "64", "32", "--ser-scale", "0.7", "1.3", "--ser-mean", "0.5", "0.5", "0.5",
        "--ser-std", "0.2", "0.2", "0.2", "--ser-gather", "false", "--ser-photometric", "none", "--ser-max-negatives", "100",
        "--ser-b2-share", "0.1", "--no-ser-flips",
    ])
    cfg = config_from_args(args, base)
    assert (cfg.layer, cfg.lam, cfg.tau) == (3, 0.5, 0.5)  # layer and tau from the dino recipe, lam given
    assert cfg.head is True and cfg.head_dims == (64, 32) and cfg.scale == (0.7, 1.3)
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.2, 0.2, 0.2)
    assert cfg.gather is False and cfg.photometric is None and cfg.max_negatives == 100 and cfg.b2_share == 0.1 and cfg.flips is False
    # preset over the recipe, explicit flags over the preset (in any order on the command line)
    cfg = config_from_args(_parser(base).parse_args(["--no-ser-late-cls", "--ser-preset", "authors"]), base)
    for k, v in PRESETS["authors"].items():
        if k != "late_cls":
            assert getattr(cfg, k) == v, k
    assert cfg.late_cls is False and cfg.tau == 0.5 and cfg.lam == 0.3
    assert config_from_args(_parser().parse_args(["--ser-max-negatives", "none"])).max_negatives is None


def test_bad_flag_values_name_the_field() -> None:
    with pytest.raises(SERError, match="SERConfig.lam=-1.0"):
        config_from_args(_parser().parse_args(["--ser-lam", "-1"]))
    with pytest.raises(SERError, match="scale"):
        config_from_args(_parser().parse_args(["--ser-scale", "0.7"]))
    with pytest.raises(SERError, match="pairing"):
        config_from_args(_parser().parse_args(["--ser-pairing", "random"]))
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(["--ser-lam", "abc"])


# ------------------------------------------------------------------------------------------ OmegaConf
def test_structured_config_mirrors_the_dataclass() -> None:
    omegaconf = pytest.importorskip("omegaconf", reason="omegaconf is not installed (pip install omegaconf)")
    names = [f.name for f in dataclasses.fields(SERStructuredConfig)]
    assert names == ["preset"] + FIELDS
    node = omegaconf.OmegaConf.structured(structured(recipe("mocov3")))
    assert config_from_structured(node, SERConfig()) == recipe("mocov3")  # every key given explicitly
    assert config_from_structured(omegaconf.OmegaConf.structured(SERStructuredConfig)) == SERConfig()


def test_structured_overrides_like_hydra_command_lines() -> None:
    omegaconf = pytest.importorskip("omegaconf", reason="omegaconf is not installed (pip install omegaconf)")
    OmegaConf = omegaconf.OmegaConf
    # ++ser.lam=0.5 ++ser.scale=[0.7,1.3] ++ser.gather=false on a method whose recipe is dino
    node = OmegaConf.from_dotlist(["lam=0.5", "scale=[0.7,1.3]", "gather=false", "preset=authors", "head=false"])
    cfg = config_from_structured(node, recipe("dino"))
    assert (cfg.layer, cfg.lam, cfg.tau, cfg.scale, cfg.gather, cfg.head, cfg.late_cls) == (3, 0.5, 0.5, (0.7, 1.3), False, False, True)
    assert config_from_structured(None, recipe("dino")) == recipe("dino")
    with pytest.raises(SERError, match="'lamb' \\(did you mean 'lam'\\?\\); valid names"):
        config_from_structured({"lamb": 1.0})  # the same message as attach_ser(lamb=...)
    with pytest.raises(SERError, match="SERConfig.lam='abc' is not allowed"):
        config_from_structured({"lam": "abc"})
    with pytest.raises(SERError, match="SERConfig.tau"):
        config_from_structured({"tau": 0})


# ------------------------------------------------------------------------------------------ recipes and docs
def test_recipes_are_valid_and_stated_once_in_the_docs() -> None:
    for name in HOST_RECIPES:
        assert recipe(name).layer == 3
    with pytest.raises(SERError, match="available"):
        recipe("simclr")
    readme = open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8").read()
    method = open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8").read()
    # docs/configuration.md, "Recipes": | `name` | layer | lam | tau | b2_share | ... (one row per recipe, plus the library defaults)
    rows = {m[0]: tuple(float(v) for v in m[1:]) for m in re.findall(r"^\| `(\w+)` \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", readme, re.M)}
    want = {k: (v["layer"], v["lam"], v["tau"], v["b2_share"]) for k, v in HOST_RECIPES.items()}
    assert rows == want, rows
    lib = re.search(r"^\| library defaults \(`SERConfig\(\)`\) \| — \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", readme, re.M)
    d = SERConfig()
    assert lib and tuple(float(v) for v in lib.groups()) == (d.lam, d.tau, d.b2_share)
    # docs/method.md §10 states the library defaults and each recipe
    sec = method[method.index("## 10."): method.index("## 11.")]
    assert f"`lam` (λ) | **{d.lam}**" in sec and f"`tau` (τ) | **{d.tau}**" in sec and f"`b2_share` | **{d.b2_share}**" in sec
    for name, v in HOST_RECIPES.items():
        label = {"mocov3": "MoCo-v3", "dino": "DINO", "barlow_twins": "Barlow Twins"}[name]
        assert f"{label} `layer={v['layer']}, lam={v['lam']}, tau={v['tau']}, b2_share={v['b2_share']}`" in sec, name


def test_docs_use_the_one_set_of_option_names() -> None:
    stale = re.compile(r"--ser_\w+|--ser-lambda|--ser-b2\b(?!-share)|\+\+ser\.b2=|SERCallback\([^)]*\bb2=|\bser\.b2\b")
    paths = ["README.md", "examples/README.md"] + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)]
    for d in ("examples/moco_v3", "examples/dino", "examples/solo_learn", "examples/dinov2"):
        paths += [os.path.join(d, f) for f in os.listdir(os.path.join(ROOT, d)) if f.endswith((".md", ".py"))]
    paths += ["examples/lightly_dino.py", "examples/quickstart.py", "examples/stateless.py"]
    bad = []
    for rel in paths:
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        bad += [f"{rel}: {m.group(0)}" for m in stale.finditer(text)]
    assert not bad, bad


# ------------------------------------------------------------------------------------------ b2_maps
def test_b2_maps_takes_the_last_rows_of_each_view() -> None:
    c1, c2, local = torch.randn(8, 4, 2, 2), torch.randn(8, 4, 2, 2), torch.randn(8, 4, 1, 1)
    f1, f2 = b2_maps([c1, c2, local], 3)
    assert torch.equal(f1, c1[5:]) and torch.equal(f2, c2[5:])
    cat = torch.cat([c1, c2])
    g1, g2 = b2_maps([cat, local], 3, concatenated=True)
    assert torch.equal(g1, c1[5:]) and torch.equal(g2, c2[5:])


def test_b2_maps_refuses_what_it_cannot_slice() -> None:
    c = torch.randn(8, 4, 2, 2)
    with pytest.raises(SERError, match="expected 2 captured pass"):
        b2_maps([c], 2)
    with pytest.raises(SERError, match="more often than expected"):
        b2_maps([c, c, c], 2, exact=True)
    with pytest.raises(SERError, match="even number of rows"):
        b2_maps([torch.randn(7, 4, 2, 2)], 2, concatenated=True)
    with pytest.raises(SERError, match="9 b2 views"):
        b2_maps([c, c], 9)
    with pytest.raises(SERError, match="5 b2 views"):
        b2_maps([c], 5, concatenated=True)
