"""Tasks (support/query episodes) and the data sources that make them."""

from metattn.data.synthetic import SinusoidTasks
from metattn.data.tasks import TaskBatch, TaskSampler, mean_ci95

__all__ = ["TaskBatch", "TaskSampler", "mean_ci95", "SinusoidTasks"]
