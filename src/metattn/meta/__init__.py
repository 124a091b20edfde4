"""Meta-learners: the MAML family (one inner loop) and attention-based learners."""

from metattn.meta.base import Learner, accuracy, default_loss
from metattn.meta.maml import ANIL, FOMAML, MAML, AdaptedModel, MAMLpp, MetaSGD

__all__ = [
    "Learner",
    "accuracy",
    "default_loss",
    "MAML",
    "FOMAML",
    "ANIL",
    "MetaSGD",
    "MAMLpp",
    "AdaptedModel",
]
