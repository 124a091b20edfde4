"""Checkpoints: safetensors tensors + JSON state, written atomically.

``checkpoint.safetensors`` holds the learner's and optimiser's tensors and, in its header
metadata, the whole JSON state (step, RNG states, optimiser hyper-parameters, config). It is
written to a temporary file and renamed over the old one, so a crash mid-write leaves the
previous checkpoint intact; the single file is the authority when loading. ``state.json`` is a
readable copy of the same state, also written atomically.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from metattn.errors import CheckpointError

WEIGHTS = "checkpoint.safetensors"
STATE = "state.json"
MODEL = "model.safetensors"


@functools.cache
def _umask_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask); mkstemp's is 0o600.
    Read once: setting the umask to read it is process-wide."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _number(obj: Any) -> float:
    """JSON for one-element tensors in the state (a capturable optimiser's learning rate is a
    tensor, and so are the scheduler's base rates then): their value."""
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return float(obj)
    raise TypeError(f"not JSON serialisable in a checkpoint's state: {type(obj).__name__}")


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for pid, st in opt_state["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v.detach().cpu().contiguous()
                entry[k] = {"__tensor__": f"optim/{pid}/{k}"}
            else:
                entry[k] = v
        plain["state"][str(pid)] = entry
    return tensors, plain


def _unflatten_optimizer(plain: dict, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state = {}
    for pid, entry in plain["state"].items():
        state[int(pid)] = {
            k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v
            for k, v in entry.items()
        }
    return {"state": state, "param_groups": plain["param_groups"]}


def save(
    run_dir: str | Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Atomically write the checkpoint of ``module`` (+ optimiser) and ``state`` to ``run_dir``."""
    run_dir = Path(run_dir)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    state = dict(state)
    if optimizer is not None:
        opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        state["optimizer"] = opt_plain
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra/{k}"] = v.detach().cpu().contiguous()
    blob = json.dumps(state, default=_number)
    _write_safetensors(run_dir / WEIGHTS, tensors, {"metattn_state": blob})
    atomic_write_bytes(run_dir / STATE, json.dumps(state, indent=1, default=_number).encode())
    return run_dir / WEIGHTS


def save_weights(run_dir: str | Path, model: torch.nn.Module) -> Path:
    """``model.safetensors``: the model's state dict alone, under its own names (what
    ``model.load_state_dict(safetensors.torch.load_file(path))`` takes), written
    atomically."""
    path = Path(run_dir) / MODEL
    _write_safetensors(path, {k: v.detach().cpu().contiguous()
                              for k, v in model.state_dict().items()})
    return path


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                       metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written to a temp file beside ``path``, synced, then renamed over
    it: a crash mid-write leaves the previous file intact."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint: (all tensors by key, JSON state). Raises CheckpointError if unusable."""
    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {str(path)!r}; train first (metattn train CONFIG --out "
            f"{run_dir}) or point at a run directory that holds {WEIGHTS}"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        state = json.loads(meta["metattn_state"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a metattn checkpoint ({e}); "
            "restore it from a copy or start a new run with --out NEW_DIR"
        ) from e
    return tensors, state


def restore(
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Load tensors and optimiser state saved by :func:`save` into live objects."""
    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        module.load_state_dict(model_sd)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:6])
        raise CheckpointError(
            f"checkpoint does not fit this model: {detail or str(e)}; the config's model or "
            "learner section differs from the run that wrote it"
        ) from e
    if optimizer is not None and "optimizer" in state:
        try:
            optimizer.load_state_dict(_unflatten_optimizer(state["optimizer"], tensors))
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"the checkpoint's optimiser state does not fit this learner's parameters "
                f"({e}); the config's learner or train.optimizer differs from the run's"
            ) from e
