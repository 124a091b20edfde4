"""A run's time budget (``train.max_seconds``): :class:`TimeBudget` ends the run on time and
fits a cosine schedule to it. It reads the recipe's clock through the seconds it is given,
so tests drive it with a clock of their own (``train(..., clock=...)``)."""

from __future__ import annotations

from collections.abc import Callable

from metattn.config import RunConfig
from metattn.errors import ConfigError

Callback = Callable[[int, dict[str, float]], None]


def time_budget(cfg: RunConfig, callbacks: list[Callback]) -> tuple[TimeBudget | None,
                                                                     list[Callback]]:
    """The run's budget: a caller's TimeBudget (e.g. a benchmark's), recorded as
    ``train.max_seconds``, or one made from the config; and the callbacks with it."""
    budget = next((c for c in callbacks if isinstance(c, TimeBudget)), None)
    if budget is not None:
        cfg.train.max_seconds = budget.seconds
    elif cfg.train.max_seconds:
        budget = TimeBudget(cfg, cfg.train.max_seconds)
        callbacks = [*callbacks, budget]
    return budget, callbacks


class TimeBudget:
    """Callback for :func:`train`: end the run within ``seconds`` of TRAINING time (the
    recipe's ``seconds``: meta-steps with sampling; evaluation and checkpoints excluded) by
    lowering ``cfg.train.steps`` in place, so the recipe ends its loop normally, saves and
    evaluates.

    With a cosine schedule and ``fit_schedule``, the schedule's horizon also moves to the
    step where the budget is projected to run out, so the learning rate reaches zero when
    time does, on any machine. The time per step is measured from a reference point after the
    first 5% of the budget (slow warm-up steps do not count); the horizon is fitted once a
    tenth of the budget has passed and re-fitted at every call, never past the config's
    steps. Until half of the budget it may grow as well as shrink (a horizon that could only
    shrink ended runs early when the steps sped up: a ViT run stopped at 73 of 90 s); from
    then on it only shrinks, so the rate never rises late in the run. The warm-up is the
    config's, and the cosine runs from its end to the fitted horizon.
    Under torchrun rank 0's clock decides for every rank.
    Without a fitted schedule the run ends at the step where the budget runs out, when that
    comes before the next call. The recipe calls it every ``train.log_every`` steps; in one
    process it also ends the run at the first step past the budget between calls. Under
    torchrun the budget acts at log steps only, so keep ``log_every`` small (e.g. 10) for a
    tight budget there. ``stopped_by_budget`` says whether it cut the run.
    """

    def __init__(self, cfg: RunConfig, seconds: float, fit_schedule: bool = True):
        if not seconds > 0:
            raise ConfigError(f"TimeBudget: seconds={seconds}; give a positive budget")
        self.cfg = cfg
        self.seconds = float(seconds)
        self.cap = cfg.train.steps
        self.fit = fit_schedule and cfg.train.schedule == "cosine"
        self.ref: tuple[int, float] | None = None  # (step, seconds) once warm-up is behind
        self.stopped_by_budget = False

    def __call__(self, step: int, vals: dict[str, float]) -> None:
        elapsed = float(vals["seconds"])
        if step >= self.cap:  # the config's own length reached first: the run ends there
            return
        if self.ref is None and elapsed >= 0.05 * self.seconds:
            self.ref = (step, elapsed)
        steady = self.ref is not None and step > self.ref[0]
        per_step = ((elapsed - self.ref[1]) / (step - self.ref[0]) if steady
                    else elapsed / max(step, 1))
        # the step at which the budget runs out at this rate
        projected = step + int(max(self.seconds - elapsed, 0.0) / max(per_step, 1e-9))
        steps = self.cfg.train.steps
        if self.fit and steady and elapsed >= 0.1 * self.seconds:
            if step < steps:  # (a horizon reached is the end, even with time left)
                # growing raises the rate a little: allowed only in the first half, where
                # the rate is high anyway; later the horizon may only shrink
                grow = elapsed < 0.5 * self.seconds
                steps = min(self.cap, projected) if grow else min(steps, self.cap, projected)
        elif projected < step + self.cfg.train.log_every:
            # the budget runs out before the next call (every log_every steps): end there
            steps = min(steps, projected)
        self.cfg.train.steps = max(steps, step)  # the recipe's loop ends there, saves, evaluates
        self.stopped_by_budget = self.cfg.train.steps < self.cap

    def end_if_spent(self, step: int, elapsed: float) -> None:
        """Between log steps (the recipe calls it after every step in one process): when the
        time is up, end the run at this step, which is then logged, saved and evaluated as
        the last, instead of at the next log step (with log_every 100 and 4 s steps that was
        up to 400 s late)."""
        if elapsed >= self.seconds and step < self.cfg.train.steps:
            self.cfg.train.steps = step
