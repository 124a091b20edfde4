"""YAML configs mapped onto dataclasses, with errors that name the key and the fix.

A config has three component sections built through :mod:`metattn.registry` (``task``,
``model``, ``learner``: ``kind`` plus that builder's keyword arguments) and two plain sections
(``train``, ``eval``) described by :class:`TrainConfig` and :class:`EvalConfig`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

import metattn.builders  # noqa: F401  (registers the built-in kinds)
from metattn import registry
from metattn.errors import ConfigError


@dataclass
class TrainConfig:
    """The outer loop: how many meta-steps, on how many tasks, with which optimiser."""

    steps: int = 1000
    meta_batch: int = 16
    lr: float = 1e-3
    # "muon": Muon on hidden weight matrices and convolution filters, Adam on the input
    # layer, head, biases, norms and positions (metattn.optim.MuonAdam; same train.lr scale)
    optimizer: Literal["adam", "adamw", "sgd", "muon"] = "adam"
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = None
    # Decay of an exponential moving average of the weights (metattn.optim.WeightAverage),
    # e.g. 0.999; evaluations use the average, the checkpoint keeps both. null: off.
    ema: float | None = None
    log_every: int = 50
    eval_every: int = 1000
    eval_episodes: int = 100
    checkpoint_every: int = 1000
    # ... and at least every this many minutes of training (0: off), so a killed run loses at
    # most that much
    checkpoint_minutes: float = 10.0
    target: float | None = None
    # Training time budget in seconds (meta-steps only; evaluation and checkpoints excluded):
    # a TimeBudget ends the run on time and fits a cosine schedule to it; train.steps is
    # then the most steps.
    max_seconds: float | None = None
    device: str = "auto"
    threads: int | None = None
    dtype: Literal["float32", "float64"] = "float32"
    # "auto": bf16 where the device computes it natively (else none)
    autocast: Literal["none", "bf16", "auto", "fp16"] = "none"
    tf32: bool = True
    # CUDA only, one process: each meta-step is replayed from a CUDA graph
    # (metattn.recipe.CUDAGraphStep; Adam/AdamW with capturable=True). On an H100 a recipe
    # step of Omniglot MAML (Conv-4, meta-batch 32) took 25.5 ms this way, 41 ms eagerly.
    cuda_graph: bool = False
    tensorboard: bool = True
    progress: bool = True
    # PNG plots at the end of the run (training curves; adapted predictions where the task
    # family can be drawn)
    plots: bool = True


@dataclass
class EvalConfig:
    """Final evaluation on a FIXED, seeded set of test episodes (mean and 95% CI)."""

    episodes: int = 600
    seed: int = 20240
    # Episodes are drawn, and evaluated, ``chunk`` at a time: seed AND chunk fix the episode
    # set (another chunk draws other episodes). An episode's result never depends on the
    # other episodes of its chunk.
    chunk: int = 100
    task: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """A whole experiment."""

    name: str = "run"
    seed: int = 0
    task: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    learner: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def test_task_spec(self) -> dict[str, Any]:
        """The task section with the ``eval.task`` overrides applied."""
        return {**self.task, **self.eval.task}


def _check_fields(section: str, cls: type, data: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            where = f"{section}.{key}" if section else key
            raise ConfigError(f"{where}: unknown key; {hint}valid keys: {sorted(names)}")
        if not registry.type_ok(value, hints[key]) and not dataclasses.is_dataclass(hints[key]):
            raise registry.type_error(f"{section}.{key}" if section else key, value, hints[key])
    return data


# Task keys that define the train/test split; eval.task may not change them.
SPLIT_KEYS = ("kind", "protocol", "root", "dataset", "shots_per_intent", "seed")


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a plain dict (parsed YAML) and build a :class:`RunConfig`."""
    data = copy.deepcopy(data or {})
    _check_fields("", RunConfig, data)
    # An empty section (``train:`` alone, YAML null) means the defaults; anything else that is
    # not a mapping (``--set train=0``) is an error, not a silent reset of the section.
    sections = {k: {} if data.get(k) is None else data[k] for k in ("train", "eval")}
    data.pop("train", None)
    data.pop("eval", None)
    train = TrainConfig(**_check_fields("train", TrainConfig, sections["train"]))
    ev = EvalConfig(**_check_fields("eval", EvalConfig, sections["eval"]))
    cfg = RunConfig(**data, train=train, eval=ev)
    for group in ("task", "model", "learner"):
        spec = getattr(cfg, group)
        if "kind" not in spec:
            raise ConfigError(f"{group}.kind: missing; choose one of {registry.kinds(group)}")
        opts = {k: v for k, v in spec.items() if k != "kind"}
        registry.check_options(group, spec["kind"], opts)
        # resolved: the kind's defaults written out, so config.yaml says what ran
        setattr(cfg, group, {"kind": spec["kind"], **registry.defaults(group, spec["kind"]),
                             **opts})
    for key in SPLIT_KEYS:
        if key in cfg.eval.task and cfg.eval.task[key] != cfg.task.get(key):
            raise ConfigError(
                f"eval.task.{key}={cfg.eval.task[key]!r} differs from task.{key}="
                f"{cfg.task.get(key)!r}: the test episodes must come from the same split "
                "definition as training (another one can overlap the training classes); "
                f"drop eval.task.{key}, or set task.{key} and train a new run")
    test_opts = {k: v for k, v in cfg.test_task_spec().items() if k != "kind"}
    registry.check_options("task", cfg.task["kind"], test_opts)
    if cfg.train.meta_batch < 1:
        raise ConfigError(f"train.meta_batch={cfg.train.meta_batch}; it must be >= 1")
    if cfg.train.steps < 0:
        raise ConfigError(f"train.steps={cfg.train.steps}; it must be >= 0")
    _check_numbers(cfg)
    return cfg


