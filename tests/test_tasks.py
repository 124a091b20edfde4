"""metattn.data.tasks: TaskBatch checks its fields with errors that name the fix, and moves and
slices without reading the labels again."""

from __future__ import annotations

import pytest
import torch

import metattn as mt
from metattn.errors import TaskError


def test_taskbatch_errors_name_the_field():
    x, y = torch.randn(2, 5, 3), torch.randint(0, 4, (2, 5))
    with pytest.raises(TaskError, match="support_y has 4 examples.*support_x has 5"):
        mt.TaskBatch(x, y[:, :4], x, y)
    with pytest.raises(TaskError, match="support_x is empty"):
        mt.TaskBatch(x[:, :0], y[:, :0], x, y)
    with pytest.raises(TaskError,
                       match=r"query_y holds labels in \[3, 3\] but n_way=3 needs labels in"):
        mt.TaskBatch(x, y.clamp(max=2), x, y.clamp(min=0, max=3).fill_(3), n_way=3)
    with pytest.raises(TaskError, match="query_x has example shape"):
        mt.TaskBatch(x, y, torch.randn(2, 5, 4), y)
    with pytest.raises(TaskError, match="query_x has 3 tasks"):
        mt.TaskBatch(x, y, torch.randn(3, 5, 3), torch.randint(0, 4, (3, 5)))
    with pytest.raises(TaskError, match="leading task dimension"):
        mt.TaskBatch(torch.randn(5), y, x, y)


def test_taskbatch_slices_and_moves_without_reading_the_labels_again():
    # a cut or moved batch keeps the checked labels: reading them back (a host sync on a
    # GPU) is what a CUDA-graph capture of MAML's chunks cannot do; shapes are checked still
    x, y = torch.randn(4, 5, 3), torch.randint(0, 3, (4, 5))
    batch = mt.TaskBatch(x, y, x, y.clone(), n_way=3, k_shot=1)
    batch.query_y.fill_(7)  # out of range behind the batch's back
    part = batch.slice(1, 3)
    assert part.num_tasks == 2 and part.n_way == 3 and part.k_shot == 1
    assert batch.to("cpu", torch.float64).support_x.dtype == torch.float64
    with pytest.raises(TaskError, match="labels in"):  # a new batch is checked in full
        mt.TaskBatch(part.support_x, part.support_y, part.query_x, part.query_y, n_way=3)
    with pytest.raises(TaskError, match="0 tasks"):
        batch.slice(2, 2)
