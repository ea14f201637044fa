"""``key=value`` overrides for nested dataclass configs, and a resolved, serialisable dump.

Values are parsed with ``ast.literal_eval`` (so ``lr=2e-4``, ``size=(256,704)``, ``name=foo`` all
work; a bare word that is not a Python literal is taken as a string) and checked against the field's
annotated type. Unknown keys and wrongly typed values raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

from bevnext.errors import ConfigError
from bevnext.io import to_jsonable

T = TypeVar("T")


def _parse_literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word, e.g. device=npu


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation`` and convert where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid {_type_name(annotation)}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {key!r}: expected None, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list):
        if isinstance(value, (tuple, list)):
            if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
                items = [_coerce(v, args[0], key) for v in value]
            elif origin is tuple and args:
                if len(args) != len(value):
                    raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {len(value)}")
                items = [_coerce(v, a, key) for v, a in zip(value, args)]
            else:
                items = [_coerce(v, args[0], key) if args else v for v in value]
            return tuple(items) if origin is tuple else list(items)
    elif isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise ConfigError(f"config key {key!r}: {value!r} is not a valid {_type_name(annotation)}")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of the dataclass ``cfg`` with dotted ``key=value`` overrides applied.

    Args:
        cfg: a (possibly nested, possibly frozen) dataclass instance.
        overrides: e.g. ``["train.lr=4e-4", "data.samples_per_gpu=2"]``.

    Raises:
        ConfigError: malformed item, unknown key (the message names the nearest valid key, or lists the
            valid keys at that level), or a value of the wrong type.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            cfg = _set(cfg, key, _parse_literal(text.strip()), key)
        except _UnknownKey as err:
            close = difflib.get_close_matches(key, leaf_keys(cfg), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {', '.join(err.valid)}"
            raise ConfigError(f"unknown config key {key!r}{hint}") from None
    return cfg


class _UnknownKey(Exception):
    def __init__(self, valid: list[str]) -> None:
        super().__init__()
        self.valid = valid


def leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of the dataclass ``cfg`` (nested sections flattened: ``train.lr``)."""
    keys: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(leaf_keys(value, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def _set(obj: Any, dotted: str, value: Any, full_key: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"config key {full_key!r}: cannot descend into a {type(obj).__name__}")
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if head not in fields:
        raise _UnknownKey(sorted(fields))
    hints = typing.get_type_hints(type(obj))
    if rest:
        new_child = _set(getattr(obj, head), rest, value, full_key)
    else:
        if dataclasses.is_dataclass(getattr(obj, head)):
            raise ConfigError(f"config key {full_key!r} is a section; set one of its keys instead")
        new_child = _coerce(value, hints[head], full_key)
    return dataclasses.replace(obj, **{head: new_child})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable nested dict of a dataclass config (tuples become lists)."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return to_jsonable(dataclasses.asdict(cfg))
