"""Name -> builder registries that map YAML config sections onto Python objects.

A config section such as ``learner: {kind: maml, inner_lr: 0.4}`` is built by calling the
builder registered as ``("learner", "maml")`` with the remaining keys as keyword arguments.
The builder's signature IS the schema: an unknown key, a missing required key or a value of
the wrong type raises :class:`~metattn.errors.ConfigError` naming the key and the fix.

Builders per group:

* ``task``: ``f(split: str, **options) -> TaskSampler`` (``split`` is "train" or "test").
* ``model``: ``f(**options) -> nn.Module``.
* ``learner``: ``f(model, **options) -> Learner``.
"""

from __future__ import annotations

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


def register(group: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as the builder of ``kind: name`` in ``group``."""
    if group not in _REGISTRY:
        raise ValueError(f"unknown registry group {group!r}; choose from {sorted(_REGISTRY)}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[group][name] = fn
        return fn

    return deco


def kinds(group: str) -> list[str]:
    """Registered names of a group."""
    _load_builtins()
    return sorted(_REGISTRY[group])


def get_builder(group: str, kind: str) -> Callable[..., Any]:
    """The builder for ``kind`` in ``group``, or a ConfigError suggesting the nearest name."""
    _load_builtins()
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


def _ann_name(ann: Any) -> str:
    """``int``, ``list[int]``, ``dict[str, int]``: an annotation as a user would write it."""
    if isinstance(ann, type) and not typing.get_args(ann):
        return ann.__name__
    return str(ann).replace("typing.", "")


def _type_ok(value: Any, ann: Any) -> bool:
    if ann is inspect.Parameter.empty or ann is Any:
        return True
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(ann))
    if ann is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if origin in (list, tuple, typing.Sequence) or ann in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        if origin is tuple and len(args) > 1:  # tuple[int, str]: one type per position
            return len(value) == len(args) and all(map(_type_ok, value, args))
        return not args or all(_type_ok(v, args[0]) for v in value)
    if origin is dict or ann is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(ann)
        return len(args) != 2 or all(_type_ok(k, args[0]) and _type_ok(v, args[1])
                                     for k, v in value.items())
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True


def check_options(group: str, kind: str, options: dict[str, Any]) -> None:
    """Validate ``options`` against the builder's signature; raise ConfigError on a problem."""
    fn = get_builder(group, kind)
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # pragma: no cover - unresolvable annotations: skip type checks
        hints = {}
    params = {n: p for n, p in sig.parameters.items() if n not in _SUPPLIED[group]}
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind is not p.VAR_KEYWORD]
    for key, value in options.items():
        if key not in params:
            if has_var_kw:
                continue
            close = difflib.get_close_matches(key, named, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{group}.{key}: unknown key for {group}.kind={kind!r}; {hint}"
                f"valid keys: {sorted(named)}"
            )
        ann = hints.get(key, params[key].annotation)
        if not _type_ok(value, ann):
            raise ConfigError(
                f"{group}.{key}: got {value!r} ({type(value).__name__}) but {kind!r} expects "
                f"{_ann_name(ann)}; fix the value in the YAML or --set"
            )
    for n, p in params.items():
        if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) \
                and n not in options:
            raise ConfigError(f"{group}.{n}: required by {group}.kind={kind!r} but missing")


def build(group: str, spec: dict[str, Any], *supplied: Any) -> Any:
    """Build the object described by a config section ``{kind: ..., **options}``."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind is None:
        raise ConfigError(f"{group}.kind: missing; choose one of {kinds(group)}")
    check_options(group, kind, spec)
    return get_builder(group, kind)(*supplied, **spec)


_LOADED = False


def _load_builtins() -> None:
    """Import the modules whose import registers the built-in builders."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import metattn.builders  # noqa: F401
