"""What a run tells: ``metrics.jsonl`` (and TensorBoard when installed), the window of step
metrics each log line averages, and the progress bars (rank 0 only)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from metattn import checkpoint


def _record(line: str) -> dict | None:
    """One metrics.jsonl record, or None for a blank or half-written line (a hard kill)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


class Logger:
    """metrics.jsonl (+ TensorBoard when installed), written by rank 0 only. A resumed run
    drops what was logged after its checkpoint, so the log reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if (rec := _record(ln)) is not None and rec.get("step", 0) <= resume_step]
            checkpoint.atomic_write_bytes(self.path, "".join(k + "\n" for k in keep).encode())
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self.f = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is an optional extra
                print("[metattn] train.tensorboard is on but tensorboard is not installed "
                      "(pip install 'metattn[tensorboard]'); logging to metrics.jsonl only",
                      file=sys.stderr, flush=True)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One record: ``{"kind": kind, "step": step, **values}``."""
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, **values}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        """Close the file (and TensorBoard's writer)."""
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


class Window:
    """The step metrics since the last log line, and the tasks done in that time. Kept in
    checkpoints, so a resumed run logs the same averages as an uninterrupted one."""

    def __init__(self, saved: dict[str, Any] | None = None, device: torch.device | None = None):
        saved = saved or {}
        # (floats: the window's mean is taken in float32, which they hold exactly)
        self.values: dict[str, list[torch.Tensor]] = {
            k: [torch.tensor(x, device=device) for x in v]
            for k, v in (saved.get("log_window") or {}).items()}
        self.tasks = saved.get("log_tasks", 0)
        self.carried = saved.get("log_seconds", 0.0)  # the window's seconds before a resume
        self.start = 0.0

    def begin(self, now: float) -> None:
        """The window's clock starts (right before the loop: setup is not training time)."""
        self.start = now - self.carried

    def add(self, metrics: dict[str, torch.Tensor], tasks: int) -> None:
        """One step's metrics over ``tasks`` tasks."""
        self.tasks += tasks
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(v)

    def flush(self, now: float) -> dict[str, float]:
        """The window's means and tasks per second; the window starts again at ``now``."""
        vals = {k: float(torch.stack(v).float().mean()) for k, v in self.values.items()}
        vals["tasks_per_s"] = self.tasks / max(now - self.start, 1e-9)
        self.values, self.tasks, self.start = {}, 0, now
        return vals

    def state(self, now: float) -> dict[str, Any]:
        """What a checkpoint keeps of it."""
        return {"log_window": {k: [t.tolist() for t in v] for k, v in self.values.items()},
                "log_tasks": self.tasks, "log_seconds": now - self.start}


def rich_bar(label: str, transient: bool, info: bool = False) -> Any:
    """A rich progress bar: label, bar, done/total, elapsed, remaining (and an info field)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn()]
    if info:
        cols.append(TextColumn("{task.fields[info]}"))
    return Progress(*cols, transient=transient)


@contextmanager
def eval_bar(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A transient 'evaluate' progress bar over test episodes (final evaluation, ``metattn
    eval``): 600 MAML episodes with 10 inner steps can take many minutes on a CPU."""
    if not enabled:
        yield None
        return
    with rich_bar("evaluate", transient=True) as bar:
        task = bar.add_task("eval", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


class Progress:
    """A rich progress bar on rank 0 (quiet when disabled or not on a terminal)."""

    def __init__(self, enabled: bool, total: int, start: int, main: bool = True):
        self.bar = None
        self.main = main  # messages come from rank 0 only
        if not enabled:
            return
        self.bar = rich_bar("meta-train", transient=False, info=True)
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, info: str, total: int | None = None) -> None:
        """Move the bar to ``step`` (and its end to ``total``: a time budget moves it)."""
        if self.bar is None:
            return
        # rich's update(total=...) would also reset the speed estimate, leaving no
        # time-remaining; so the task's total is set on its own
        task = getattr(self.bar, "_tasks", {}).get(self.task)
        if total is not None and task is not None and task.total != total:
            task.total = total
        self.bar.update(self.task, completed=step, info=info)

    def print(self, msg: str) -> None:
        """A line above the bar (rank 0)."""
        if not self.main:
            return
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            print(msg, flush=True)

    def stop(self) -> None:
        """Leave the bar as it is on the terminal."""
        if self.bar is not None:
            self.bar.stop()
