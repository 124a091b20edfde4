"""The MAML family: one inner loop (:mod:`.algorithm`, read it first), its options
(:mod:`.options`), the plan that picks how a call runs (:mod:`.plan`) and the execution
strategies (:mod:`.execution`), behind the learner (:mod:`.learner`)."""

from metattn.meta.maml.algorithm import Rates, inner_loop, inner_step, msl_weights, update
from metattn.meta.maml.learner import ANIL, FOMAML, MAML, AdaptedModel, MAMLpp, MetaSGD
from metattn.meta.maml.options import MAMLOptions, resolve_names
from metattn.meta.maml.plan import Plan

__all__ = [
    "MAML", "FOMAML", "ANIL", "MetaSGD", "MAMLpp", "AdaptedModel", "MAMLOptions", "Plan",
    "Rates", "inner_loop", "inner_step", "msl_weights", "update", "resolve_names",
]
