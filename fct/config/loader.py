"""Strict conversion of YAML mappings into frozen dataclasses.

Rules: an unknown key fails naming the key, the file and the closest valid keys; a value of the
wrong type fails; a missing required key fails. A float field takes an int (YAML writes ``lr: 1``
as an int) or a string that ``float()`` parses (YAML 1.1 reads ``lr: 1e-3`` as a string), and must
be finite: no config float means anything sensible at inf or nan. An int field takes only ints
(``1e3`` or ``"3"`` stay refused), and bools are never numbers. A key written twice in one YAML
mapping fails naming both lines (PyYAML would keep the last one silently).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from fct.errors import ConfigError

T = TypeVar("T")
_MISSING = object()


class DuplicateKeyError(yaml.YAMLError):
    """One YAML mapping writes a key twice: ``first`` and ``second`` are (text, 1-based line)."""

    def __init__(self, first: tuple[str, int], second: tuple[str, int]) -> None:
        (a, line_a), (b, line_b) = first, second
        what = f"key {b!r} is written twice" if a == b else f"key {b!r} is the same key as {a!r}"
        super().__init__(f"{what} (lines {line_a} and {line_b})")
        self.first, self.second = first, second


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping, at any depth.

    Plain SafeLoader keeps the last value silently, so a forgotten earlier line would win or lose
    without a word. Keys brought in by a ``<<`` merge may still be overridden (that is its purpose).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, tuple[str, int]] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                here = (str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else str(key),
                        key_node.start_mark.line + 1)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: the base class reports it with its position
                    continue
                if first is not None:
                    raise DuplicateKeyError(first, here)
                seen[key] = here
        return super().construct_mapping(node, deep=deep)


def _yaml_error_line(e: yaml.YAMLError) -> str:
    """One line for a YAML error, with the 1-based line and column PyYAML marked."""
    if isinstance(e, DuplicateKeyError):
        return str(e)
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        m = e.problem_mark
        msg = f"not valid YAML at line {m.line + 1}, column {m.column + 1}: {e.problem}"
        if e.context and e.context_mark is not None:
            c = e.context_mark
            msg += f" ({e.context} at line {c.line + 1}, column {c.column + 1})"
        return msg
    lines = str(e).splitlines()
    return f"not valid YAML: {lines[0] if lines else type(e).__name__}"


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; user errors become ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {_yaml_error_line(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping, returning a copy.

    ``lr=1e-3`` arrives as the string '1e-3' and ``lr=.inf`` as inf: from_dict's float rule
    (numeric strings accepted, non-finite refused) covers both.
    """
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


class _NotFinite(ConfigError):
    """A float field given inf or nan: reported as such even from inside an Optional."""


def _as_float(value: Any) -> float | None:
    """``value`` as a float (maybe non-finite), or None when it is not a number.

    Ints and strings ``float()`` parses count (YAML 1.1 reads ``1e-3`` as a string); bools do not.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int too large for a float
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check ``value`` against type ``tp`` and convert (nested dataclasses, lists, float from int or
    numeric string; a non-finite float is refused)."""
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
        for arg in get_args(tp):
            try:
                return _convert(value, arg, where, source)
            except _NotFinite:
                raise
            except ConfigError:
                pass
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
        number = _as_float(value)
        if number is not None:
            if not math.isfinite(number):
                raise _NotFinite(f"{source}: {where} must be a finite number, got {number}")
            return number
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
