"""The tasks one after another: the inner loop run once per task."""

from __future__ import annotations

import torch
from torch import nn

from metattn.data.tasks import TaskBatch
from metattn.meta.maml.algorithm import inner_loop
from metattn.meta.maml.execution.job import InnerJob, Result


def run(job: InnerJob, batch: TaskBatch, model: nn.Module | None = None) -> Result:
    """Every task's inner loop on ``model`` (default ``job.model``; a task thread passes its
    replica), stacked over tasks."""
    forward_loss = job.forward_loss(model)
    rows = []
    for t in range(batch.num_tasks):
        _, s, q, o = inner_loop(forward_loss, job.fast, (batch.support_x[t], batch.support_y[t]),
                             (batch.query_x[t], batch.query_y[t]), job.steps, job.rates,
                             job.first_order, job.record, job.step)
        rows.append((torch.stack(s) if s else batch.query_x.new_zeros(0), torch.stack(q),
                     torch.stack(o)))
    return tuple(torch.stack(z) for z in zip(*rows, strict=True))  # type: ignore[return-value]
