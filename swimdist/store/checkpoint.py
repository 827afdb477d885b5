"""Solve checkpoints: intermediate results of a solve kept beside a local feature store."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np

from .._io import is_url, local_path, write_atomic, write_text_atomic

__all__ = ["SolveCheckpoint", "save_npy_atomic"]

logger = logging.getLogger("swimdist.store")


def save_npy_atomic(directory: str, name: str, arr: np.ndarray) -> str:
    """Write ``arr`` as ``<directory>/<name>.npy`` atomically (:func:`swimdist._io.write_atomic`).

    Runs on workers too (local or shared filesystems).

    Parameters
    ----------
    directory : str
        Target directory (created if missing).
    name : str
        File name without ``.npy``.
    arr : numpy.ndarray
        The array (written without pickle).

    Returns
    -------
    str
        The path written.
    """
    path = os.path.join(directory, name + ".npy")
    write_atomic(path, lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))
    return path


class SolveCheckpoint:
    """Intermediate results of a solve kept beside a local feature store (``<store>.solve``),
    so that a solve interrupted by Ctrl-C, a killed process or a lost machine resumes.

    The directory records what it belongs to (the store's job fingerprint plus the solver's
    parameters, see :meth:`open`); a checkpoint of any other job or parameters is discarded,
    never mixed in. Files are written atomically and read without unpickling; an unreadable
    one counts as missing. :meth:`remove` deletes it once the model is safe.

    Parameters
    ----------
    path : str
        The checkpoint directory.
    fingerprint : str
        The fingerprint of the job whose solve it holds.
    """

    def __init__(self, path: str, fingerprint: str):
        self.path = os.path.abspath(path)
        self.fingerprint = fingerprint

    @classmethod
    def for_store(cls, url: str, fingerprint: str) -> SolveCheckpoint | None:
        """The checkpoint of a local store (None for fsspec URLs)."""
        if is_url(url):
            return None
        return cls(local_path(url).rstrip("/\\") + ".solve", fingerprint)

    def open(self, params: dict) -> SolveCheckpoint:
        """Use the directory for ``params``: keep what it has if it was written for the same
        store fingerprint and parameters, else empty it first."""
        key = {"fingerprint": self.fingerprint, **{k: params[k] for k in sorted(params)}}
        meta = os.path.join(self.path, "checkpoint.json")
        try:
            with open(meta) as f:
                same = json.load(f) == json.loads(json.dumps(key))
        except (OSError, ValueError):
            same = False
        if not same:
            if os.path.isdir(self.path):
                logger.info("discarding the solve checkpoint in %s (another job or other "
                            "parameters)", self.path)
            shutil.rmtree(self.path, ignore_errors=True)
            os.makedirs(self.path, exist_ok=True)
            write_text_atomic(meta, json.dumps(key))
        return self

    def save_npy(self, name: str, arr: np.ndarray) -> str:
        """Save one array as ``<name>.npy`` atomically; returns its path."""
        return save_npy_atomic(self.path, name, arr)

    def load_npy(self, name: str) -> np.ndarray | None:
        """The array saved as ``<name>.npy``, None if missing or unreadable."""
        try:
            return np.load(os.path.join(self.path, name + ".npy"), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None

    def save(self, name: str, **arrays: np.ndarray) -> None:
        """Save several arrays as ``<name>.npz`` atomically."""
        write_atomic(os.path.join(self.path, name + ".npz"), lambda f: np.savez(f, **arrays))

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays saved as ``<name>.npz``, None if missing or unreadable."""
        try:
            with np.load(os.path.join(self.path, name + ".npz"), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError):
            return None

    def remove(self) -> None:
        """Delete the checkpoint directory."""
        shutil.rmtree(self.path, ignore_errors=True)
