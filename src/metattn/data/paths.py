"""Where data sets and caches live: ``$METATTN_DATA/<name>`` or ``shared/data/<name>`` beside
the source checkout (or ``../shared/data/<name>`` from the current folder), and
``$METATTN_CACHE/<name>`` or ``~/.cache/metattn/<name>``."""

from __future__ import annotations

import os
from pathlib import Path

from metattn.errors import DataError

# ``<checkout>/../shared``: the shared folder beside a source checkout
CHECKOUT_SHARED = Path(__file__).resolve().parents[3].parent / "shared"


def find_data_root(name: str, checkout: Path, how: str) -> Path:
    """``$METATTN_DATA/<name>`` when METATTN_DATA is set, else ``checkout`` (the data folder
    beside the source checkout), else ``../shared/data/<name>`` from the current folder; a
    DataError naming both places and ``how`` (what to pass or fetch) when neither exists."""
    env = os.environ.get("METATTN_DATA")
    if env:
        return Path(env).expanduser() / name
    local = Path("..") / "shared" / "data" / name
    for cand in (checkout, local):
        if cand.is_dir():
            return cand.resolve()
    raise DataError(
        f"{name}: no data folder given, METATTN_DATA is not set and neither {checkout} nor "
        f"{local.resolve()} exists; {how}")


def cache_dir(name: str) -> Path:
    """``$METATTN_CACHE/<name>`` if METATTN_CACHE is set, else ``~/.cache/metattn/<name>``."""
    env = os.environ.get("METATTN_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "metattn"
    return base / name
