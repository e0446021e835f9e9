"""YAML <-> `Config`: load a recipe with `key.sub=value` overrides, coerce and check every value's
type against the dataclass field, and dump or save the resolved config.

Loading is strict: an unknown key (with a "did you mean"), a value of the wrong type, a float
that is nan or inf, or a value outside its choices raises `ConfigError` naming the dotted key,
the value and what is allowed; the sections' own checks then run on construction (config.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rpg_megatron.config import Config, ConfigError


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load` without YAML 1.1's base-60 numbers (YAML 1.2 dropped them): an unquoted
    Slurm time `30:00` stays the text "30:00" instead of becoming the integer 1800."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, re.compile(r"(?!.*:)" + rx.pattern, rx.flags) if tag in _NUMBER_TAGS else rx)
        for tag, rx in resolvers
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """YAML file (optional) + `a.b=value` overrides -> validated `Config`.

    Each override value is parsed as YAML (as the file is, without base-60 numbers), so `true`,
    `1e-6`, `null`, `30:00` and `[0.2, 0.28]` mean what they look like.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.load(Path(path).read_text(), Loader=_Loader)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data = loaded or {}
    for item in overrides:
        apply_override(data, item)
    return from_dict(Config, data, source=source)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict, creating intermediate mappings."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, data: Any, *, source: str = "<dict>", prefix: str = "") -> Any:
    """Strictly build dataclass `cls` from nested dicts; errors name the dotted key."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{source}: unknown key {prefix}{key}{hint} (valid keys in {where}: {', '.join(names)})"
        )
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}", source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against annotation `tp` and convert YAML lists to tuples where needed."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"{source}: {key}={value!r}: expected {_describe(tp)}"
        )
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: {key}={value!r}: must be one of {choices}")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key}={value!r}: expected a list")
        return tuple(_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{source}: {key}={value!r}: expected a list of {len(args)} values")
        return tuple(
            _coerce(a, v, f"{key}[{i}]", source)
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}={value!r}: expected a list")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}={value!r}: expected a mapping")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{source}: {key}: key {k!r} is not a string")
            if args[1] is str and isinstance(v, int | float) and not isinstance(v, bool):
                v = str(v)  # launch.env: `NCCL_IB_TIMEOUT: 22` means the text "22"
            out[k] = _coerce(args[1], v, f"{key}.{k}", source)
        return out
    if tp is float and isinstance(value, int | str) and not isinstance(value, bool):
        # PyYAML (YAML 1.1) reads `1e-6` without a dot as a string; accept what float() reads.
        with contextlib.suppress(ValueError, OverflowError):
            value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {key}={value!r}: must be a finite number, not nan or inf")
    if tp is str and isinstance(value, int | float):  # bool is an int too
        text = '"..."' if isinstance(value, bool) else f'"{value}"'
        raise ConfigError(
            f"{source}: {key}={value!r}: expected str, got {type(value).__name__}; YAML reads an "
            f"unquoted number or true/false as one, so quote the text: {key.rsplit('.', 1)[-1]}: "
            f"{text} in a file, '{key}={text}' as an override"
        )
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(
            f"{source}: {key}={value!r}: expected {tp.__name__}, got {type(value).__name__}"
        )
    return value


def _describe(tp: Any) -> str:
    args = typing.get_args(tp)
    parts = []
    for a in args:
        if a is type(None):
            parts.append("null")
        elif typing.get_origin(a) is Literal:
            parts.append(" | ".join(repr(x) for x in typing.get_args(a)))
        else:
            parts.append(getattr(a, "__name__", str(a)))
    return " or ".join(parts)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain nested dict (tuples become lists) for YAML."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp sibling, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_yaml(cfg))
    tmp.replace(path)
