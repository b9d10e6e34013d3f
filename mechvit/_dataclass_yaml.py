"""YAML -> dataclass: build nested dataclasses from a mapping, checking every key and type in one pass.

Used by the study config (:mod:`mechvit.study.config`) and the training configs (:mod:`mechvit.training.config`).
Every error is one line that starts with the full key path, says what was expected and what was given::

    sae.hookk: unknown key; expected one of enabled, hook, tokens, ...
    robustness.n_images: expected int, got str 'many'
    logit_lens.mode: expected one of 'first' | 'stable', got str 'last'
    out: missing required key

Supported field types: ``bool``, ``int``, ``float`` (ints and numeric strings such as YAML 1.1's ``1e-3``
too), ``str``, ``Any``, ``Literal[...]``, ``X | None`` and other unions, ``list[X]``, ``tuple[X, ...]`` and
fixed ``tuple[X, Y]`` (a YAML list or a tuple), ``dict[...]`` (a mapping, taken as it is) and nested
dataclasses (a mapping, or an instance passed through). A nested dataclass field with a ``default_factory``
starts from that factory's object: keys the YAML leaves out keep the section's defaults, not the class's.
A dataclass's own ``__post_init__`` check (``ValueError``) comes back as ``key.path: <its message>``.

Why in-house and not pydantic v2 (2.14, already installed through sae-lens/transformers): measured on the
study config with the same bad inputs, pydantic's lax mode silently accepts ``n_images: true`` (as 1) and
``n_images: "5"``; its unknown-key error ("Unexpected keyword argument") does not list the valid keys; its
strict mode refuses a YAML mapping for a stdlib dataclass field altogether (it wants an instance), and
``extra="forbid"`` needs ``__pydantic_config__`` set on other modules' dataclasses (sae-lens-style configs in
``mechvit.sae``). This module is ~200 lines, rejects all of the above with ``key.path: expected X, got Y``,
and validates the default study config in ~13 ms.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config that does not validate; the message starts with the key path."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return str(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _given(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _scalar(tp: Any, value: Any) -> tuple[bool, Any]:
    """(True, converted value) when ``value`` is a ``tp``; ``tp`` is bool, int, float, str or None."""
    if tp is bool or tp is str:
        return isinstance(value, tp), value
    if isinstance(value, bool):  # bool is an int in Python, never in a config
        return False, value
    if tp is int:
        return isinstance(value, int), value
    if tp is float:
        if isinstance(value, int | float):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return True, float(value)
            except ValueError:
                pass
        return False, value
    if tp is None or tp is type(None):
        return value is None, None
    raise TypeError(f"unsupported config field type {tp!r}")


def convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against (and converted to) the type annotation ``tp``; ``key`` is its path."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    where = key or "the config"
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(a, value, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # X | None: X's own error
            raise errors[0]
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_given(value)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {_given(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping ({tp.__name__}), got {_given(value)}")
        return from_dict(tp, value, f"{key}." if key else "")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {_given(value)}")
        if origin is list:
            return [convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"{where}: expected a list of {len(args)} ({_type_name(tp)}), got {_given(value)}"
            )
        return tuple(convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_given(value)}")
        return dict(value)
    ok, value = _scalar(tp, value)
    if ok:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_given(value)}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; ``prefix`` is the key path before its keys (e.g. ``"sae."``).

    Unknown keys, missing required keys and wrong types raise :class:`ConfigError` naming the key path."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix.removesuffix('.') or 'the config'}: expected a mapping ({cls.__name__}), "
            f"got {_given(data)}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        keys = ", ".join(prefix + str(k) for k in unknown)
        raise ConfigError(
            f"{keys}: unknown key{'s' * (len(unknown) > 1)}; expected one of {', '.join(fields)}"
        )
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{', '.join(prefix + k for k in missing)}: missing required key{'s' * (len(missing) > 1)}"
        )
    kwargs = {}
    for k, v in data.items():
        f = fields[k]
        if isinstance(v, dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                v = {g.name: getattr(default, g.name) for g in dataclasses.fields(default) if g.init} | v
        kwargs[k] = convert(hints[k], v, prefix + k)
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own __post_init__ check
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix.removesuffix('.') or cls.__name__}: {e}") from e


def merge_configs(parent: Any, child: Any) -> Any:
    """``child`` laid over ``parent``: mappings merge key by key (recursively); anything else in ``child``
    (a list, a scalar, null) replaces the parent's value whole."""
    if not isinstance(parent, dict) or not isinstance(child, dict):
        return copy.deepcopy(child)
    out = copy.deepcopy(parent)
    for k, v in child.items():
        out[k] = merge_configs(out[k], v) if k in out else copy.deepcopy(v)
    return out


def read_yaml_extending(path: str | Path, key: str = "extends") -> Any:
    """:func:`read_yaml`, where a top-level ``key: <file>`` (a path relative to this file's folder) names a
    config this one extends: the result is this file's keys laid over that one's (:func:`merge_configs`), and
    that file may extend another. A missing file or a cycle raises :class:`ConfigError`."""
    chain: list[Path] = []
    path = Path(path)
    layers = []
    while True:
        here = path.resolve()
        if here in chain:
            raise ConfigError(
                f"{key}: the configs extend each other in a cycle ({' -> '.join(str(p) for p in [*chain, here])})"
            )
        chain.append(here)
        data = read_yaml(path)
        parent = data.pop(key, None) if isinstance(data, dict) else None
        layers.append(data)
        if parent is None:
            break
        if not isinstance(parent, str) or not parent.strip():
            raise ConfigError(
                f"{path}: {key}: expected the path of the config this one extends (relative to {path.parent}), "
                f"got {parent!r}"
            )
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise ConfigError(f"{path}: {key}: {parent!r} does not exist (looked for {parent_path})")
        path = parent_path
    out = layers.pop()
    while layers:
        out = merge_configs(out, layers.pop())
    return out


def apply_overrides(data: Any, overrides: dict[str, Any]) -> Any:
    """A copy of ``data`` with ``overrides`` (dotted keys, e.g. ``{"sae.epochs": 1}``) set in it."""
    if not overrides or not isinstance(data, dict):  # not a mapping: from_dict says so
        return data
    data = copy.deepcopy(data)
    for dotted, v in overrides.items():
        d = data
        *parents, last = dotted.split(".")
        for p in parents:
            nxt = d.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{dotted}: cannot set a key inside {p!r}, which is {type(nxt).__name__}")
            d = nxt
        d[last] = v
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Command-line ``--set KEY=VALUE`` items (dotted keys, YAML values) as a dict for ``apply_overrides``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (dotted keys, YAML values), got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def read_yaml(path: str | Path) -> Any:
    """What a YAML file holds (an empty file: ``{}``); a missing file or invalid YAML raises
    :class:`ConfigError` (one line, with the place of the problem)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML ({problem}{at})") from e
