"""One configuration for every launcher: :class:`~ser_plugin.SERConfig` as argparse flags and as a structured
config for Hydra/OmegaConf, plus the per-host recipes.

Every option has the same name everywhere: the :class:`~ser_plugin.SERConfig` field ``lam`` is
``attach_ser(..., lam=)``, ``SERCallback(lam=)``, the flag ``--ser-lam`` (MoCo-v3, DINO, DINOv2 launchers) and
``ser.lam`` in a Hydra/OmegaConf config (``++ser.lam=0.5`` on solo-learn's command line). The flags and the
structured config are generated from the dataclass, so a new field appears in both without editing this file.

Precedence, in every launcher and every other entry point (:func:`~ser_plugin.config.resolve_config`): the host's
recipe (:data:`HOST_RECIPES`, the recipe entries of the one registry :data:`~ser_plugin.PRESETS`), then ``preset``
if given, then each option given explicitly; the errors are the same as ``attach_ser``'s.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> _ = add_ser_args(parser, base=recipe("dino"))
    >>> cfg = config_from_args(parser.parse_args(["--ser-lam", "0.5", "--ser-head"]), base=recipe("dino"))
    >>> (cfg.layer, cfg.lam, cfg.tau, cfg.head)
    (3, 0.5, 0.5, True)
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from ..config import HOST_RECIPES, PRESETS, SERConfig, resolve_config
from ..errors import SERError

__all__ = [
    "HOST_RECIPES",
    "recipe",
    "add_ser_args",
    "config_from_args",
    "SERStructuredConfig",
    "structured",
    "config_from_structured",
]

def recipe(name: Optional[str] = None, **overrides: Any) -> SERConfig:
    """The :class:`~ser_plugin.SERConfig` of an objective's recipe (``None``: the library defaults).

    Args:
        name: a key of :data:`HOST_RECIPES` (``"mocov3"``, ``"dino"``, ``"barlow_twins"``; any name of the
            one registry :data:`~ser_plugin.PRESETS` works) or ``None``.
        **overrides: fields applied on top.

    Returns:
        A validated SERConfig (:func:`~ser_plugin.config.resolve_config` with ``base=name``).

    Raises:
        SERError: an unknown recipe or option.
    """
    return resolve_config(name, None, overrides)


# ---------------------------------------------------------------------------------------------------- types
def _hints() -> Dict[str, Any]:
    return typing.get_type_hints(SERConfig)


def _kind(name: str, tp: Any) -> str:
    """Coarse kind of a SERConfig field's type, for flags and the structured config."""
    if name == "gather":
        return "gather"
    if name == "photometric":
        return "photometric"
    if name == "head":
        return "bool"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        kind = _kind(name, inner[0]) if len(inner) == 1 else "any"
        return "opt_" + kind
    if tp is bool:
        return "bool"
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if tp is str:
        return "str"
    if origin in (tuple, Tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return "floats"
        if len(args) == 2 and all(a is int for a in args):
            return "int_pair"
        if len(args) == 2 and all(a is float for a in args):
            return "float_pair"
    return "any"


def _docs() -> Dict[str, str]:
    """``name -> one-line help`` from the Attributes section of SERConfig's docstring."""
    doc = SERConfig.__doc__ or ""
    out: Dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        m = re.match(r"^\s{8}(\w+): (.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and re.match(r"^\s{12}\S", line):
            out[current] += " " + line.strip()
        elif line.strip() == "" or re.match(r"^\s{4}\S", line):
            current = None
    return {k: v.replace("``", "").replace("%", "%%") for k, v in out.items()}


def _flag(name: str) -> str:
    return "--ser-" + name.replace("_", "-")


def _dest(name: str) -> str:
    return "ser_" + name


def _optional(conv: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _gather(text: str) -> Union[str, bool]:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    return text


def _photometric(text: str) -> Optional[str]:
    return None if text.lower() in ("none", "null", "off") else text


# ---------------------------------------------------------------------------------------------------- argparse
def add_ser_args(
    parser: argparse.ArgumentParser,
    *,
    base: Union[None, str, SERConfig] = None,
    exclude: Iterable[str] = (),
    title: str = "SER (soft equivariance regularization; docs/method.md)",
) -> argparse._ArgumentGroup:
    """Adds one ``--ser-<field>`` flag per :class:`~ser_plugin.SERConfig` field (``_`` → ``-``) and ``--ser-preset``.

    Flags that are not given leave the field to ``base`` (the launcher's recipe), so
    :func:`config_from_args` can apply ``recipe → preset → explicit flags`` in that order. Booleans get
    ``--ser-<field>`` / ``--no-ser-<field>``; pairs take two numbers (``--ser-scale 0.7 1.3``); ``none`` sets an
    optional field to ``None``. Options that only Python can give (a custom head module, photometric
    callables) are not flags.

    Args:
        parser: the host's parser (MoCo-v3's ``main_moco.parser``, DINO's ``get_args_parser()``, ...).
        base: the defaults shown in ``--help`` (the launcher's recipe); ``SERConfig()`` when ``None``.
        exclude: field names to leave out.
        title: the argument group's title.

    Returns:
        The argument group.
    """
    base = resolve_config(base)
    hints, docs, skip = _hints(), _docs(), set(exclude)
    group = parser.add_argument_group(title)
    group.add_argument(
        "--ser-preset", dest="ser_preset", default=argparse.SUPPRESS, metavar="{" + ",".join(sorted(PRESETS)) + "}",
        help="a named preset applied on top of the recipe, below explicit flags (authors: the SER authors' choices).",
    )
    for f in dataclasses.fields(SERConfig):
        if f.name in skip or f.name.startswith("_"):
            continue
        kind = _kind(f.name, hints[f.name])
        default = getattr(base, f.name)
        shown = "none" if default is None else (" ".join(str(v) for v in default) if isinstance(default, tuple) else default)
        help_text = f"{docs.get(f.name, f.name)} (default: {shown})"
        kw: Dict[str, Any] = dict(dest=_dest(f.name), default=argparse.SUPPRESS, help=help_text)
        flag = _flag(f.name)
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind in ("int", "float", "str"):
            group.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], **kw)
        elif kind in ("opt_int", "opt_float", "opt_str"):
            group.add_argument(flag, type=_optional({"opt_int": int, "opt_float": float, "opt_str": str}[kind]), **kw)
        elif kind in ("int_pair", "float_pair"):
            group.add_argument(flag, type=int if kind == "int_pair" else float, nargs=2, metavar=("LO", "HI") if kind == "float_pair" else ("A", "B"), **kw)
        elif kind == "opt_float_pair":
            group.add_argument(flag, type=_optional(float), nargs="+", metavar="X", **kw)
        elif kind == "opt_floats":
            group.add_argument(flag, type=_optional(float), nargs="+", metavar="X", **kw)
        elif kind == "gather":
            group.add_argument(flag, type=_gather, metavar="{auto,true,false}", **kw)
        elif kind == "photometric":
            group.add_argument(flag, type=_photometric, metavar="{mocov3,authors,none}", **kw)
        else:  # pragma: no cover - a new field type: fail loudly so that the generator is extended
            raise SERError(f"add_ser_args cannot express SERConfig.{f.name} ({hints[f.name]}) as a flag; extend ser_plugin.integrations.options.")
    return group


def _from_cli_value(value: Any) -> Any:
    if isinstance(value, list):
        if any(v is None for v in value):
            if len(value) == 1:
                return None
            raise SERError(f"'none' cannot be mixed with numbers in a SER flag, got {value}.")
        return tuple(value)
    return value


def config_from_args(args: Union[argparse.Namespace, Mapping[str, Any]], base: Union[None, str, SERConfig] = None) -> SERConfig:
    """The :class:`~ser_plugin.SERConfig` of a parsed command line: ``base`` → ``--ser-preset`` → the flags given
    (:func:`~ser_plugin.config.resolve_config`; a ``ser_*`` entry that names no field is refused like a typo).

    Args:
        args: the namespace from a parser with :func:`add_ser_args` flags (or a mapping of its ``ser_*`` entries).
        base: the launcher's recipe (a SERConfig or a name in :data:`~ser_plugin.PRESETS`); ``SERConfig()`` when ``None``.

    Returns:
        A validated SERConfig.

    Raises:
        SERError: an unknown option or preset, a bad value (the message names the field, the value and what is allowed).
    """
    values = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    given = {k[len("ser_"):]: _from_cli_value(v) for k, v in values.items() if k.startswith("ser_") and k != "ser_preset"}
    return resolve_config(base, values.get("ser_preset"), given)


# ---------------------------------------------------------------------------------------------------- OmegaConf
def _structured_type(kind: str, tp: Any) -> Any:
    return {
        "bool": bool,
        "int": int,
        "float": float,
        "str": str,
        "opt_int": Optional[int],
        "opt_float": Optional[float],
        "opt_str": Optional[str],
        "int_pair": List[int],
        "float_pair": List[float],
        "opt_float_pair": Optional[List[float]],
        "opt_floats": Optional[List[float]],
        "gather": Union[str, bool],
        "photometric": Optional[str],
    }.get(kind, Any)


def _structured_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if not isinstance(value, (bool, int, float, str, type(None), list)):
        return None  # a module or callables: not expressible in a config file
    return value


def _make_structured() -> type:
    hints = _hints()
    base = SERConfig()
    spec: List[Tuple[str, Any, Any]] = [("preset", Optional[str], dataclasses.field(default=None))]
    for f in dataclasses.fields(SERConfig):
        if f.name.startswith("_"):
            continue
        kind = _kind(f.name, hints[f.name])
        default = _structured_default(getattr(base, f.name))
        field = dataclasses.field(default_factory=lambda d=default: list(d)) if isinstance(default, list) else dataclasses.field(default=default)
        spec.append((f.name, _structured_type(kind, hints[f.name]), field))
    cls = dataclasses.make_dataclass(
        "SERStructuredConfig", spec, namespace={"__doc__": (
            "SERConfig as an OmegaConf/Hydra structured config (generated from SERConfig: same names and defaults).\n\n"
            "Register it under ``ser`` (``ConfigStore.instance().store(group=..., name='ser', node=SERStructuredConfig)``) or\n"
            "merge a ``ser:`` node against it with :func:`config_from_structured`; ``preset`` names a SERConfig preset.\n"
        )},
    )
    cls.__module__ = __name__
    return cls


#: SERConfig as a dataclass that OmegaConf accepts as a structured config (lists for tuples, no module types)
SERStructuredConfig = _make_structured()


def structured(base: Optional[SERConfig] = None) -> Any:
    """A :data:`SERStructuredConfig` instance holding ``base``'s values (for ``OmegaConf.structured``).

    Args:
        base: the values; ``SERConfig()`` when ``None``.

    Returns:
        A SERStructuredConfig instance.
    """
    base = base if base is not None else SERConfig()
    return SERStructuredConfig(**{f.name: _structured_default(getattr(base, f.name)) for f in dataclasses.fields(SERConfig) if not f.name.startswith("_")})


def config_from_structured(node: Any, base: Union[None, str, SERConfig] = None) -> SERConfig:
    """The :class:`~ser_plugin.SERConfig` of a ``ser:`` config node: ``base`` → ``preset`` → the keys the node sets.

    Unknown keys and bad values get the same :class:`~ser_plugin.SERError` as every other entry point
    (:func:`~ser_plugin.config.resolve_config`); a node composed by Hydra against :data:`SERStructuredConfig`
    has its types checked by Hydra first.

    Args:
        node: a DictConfig / dict (e.g. solo-learn's ``cfg.ser``); ``None`` or empty for just ``base``.
        base: the launcher's recipe (a SERConfig or a name in :data:`~ser_plugin.PRESETS`); ``SERConfig()`` when ``None``.

    Returns:
        A validated SERConfig.

    Raises:
        SERError: an unknown key or a bad value.
    """
    if node is None:
        return resolve_config(base)
    try:
        from omegaconf import OmegaConf
    except ImportError:  # plain dicts work without OmegaConf
        raw = dict(node)
    else:
        raw = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    preset = raw.pop("preset", None)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return resolve_config(base, preset, given)
