"""Typed config trees from plain data: the one builder every config goes through.

A recipe (YAML plus dotted overrides) and a consolidated folder's config.json are both plain nested data. This
builder turns such data into a tree of dataclasses by calling each section's constructor, so each section's
`__post_init__` (its range and cross-field checks) always runs, and checks on the way what a constructor
cannot: unknown keys (named, with the nearest valid spelling), field types and `Literal` choices.

Every failure is one `ConfigError` line naming the key, the value and what is allowed. A section's own checks
raise `ValueError` naming the field; the builder prefixes the section's path (`model.vision: heads ...`).

It lives in model/ because it is the lowest room both of its callers see: recipes/ (the recipe tree) and
model/pretrained.py (a consolidated folder's model config).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value: one line naming the key, the value and what is allowed."""


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """The shape of every range check in a section's `__post_init__`: `require(x >= 1, "steps", x, "≥ 1")`."""
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def build(cls: type[T], raw: Any, path: str = "") -> T:
    """Build dataclass `cls` from `raw` (a mapping); `path` names the section in messages (e.g. "model")."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {_join(path, key)!r}{suggest(str(key), fields)}")
        kwargs[key] = _value(value, hints[key], _join(path, key))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        message = str(e)
        raise ConfigError(message if not path or message.startswith(path) else f"{path}: {message}") from None


def suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _value(value: Any, hint: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, name)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {' | '.join(map(str, args))}, got {value!r}"
                              f"{suggest(str(value), args)}")
        return value
    if origin in (typing.Union, types.UnionType):  # e.g. int | None: the first alternative that takes it
        for option in args:
            try:
                return _value(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{name} must have {len(args)} items, got {value!r}")
            return tuple(_value(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_value(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{name} must be null, got {value!r}")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise ConfigError(f"{name} must be {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
