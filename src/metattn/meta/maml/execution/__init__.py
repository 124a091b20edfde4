"""How MAML's inner loops run: strategies that compute what :mod:`..algorithm` defines, with
other speed and memory. Each takes an :class:`InnerJob` (what the inner loops need) and never
the learner; :mod:`..plan` says which runs."""

from metattn.meta.maml.execution.job import InnerJob, Result

__all__ = ["InnerJob", "Result"]
