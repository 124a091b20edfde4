"""Where real data and caches live: one rule for every dataset.

Data: ``$METATTN_DATA/<name>`` when METATTN_DATA is set, else ``shared/data/<name>`` beside
the source checkout, else ``../shared/data/<name>`` from the current folder. Caches:
``$METATTN_CACHE/<name>``, else ``~/.cache/metattn/<name>`` (never the data folder).
"""

from __future__ import annotations

import os
from pathlib import Path

from metattn.errors import DataError

# The shared data folder beside a source checkout (``<checkout>/../shared/data``).
CHECKOUT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def data_root(name: str, fix: str, checkout: Path | None = None) -> Path:
    """The folder of dataset ``name`` (see the module docstring); a :class:`DataError` that
    ends with ``fix`` (how to get the data) when none exists. ``checkout`` overrides the
    folder beside the checkout (tests)."""
    env = os.environ.get("METATTN_DATA")
    if env:
        return Path(env).expanduser() / name
    beside = checkout if checkout is not None else CHECKOUT_DATA / name
    local = Path("..") / "shared" / "data" / name
    for cand in (beside, local):
        if cand.is_dir():
            return cand.resolve()
    raise DataError(
        f"{name}: no data folder given, METATTN_DATA is not set and neither {beside} nor "
        f"{local.resolve()} exists; {fix}, set METATTN_DATA=<folder containing {name}/>, "
        "or pass root=<the folder>")


def cache_dir(name: str) -> Path:
    """``$METATTN_CACHE/<name>`` if METATTN_CACHE is set, else ``~/.cache/metattn/<name>``."""
    env = os.environ.get("METATTN_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "metattn"
    return base / name
