"""Name -> builder registries that map YAML config sections onto Python objects.

A config section such as ``learner: {kind: maml, inner_lr: 0.4}`` is built by calling the
builder registered as ``("learner", "maml")`` with the remaining keys as keyword arguments.
The builder's signature IS the schema (or, for a builder registered with ``options=``, that
dataclass's fields): an unknown key, a missing required key or a value of the wrong type
raises :class:`~metattn.errors.ConfigError` naming the key and the fix.

This module is the mechanism only: the built-in kinds register themselves when
:mod:`metattn.builders` is imported (:mod:`metattn.config` does).

Builders per group:

* ``task``: ``f(split: str, **options) -> TaskSampler`` (``split`` is "train" or "test").
* ``model``: ``f(**options) -> nn.Module``.
* ``learner``: ``f(model, **options) -> Learner``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from metattn.errors import ConfigError

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {"task": {}, "model": {}, "learner": {}}
# Positional arguments the recipe supplies itself, not the config.
_SUPPLIED = {"task": ("split",), "model": (), "learner": ("model",)}


def register(group: str, name: str, options: type | None = None
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as the builder of ``kind: name`` in ``group``. ``options``: a
    dataclass whose fields are the section's keys (``fn`` then takes them as ``**options``);
    fields with ``metadata={"config": False}`` are left out."""
    if group not in _REGISTRY:
        raise ValueError(f"unknown registry group {group!r}; choose from {sorted(_REGISTRY)}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if options is not None:
            fn.__options__ = options  # type: ignore[attr-defined]
        _REGISTRY[group][name] = fn
        return fn

    return deco


def kinds(group: str) -> list[str]:
    """Registered names of a group."""
    return sorted(_REGISTRY[group])


def get_builder(group: str, kind: str) -> Callable[..., Any]:
    """The builder for ``kind`` in ``group``, or a ConfigError suggesting the nearest name."""
    table = _REGISTRY[group]
    if not isinstance(kind, str):
        raise ConfigError(f"{group}.kind: got {kind!r}; give one name from {sorted(table)}")
    if kind not in table:
        close = difflib.get_close_matches(str(kind), list(table), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"{group}.kind: unknown value {kind!r}; {hint}choose one of {sorted(table)}"
        )
    return table[kind]


# how a plain type reads in an error (an annotation, or the type of a value from YAML)
_READABLE = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a mapping", type(None): "null"}


def ann_name(ann: Any) -> str:
    """An annotation as a user reads it: ``int``, ``a list of str``, ``one of 'adam', 'sgd'``,
    ``a number or null``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        names = [ann_name(a) for a in args if a is not type(None)]
        text = " or ".join(names)
        return f"{text} or null" if type(None) in args else text
    if origin is typing.Literal:
        shown = [repr(a) if isinstance(a, str) else str(a).lower() for a in args]
        return shown[0] if len(shown) == 1 else "one of " + ", ".join(shown)
    plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false"}
    if origin in (list, tuple, typing.Sequence) or ann in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return f"a list of {plural.get(inner[0], ann_name(inner[0]))}" if inner else "a list"
    if origin is dict or ann is dict:
        if len(args) == 2:
            k, v = (plural.get(a, ann_name(a)) for a in args)
            return f"a mapping of {k} to {v}"
        return "a mapping"
    if ann in _READABLE:
        return _READABLE[ann]
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")


def choices(ann: Any) -> list[Any]:
    """The values a Literal annotation allows (inside a union too); [] for other types."""
    if typing.get_origin(ann) is typing.Literal:
        return list(typing.get_args(ann))
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return [c for a in typing.get_args(ann) for c in choices(a)]
    return []


def type_error(where: str, value: Any, ann: Any) -> ConfigError:
    """``where: got VALUE (TYPE), expected ...; did you mean ...?`` for a value of the wrong
    type or outside its choices."""
    options = [c for c in choices(ann) if isinstance(c, str)]
    close = difflib.get_close_matches(value, options, n=1) if isinstance(value, str) else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    kind = _READABLE.get(type(value), type(value).__name__)
    return ConfigError(f"{where}: got {value!r} ({kind}), expected {ann_name(ann)}; {hint}fix "
                       "the value in the YAML or with --set")


def type_ok(value: Any, ann: Any) -> bool:
    """Whether ``value`` (parsed YAML) fits the annotation ``ann``."""
    if ann is inspect.Parameter.empty or ann is Any:
        return True
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(ann))
    if ann is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if origin in (list, tuple, typing.Sequence) or ann in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        if origin is tuple and len(args) > 1:  # tuple[int, str]: one type per position
            return len(value) == len(args) and all(map(type_ok, value, args))
        return not args or all(type_ok(v, args[0]) for v in value)
    if origin is dict or ann is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(ann)
        return len(args) != 2 or all(type_ok(k, args[0]) and type_ok(v, args[1])
                                     for k, v in value.items())
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True


REQUIRED = inspect.Parameter.empty  # the default of a key that has none


def schema(group: str, kind: str) -> tuple[dict[str, tuple[Any, Any]], bool]:
    """A kind's config keys as ``{key: (annotation, default or REQUIRED)}``, and whether it
    takes other keys too (a ``**kwargs`` builder without an options dataclass)."""
    fn = get_builder(group, kind)
    options = getattr(fn, "__options__", None)
    if options is not None:
        hints = typing.get_type_hints(options)
        return {f.name: (hints[f.name], f.default if f.default is not dataclasses.MISSING
                         else REQUIRED)
                for f in dataclasses.fields(options) if f.metadata.get("config", True)}, False
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # pragma: no cover - unresolvable annotations: skip type checks
        hints = {}
    params = {n: p for n, p in inspect.signature(fn).parameters.items()
              if n not in _SUPPLIED[group]}
    keys = {n: (hints.get(n, p.annotation), p.default) for n, p in params.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return keys, any(p.kind is p.VAR_KEYWORD for p in params.values())


def defaults(group: str, kind: str) -> dict[str, Any]:
    """A kind's options that have defaults, as plain YAML values (tuples as lists)."""
    keys, _ = schema(group, kind)
    return {k: list(d) if isinstance(d, tuple) else d for k, (_, d) in keys.items()
            if d is not REQUIRED}


def check_options(group: str, kind: str, options: dict[str, Any]) -> None:
    """Validate ``options`` against the kind's schema; raise ConfigError on a problem."""
    keys, open_ended = schema(group, kind)
    for key, value in options.items():
        if key not in keys:
            if open_ended:
                continue
            close = difflib.get_close_matches(key, list(keys), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{group}.{key}: unknown key for {group}.kind={kind!r}; {hint}"
                f"valid keys: {sorted(keys)}"
            )
        ann = keys[key][0]
        if not type_ok(value, ann):
            raise type_error(f"{group}.{key}", value, ann)
    for n, (_, default) in keys.items():
        if default is REQUIRED and n not in options:
            raise ConfigError(f"{group}.{n}: required by {group}.kind={kind!r} but missing")


def build(group: str, spec: dict[str, Any], *supplied: Any) -> Any:
    """Build the object described by a config section ``{kind: ..., **options}``."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind is None:
        raise ConfigError(f"{group}.kind: missing; choose one of {kinds(group)}")
    check_options(group, kind, spec)
    try:
        return get_builder(group, kind)(*supplied, **spec)
    except ConfigError as err:
        if err.key is None:
            raise
        # the builder's own check names its option; the config knows it as group.option
        raise ConfigError(f"{group}.{err.detail}", key=f"{group}.{err.key}") from err
