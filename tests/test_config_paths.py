"""Every entry point resolves the configuration the same way.

attach_ser, SERCallback, SERLoss, the generated ``--ser-*`` flags and the Hydra/OmegaConf node are walked with the
same (base, preset, overrides) triple; each must give the same SERConfig as :func:`ser_plugin.resolve_config`, or
raise the same SERError message. Valid and invalid triples (unknown option, unknown preset, bad value, a pairing
the D4 parts cannot draw, a base that is not a config).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Optional

import pytest
from conftest import tiny_timm

from ser_plugin import SERConfig, SERError, SERLoss, attach_ser, resolve_config
from ser_plugin.integrations import add_ser_args, config_from_args, config_from_structured

omegaconf = pytest.importorskip("omegaconf", reason="omegaconf is not installed (pip install omegaconf); the structured entry point needs it")
lightning_mod = pytest.importorskip("ser_plugin.integrations.lightning", reason="lightning is not installed (pip install lightning)")

TRIPLES = [
    pytest.param(None, None, {"layer": 2}, id="defaults"),
    pytest.param(SERConfig(layer=2, lam=0.5), "authors", {"tau": 0.3}, id="config+authors+tau"),
    pytest.param("dino", "authors", {"layer": -2, "head": False, "scale": None}, id="recipe+preset+overrides"),
    pytest.param("mocov3", None, {"layer": 2, "scale": (0.8, 1.2), "photometric": None, "lam": 0.0, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2)}, id="recipe+tuples+none"),
    pytest.param(SERConfig(layer=3, head=True), "mocov3", {"rotations": False, "pairing": "no_identity", "max_negatives": 64}, id="preset-over-config"),
    pytest.param(None, None, {"layer": 2, "lamb": 1.0}, id="unknown-option"),
    pytest.param(None, "paper", {"layer": 2}, id="unknown-preset"),
    pytest.param(SERConfig(layer=2), None, {"tau": 0.0}, id="bad-value"),
    pytest.param(None, "authors", {"layer": 2, "rotations": False}, id="pairing-needs-rotations"),
    pytest.param({"lam": 1.0}, None, {"layer": 2}, id="base-not-a-config"),
    pytest.param(None, None, {"lam": 0.5}, id="no-layer"),
]


def _attach(base: Any, preset: Optional[str], over: Dict[str, Any]) -> SERConfig:
    ser = attach_ser(tiny_timm(dynamic_img_size=True), config=base, **({"preset": preset} if preset else {}), **over)
    try:
        return ser.config
    finally:
        ser.remove()


def _callback(base: Any, preset: Optional[str], over: Dict[str, Any]) -> SERConfig:
    return lightning_mod.SERCallback(config=base, **({"preset": preset} if preset else {}), **over).config


def _loss(base: Any, preset: Optional[str], over: Dict[str, Any]) -> SERConfig:
    return SERLoss(base, dim=32, preset=preset, **over).config


def _flag_values(name: str, value: Any) -> list:
    flag = "--ser-" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-ser-" + name.replace("_", "-")]
    if value is None:
        return [flag, "none"]
    if isinstance(value, tuple):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def _argparse(base: Any, preset: Optional[str], over: Dict[str, Any]) -> SERConfig:
    parser = argparse.ArgumentParser()
    add_ser_args(parser, base=base)
    argv = ["--ser-preset", preset] if preset else []
    unknown = {}
    for k, v in over.items():
        if k in SERConfig.field_names():
            argv += _flag_values(k, v)
        else:  # a name with no flag: only the mapping form of the parsed arguments can carry it
            unknown["ser_" + k] = v
    values = {**vars(parser.parse_args(argv)), **unknown}
    return config_from_args(values, base)


def _structured(base: Any, preset: Optional[str], over: Dict[str, Any]) -> SERConfig:
    node = omegaconf.OmegaConf.create({**({"preset": preset} if preset else {}), **{k: list(v) if isinstance(v, tuple) else v for k, v in over.items()}})
    return config_from_structured(node, base)


ENTRY_POINTS: Dict[str, Callable[[Any, Optional[str], Dict[str, Any]], SERConfig]] = {
    "attach_ser": _attach,
    "SERCallback": _callback,
    "SERLoss": _loss,
    "add_ser_args/config_from_args": _argparse,
    "SERStructuredConfig/config_from_structured": _structured,
}
NEEDS_LAYER = ("attach_ser", "SERCallback")  # the entry points that hook a model


def _outcome(fn: Callable[[], SERConfig]) -> Any:
    try:
        return fn()
    except SERError as err:
        return ("SERError", str(err))


@pytest.mark.parametrize("base, preset, over", TRIPLES)
def test_every_entry_point_resolves_alike(base: Any, preset: Optional[str], over: Dict[str, Any]) -> None:
    expected = _outcome(lambda: resolve_config(base, preset, over))
    expected_hooked = _outcome(lambda: resolve_config(base, preset, over, require_layer=True))
    got = {name: _outcome(lambda f=f: f(base, preset, over)) for name, f in ENTRY_POINTS.items()}
    for name, out in got.items():
        want = expected_hooked if name in NEEDS_LAYER else expected
        assert out == want, f"{name} resolved ({base!r}, {preset!r}, {over!r}) to\n  {out}\nbut resolve_config gives\n  {want}"
    assert isinstance(expected, SERConfig) or expected[0] == "SERError"


def test_precedence_is_base_then_preset_then_overrides() -> None:
    """The one rule, on values where every step changes the result."""
    cfg = resolve_config("dino", "authors", {"scale_frame": "view2"}, layer=2)
    assert (cfg.layer, cfg.lam, cfg.tau) == (2, 0.3, 0.5)  # the recipe, then the positional layer
    assert (cfg.pairing, cfg.head, cfg.late_cls) == ("authors", True, True)  # the preset on top of the recipe
    assert cfg.scale_frame == "view2"  # the override on top of the preset
    assert resolve_config(SERConfig(layer=4, pairing="no_identity"), "authors").pairing == "authors"


def test_components_built_from_a_config_do_not_validate_again(monkeypatch) -> None:
    """The allowed values and their checks live in ser_plugin.allowed; SERConfig runs them once. A handle or loss built
    from a config reuses the validated values: with every check made to fail afterwards, they still build."""
    from ser_plugin import allowed

    cfg = SERConfig(layer=2, pairing="no_identity", scale=(0.8, 1.2), tau=0.3, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    vit = tiny_timm(dynamic_img_size=True)

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("validated again")

    for name in [n for n in dir(allowed) if n.startswith("check_")]:
        monkeypatch.setattr(allowed, name, refuse)
    ser = attach_ser(vit, config=cfg)
    assert ser.view_policy.pairing == "no_identity" and ser.criterion.tau == 0.3
    assert SERLoss(cfg).criterion.tau == 0.3
    ser.remove()
    with pytest.raises(AssertionError, match="validated again"):  # by hand, the components check their arguments
        from ser_plugin import EquivariantViews

        EquivariantViews(patch_size=8, pairing="no_identity")


def test_layer_resolved_once_and_one_late_cls_rule() -> None:
    """The layer is resolved into the model description once (a negative layer counted from the end); the late-[CLS]
    last-block rule gives one message whether it comes from attach_ser or convert_late_cls."""
    from ser_plugin import convert_late_cls

    vit = tiny_timm()
    ser = attach_ser(vit, -2)
    assert ser.vit.layer == ser.layer == 3 and ser.vit.depth == 4
    ser.remove()
    with pytest.raises(SERError) as from_attach:
        attach_ser(vit, 4, late_cls=True)
    with pytest.raises(SERError) as from_convert:
        convert_late_cls(vit, -1)
    assert str(from_attach.value) == str(from_convert.value) and "last block of 4" in str(from_attach.value)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in vit.modules())  # nothing left behind