def config_diff(a: dict[str, Any], b: dict[str, Any], ignore: Collection[str] = (),
                prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every dotted key whose value differs between two nested
    config dicts, except the keys in ``ignore``."""
    out = []
    for k in sorted(set(a) | set(b)):
        path = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, ignore, path + ".")
        elif va != vb and path not in ignore:
            out.append(f"{path}: {va!r} -> {vb!r}")
    return out


def _check_numbers(cfg: RunConfig) -> None:
    """Values that would otherwise fail late (after training) or do nothing silently."""
    t, e = cfg.train, cfg.eval
    for key, value, least in (("train.log_every", t.log_every, 1),
                              ("train.eval_every", t.eval_every, 0),
                              ("train.checkpoint_every", t.checkpoint_every, 0),
                              ("train.warmup_steps", t.warmup_steps, 0),
                              ("eval.episodes", e.episodes, 1),
                              ("eval.chunk", e.chunk, 1)):
        if value < least:
            raise ConfigError(f"{key}={value}; it must be >= {least}")
    if not (math.isfinite(t.lr) and t.lr >= 0):
        raise ConfigError(f"train.lr={t.lr}; it must be a finite number >= 0")
    if not (math.isfinite(t.checkpoint_minutes) and t.checkpoint_minutes >= 0):
        raise ConfigError(f"train.checkpoint_minutes={t.checkpoint_minutes}; give minutes >= 0 "
                          "(0: checkpoints by steps only)")
    if not t.weight_decay >= 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay}; it must be >= 0")
    if t.ema is not None and not 0 < t.ema < 1:
        raise ConfigError(f"train.ema={t.ema}; give the average's decay in (0, 1), e.g. "
                          "0.999, or null for no weight average")
    if t.grad_clip is not None and not t.grad_clip > 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip}; give a norm > 0, or null for no "
                          "clipping (a negative norm would flip the gradients)")
    if t.eval_every > 0 and t.eval_episodes < 1:
        raise ConfigError(f"train.eval_episodes={t.eval_episodes}; it must be >= 1 when "
                          "train.eval_every > 0 (or set train.eval_every=0)")
    if t.max_seconds is not None and not (math.isfinite(t.max_seconds) and t.max_seconds > 0):
        raise ConfigError(f"train.max_seconds={t.max_seconds}; give a time > 0 in seconds, "
                          "or null for no time limit")
    if t.threads is not None and t.threads < 1:
        raise ConfigError(f"train.threads={t.threads}; use a count >= 1, or null for "
                          "PyTorch's default")
    if t.device != "auto":
        try:
            torch.device(t.device)
        except RuntimeError as err:
            raise ConfigError(f"train.device={t.device!r} is not a device ({err}); use auto, "
                              "cpu, cuda or cuda:N") from err
    if t.autocast == "fp16":
        raise ConfigError("train.autocast='fp16' has no loss scaling here (small gradients, "
                          "the inner loop's included, would underflow to zero); use 'bf16'")
    if t.autocast not in ("none", "auto") and t.dtype == "float64":
        raise ConfigError(f"train.autocast={t.autocast!r} does nothing to float64 tensors; "
                          "use train.dtype=float32 with autocast, or autocast=none")


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 does: ``5e-3`` is a float (YAML 1.1
    wants ``5.0e-3``). Config files and ``--set`` values are read with it alike."""


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML text as metattn reads it (:class:`YAMLLoader`)."""
    return yaml.load(text, Loader=YAMLLoader)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
    key, raw = item.split("=", 1)
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e}); quote it, e.g. "
                          "--set 'model.hidden=[40, 40]'") from e
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b=value`` overrides to a parsed YAML dict (a copy is returned)."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


SHIPPED = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """The names of the configs that ship with metattn (``metattn train NAME``)."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def find_config(name_or_path: str | Path) -> Path:
    """A YAML file's path: the path given, or the shipped config of that name
    (``sinusoid_maml_quick`` or ``sinusoid_maml_quick.yaml``)."""
    p = Path(name_or_path)
    if p.exists() or len(p.parts) > 1 or p.suffix not in ("", ".yaml", ".yml"):
        return p
    shipped = SHIPPED / f"{p.stem}.yaml"
    return shipped if shipped.is_file() else p


def load(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file (a path, or the name of a shipped config), apply overrides
    (``KEY=VALUE``) and validate."""
    p = find_config(path)
    if p.is_dir():
        raise ConfigError(f"config {str(p)!r} is a directory; pass the path of a YAML file in "
                          "it (e.g. configs/sinusoid_maml_quick.yaml)")
    if not p.is_file():
        names = shipped_configs()
        close = difflib.get_close_matches(p.stem, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"config {str(p)!r} does not exist; {hint}pass the path of a YAML file "
                          f"or the name of a shipped config: {', '.join(names)}")
    try:
        data = parse_yaml(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read as UTF-8 text: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} holds a {type(data).__name__}, not a mapping "
                          "of sections (task, model, learner, train, eval)")
    data = apply_overrides(data, overrides or [])
    data.setdefault("name", p.stem)
    return from_dict(data)


load_config = load  # the public name: metattn.load_config(path, overrides)


def dump(cfg: RunConfig) -> str:
    """The resolved config as YAML (what a run directory's config.yaml holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
