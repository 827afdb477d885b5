"""Exceptions and warnings raised by swimdist.

Every error subclasses both :class:`SwimdistError` and the matching builtin
(``ValueError``, ``OSError``...), so callers that catch builtins keep working.
"""

from __future__ import annotations


class SwimdistError(Exception):
    """Base class of every error swimdist raises on purpose."""


class ValidationError(SwimdistError, ValueError):
    """Input data or parameters are not acceptable (shape, dtype, NaN/inf, empty...)."""


class DTypeError(SwimdistError, TypeError):
    """Input values cannot be read as numbers (object arrays holding other things)."""


class NotFittedError(SwimdistError, ValueError, AttributeError):
    """An estimator was used before ``fit``."""


class ChunkingError(SwimdistError, ValueError):
    """A dask array is chunked in a way the operation cannot use."""


class StoreError(SwimdistError, OSError):
    """A feature store or model file is missing, foreign, corrupt or locked."""


class SchedulerError(SwimdistError, OSError):
    """A Dask scheduler could not be reached or was lost."""


class WorkerLostError(SwimdistError, RuntimeError):
    """Dask workers died during a job more often than it can recover from (most often they
    ran out of memory)."""


class JobSpecError(SwimdistError, ValueError):
    """A training-job specification is invalid."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at its iteration limit before its tolerance."""


class DataConversionWarning(UserWarning):
    """Input was converted to the expected shape (e.g. a column-vector y to 1-D)."""
