"""Interpretability reports: ``metattn explain RUN_DIR`` (:func:`explain_run`).

Reads run directories, so it sits beside the CLI in the layers: it may import the recipe.
"""

from metattn.explain.run import BUILDERS, Explained, explain_run, register_builder

__all__ = ["BUILDERS", "Explained", "explain_run", "register_builder"]
