"""swimdist: distributed, out-of-core training of SWIM sampled neural networks on Dask."""

from . import config as _config  # noqa: F401  (registers the swimdist.* dask.config defaults)
from .estimators import SWIMClassifier, SWIMRegressor, load_model
from .lstsq import solve
from .selection import SWIMClassifierCV, SWIMRegressorCV

__version__ = "0.1.0"

__all__ = ["SWIMClassifier", "SWIMClassifierCV", "SWIMRegressor", "SWIMRegressorCV",
           "__version__", "load_model", "solve"]
