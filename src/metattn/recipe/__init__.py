"""The recipe: from a config to a trained, evaluated, checkpointed run (:func:`train`), and
back from a run directory to a learner (:func:`load_run`)."""

from metattn.recipe.budget import TimeBudget
from metattn.recipe.build import build, build_learner, build_tasks, make_optimizer
from metattn.recipe.cuda_graph import CUDAGraphStep
from metattn.recipe.distributed import pick_device, setup_distributed
from metattn.recipe.evaluation import evaluate, evaluate_run, final_evaluation, load_run
from metattn.recipe.loop import train

__all__ = ["train", "load_run", "evaluate", "evaluate_run", "final_evaluation", "TimeBudget",
           "CUDAGraphStep", "build", "build_learner", "build_tasks", "make_optimizer",
           "pick_device", "setup_distributed"]
