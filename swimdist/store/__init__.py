"""Feature stores: where the hidden-layer features of a fit live between building and solving.

Submodules
----------
backends
    The Zarr v3 and memory-mapped npy formats, their metadata and block checksums.
build
    Fingerprints, building a store block by block (resumable), verifying blocks,
    describing a store, temporary stores.
lock
    ``StoreLock``: one job at a time on a store.
checkpoint
    ``SolveCheckpoint``: an interrupted solve resumes from files beside its store.
"""

from .backends import (
    COLUMN_CHUNK,
    STORE_FORMAT,
    STORE_FORMATS,
    STORE_VERSION,
    NpyBackend,
    ZarrBackend,
    store_backend,
)
from .build import (
    build_feature_store,
    check_free_space,
    describe_store,
    fingerprint_array,
    fingerprint_job,
    remove_store,
    temporary_store_path,
    verify_blocks,
)
from .checkpoint import SolveCheckpoint, save_npy_atomic
from .lock import StoreLock

__all__ = [
    "COLUMN_CHUNK",
    "STORE_FORMAT",
    "STORE_FORMATS",
    "STORE_VERSION",
    "NpyBackend",
    "SolveCheckpoint",
    "StoreLock",
    "ZarrBackend",
    "build_feature_store",
    "check_free_space",
    "describe_store",
    "fingerprint_array",
    "fingerprint_job",
    "remove_store",
    "save_npy_atomic",
    "store_backend",
    "temporary_store_path",
    "verify_blocks",
]
