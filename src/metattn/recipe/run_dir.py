"""The run directory: checked before anything is built, created once the run can start,
``config.yaml`` rewritten when the config changes, checkpoints written atomically. Rank 0
decides and writes; every rank raises rank 0's error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from metattn import checkpoint
from metattn.config import RunConfig, config_diff, dump, from_dict
from metattn.errors import CheckpointError, ConfigError, MetattnError, TrainingError
from metattn.recipe.distributed import agree, share
from metattn.recipe.state import TrainState

# Keys that may differ between a run and its resumption (they do not change the maths).
# ``eval.chunk`` is not among them: with the seed it fixes which test episodes are drawn.
# ``train.steps`` is, except under the cosine schedule, whose horizon it is (checked below).
# ``train.max_seconds`` counts the run's total training time, resumed parts included.
RESUMABLE_KEYS = {"train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                  "train.progress", "train.tensorboard", "train.target", "eval.episodes",
                  "train.eval_episodes", "train.threads", "train.device", "train.max_seconds",
                  "train.cuda_graph", "train.plots",
                  "train.checkpoint_minutes"}


class RunDir:
    """``out``: a new run, or (``resume``) one to continue."""

    def __init__(self, out: Path, resume: bool, is_main: bool, world: int):
        self.path, self.resume, self.is_main, self.world = Path(out), resume, is_main, world
        self.ckpt = self.path / checkpoint.WEIGHTS
        self.written: bytes | None = None

    def check(self, cfg: RunConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Refuse what cannot start (nothing is written): an ``--out`` that is a file, a run
        already there without ``--resume``, ``--resume`` without a checkpoint or with a
        config that changed where it may not. Returns the checkpoint to resume (on every
        rank: nodes need not share a filesystem)."""
        error, saved = None, None
        if self.is_main:
            try:
                saved = self._check(cfg)
            except MetattnError as err:
                error = err
        agree(error, self.world)
        return share(saved, self.world) if self.resume else None

    def _check(self, cfg: RunConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {str(self.path)!r} is a file; pass a directory for the "
                              "run (created if missing)")
        if self.ckpt.exists() and not self.resume:
            raise CheckpointError(
                f"{str(self.path)!r} already holds a run; pass --resume to continue it, or "
                "--out NEW_DIR to start a new one (nothing was overwritten)")
        if not self.resume:
            return None
        if not self.ckpt.exists():
            raise CheckpointError(f"--resume: no checkpoint in {str(self.path)!r}; "
                                  "start without --resume")
        # the checkpoint's own config decides (config.yaml may be missing or edited)
        saved = checkpoint.load(self.path)
        old = saved[1].get("config")
        if old is None and (self.path / "config.yaml").is_file():
            import yaml

            old = yaml.safe_load((self.path / "config.yaml").read_text())
            saved[1]["config"] = old  # (older checkpoints: for every rank)
        if old is not None:
            # both resolved (every default written out), as configs are since 2026-12-07
            diff = config_diff(from_dict(old).to_dict(), cfg.to_dict(), ignore=RESUMABLE_KEYS)
            if diff:
                raise ConfigError(
                    "--resume: the config differs from the one in the run's checkpoint in "
                    f"{diff}; only {sorted(RESUMABLE_KEYS)} may change when resuming")
            old_steps = (old.get("train") or {}).get("steps")
            if cfg.train.schedule == "cosine" and old_steps != cfg.train.steps \
                    and not cfg.train.max_seconds:
                raise ConfigError(
                    f"--resume: train.steps {old_steps} -> {cfg.train.steps}, but the cosine "
                    "schedule spans train.steps, so the learning rate would jump back up; "
                    f"resume with train.steps={old_steps}, or start a new run (--out NEW_DIR) "
                    "with the longer schedule")
        return saved

    def create(self, cfg: RunConfig) -> None:
        """Make the folder (rank 0) and write the config of a new run."""
        error = None
        if self.is_main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                error = ConfigError(f"--out {str(self.path)!r} cannot be created ({err}); "
                                    "pass a folder you can write to")
        agree(error, self.world)
        if not self.resume:  # a resume writes it once the checkpoint has been restored
            self.write_config(cfg)

    def write_config(self, cfg: RunConfig) -> None:
        """``config.yaml`` = the config as run now (rank 0; rewritten only when it changed: a
        time budget may move train.steps, and ``--resume`` must continue the same
        schedule)."""
        text = dump(cfg).encode()
        if self.is_main and text != self.written:
            checkpoint.atomic_write_bytes(self.path / "config.yaml", text)
            self.written = text

    def save(self, cfg: RunConfig, state: TrainState, device: torch.device, now: float) -> None:
        """Checkpoint the train state (rank 0), then the config it goes with."""
        if not self.is_main:
            return
        for n, p in state.learner.named_parameters():
            if not torch.isfinite(p).all():
                raise TrainingError(f"parameter {n} is not finite at step {state.step}; the "
                                    f"last good checkpoint in {str(self.path)!r} is kept")
        values, tensors = state.to_checkpoint(cfg, device, now)
        checkpoint.save(self.path, state.learner, state.optimizer, values, tensors)
        self.write_config(cfg)
