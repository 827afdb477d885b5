"""Load the packaged ``swimdist.yaml`` into ``dask.config`` under ``"swimdist"``."""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

_FN = os.path.join(os.path.dirname(__file__), "swimdist.yaml")

with open(_FN) as _f:
    _defaults = yaml.safe_load(_f)

dask.config.update_defaults(_defaults)


def get(key: str, default: Any = None) -> Any:
    """Return ``swimdist.<key>`` from dask.config (``default`` if unset)."""
    return dask.config.get(f"swimdist.{key}", default=default)
