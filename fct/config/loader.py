"""Strict conversion of YAML mappings into frozen dataclasses.

Rules: an unknown key fails naming the key, the file and the closest valid keys; a value of the
wrong type fails; a missing required key fails. Integers are accepted where a float is expected
(YAML writes ``lr: 1`` as an int), never the reverse, and bools are never numbers.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from fct.errors import ConfigError

T = TypeVar("T")
_MISSING = object()


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; user errors become ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping, returning a copy."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optimizer_params.lr=0.1")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check ``value`` against type ``tp`` and convert (nested dataclasses, lists, float from int)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if isinstance(value, dict):
            # A mapping can only be meant for the dataclass member: report its own error
            # (e.g. an unknown key inside an optional section), not a generic type mismatch.
            for arg in get_args(tp):
                if dataclasses.is_dataclass(arg):
                    return _convert(value, arg, where, source)
        errors = []
        for arg in get_args(tp):
            try:
                return _convert(value, arg, where, source)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(
            f"{source}: {where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: {where} must be one of {_type_name(tp)}, got {value!r}{hint}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{source}: {where} must be null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{source}: {where} must be a mapping of keys, got {value!r} ({type(value).__name__})"
            )
        return from_dict(tp, value, source=source, prefix=where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where} must be {_type_name(tp)}, got {value!r}")
        (arg,) = get_args(tp)[:1] or (Any,)
        return tuple(_convert(v, arg, f"{where}[{i}]", source) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(
        f"{source}: {where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly.

    A dataclass may declare ``_aliases: ClassVar[dict[str, str]]`` (alternative spelling -> field)
    for keys the reference schema spells differently; giving both spellings with different values fails.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    aliases: dict[str, str] = getattr(cls, "_aliases", {})
    data = dict(data)
    for alias, name in aliases.items():
        if alias in data:
            v = data.pop(alias)
            if name in data and data[name] != v:
                raise ConfigError(
                    f"{source}: {_join(prefix, alias)}={v!r} disagrees with "
                    f"{_join(prefix, name)}={data[name]!r}; give one of them"
                )
            data[name] = v
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        valid = sorted(fields) + sorted(aliases)
        close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(
            f"{source}: unknown key {_join(prefix, str(key))!r}{hint}; valid keys"
            f"{' in ' + prefix if prefix else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        where = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], where, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {where!r}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if str(e).startswith(source):
            raise
        raise ConfigError(f"{source}: {e}") from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML-able mapping (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def load_config(cls: type[T], path: str | os.PathLike, overrides: list[str] | None = None) -> T:
    """Load ``path`` (YAML) with ``--set`` overrides into dataclass ``cls``."""
    data = load_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{path} (with --set overrides)"
    else:
        source = str(path)
    return from_dict(cls, data, source=source)
