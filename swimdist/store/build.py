"""Building, verifying and describing feature stores.

Every row block is generated and written by one task on a worker, which writes its data
chunk and then its own checksum entry (separate chunks, so no two tasks ever write the same
chunk); a block is reused on a later run only when its checksum verifies. A store records
the fingerprint of what produced it and refuses to serve a different job.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from typing import Any

import dask
import dask.array as da
import numpy as np

from .. import config
from .._dask import broadcast, compute, compute_all
from .._io import is_url, local_path
from ..exceptions import StoreError
from ..sampling import Layer
from .backends import STORE_FORMAT, STORE_VERSION, store_backend

__all__ = [
    "build_feature_store",
    "check_free_space",
    "describe_store",
    "fingerprint_array",
    "fingerprint_job",
    "remove_store",
    "temporary_store_path",
    "verify_blocks",
]


# --------------------------------------------------------------------------- fingerprints
def fingerprint_array(X) -> str:
    """A content hash of an input array (dask arrays: their deterministic token)."""
    if isinstance(X, da.Array):
        return "dask:" + dask.base.tokenize(X)
    X = np.ascontiguousarray(X)
    h = hashlib.blake2b(digest_size=16)
    h.update(str((X.shape, X.dtype.str)).encode())
    h.update(memoryview(X).cast("B"))
    return h.hexdigest()


def fingerprint_job(**parts: Any) -> str:
    """Hash of the parts that determine a feature matrix (arrays hashed by content)."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(parts):
        v = parts[k]
        h.update(k.encode())
        if isinstance(v, np.ndarray):
            h.update(fingerprint_array(v).encode())
        elif isinstance(v, list | tuple) and v and isinstance(v[0], Layer):
            for layer in v:
                h.update(fingerprint_array(layer.weights).encode())
                h.update(fingerprint_array(layer.biases).encode())
                h.update(layer.activation.encode())
                if layer.scale is not None:
                    h.update(fingerprint_array(layer.scale).encode())
        else:
            h.update(json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- block tasks
def _block_crc(h: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(h).view(np.uint8)) + 1


def _write_block(x, params, columns, dtype, backend, block_info=None):
    """Generate one row block of features and write it, then its checksum (one task).

    Reads only this block's checksum entry: a build of B blocks makes B small reads, not B
    reads of the whole checksum array.
    """
    from ..features import _forward

    info = block_info[0]
    i = info["chunk-location"][0]
    r0 = info["array-location"][0][0]
    if backend.crc(i) != 0:
        return np.zeros((1, 1), dtype=np.uint8)  # already written and verified
    h = _forward(x, params, columns, dtype, False)
    try:
        backend.write_rows(r0, h)
        backend.set_crc(i, _block_crc(h))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError(f"Out of disk space writing feature block {i} to "
                             f"{backend.url!r}.") from None
        raise
    return np.ones((1, 1), dtype=np.uint8)


def _verify_block(backend, i: int, rows: int, expected: int, reset: bool) -> bool:
    """Whether block ``i`` matches its checksum ``expected``; with ``reset``, a block that
    does not has its checksum set to 0 (missing), so that the next build regenerates it."""
    try:
        ok = _block_crc(backend.read_rows(i * rows, (i + 1) * rows)) == expected
    except Exception:  # noqa: BLE001 - a damaged chunk that does not decode: regenerate it
        ok = False
    if not ok and reset:
        backend.set_crc(i, 0)
    return ok


def verify_blocks(backend, rows: int, *, reset: bool = True, crcs=None) -> int:
    """Check every written block against its checksum; return how many verify.

    One task per written block, run where the blocks are (the distributed client's workers
    if there is one, else dask's threaded scheduler); each reads its own block and, with
    ``reset``, marks a damaged block as missing itself. Only booleans come back.

    Parameters
    ----------
    backend : ZarrBackend or NpyBackend
        The store.
    rows : int
        Rows per block.
    reset : bool
        Reset the checksum of blocks that do not verify (False: only count).
    crcs : numpy.ndarray or None
        The store's checksums if already read.

    Returns
    -------
    int
        The number of written blocks whose data match their checksum.
    """
    stored = backend.crcs() if crcs is None else crcs
    check = dask.delayed(_verify_block, pure=False)
    tasks = [check(backend, int(i), rows, int(stored[i]), reset) for i in np.flatnonzero(stored)]
    if not tasks:
        return 0
    return int(sum(bool(ok) for ok in compute_all(tasks, "verify store")))


# --------------------------------------------------------------------------- building
def check_free_space(url: str, nbytes: int) -> None:
    """Refuse up front when a local store's disk cannot hold ``nbytes`` more."""
    if is_url(url):
        return
    d = os.path.abspath(local_path(url))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    free = shutil.disk_usage(d).free
    if free < nbytes:
        raise StoreError(f"Not enough disk space for the feature store at {url!r}: it needs "
                         f"{nbytes / 1e9:.2f} GB, the disk has {free / 1e9:.2f} GB free. Free "
                         "space, use float32 features, or point --store elsewhere.")


def _check_version(url: str, meta: dict) -> None:
    if not isinstance(meta.get("version"), int) or meta["version"] > STORE_VERSION:
        raise StoreError(f"Feature store {url!r} has format version {meta.get('version')!r}; "
                         f"this swimdist reads versions up to {STORE_VERSION}.")


def build_feature_store(X: da.Array, layers: list[Layer], url: str, *, fingerprint: str,
                        dtype="float64", columns=None, verify: bool = True,
                        store_format: str | None = None) -> tuple[da.Array, dict]:
    """Generate the features of ``X`` into the store at ``url``, resuming what is done.

    Parameters
    ----------
    X : dask.array.Array
        Inputs with regular row chunks; each chunk becomes one store block.
    layers : list of Layer
        The hidden layers.
    url : str
        Local path or fsspec URL of the store.
    fingerprint : str
        The job's fingerprint (:func:`fingerprint_job`); a store of another job is refused.
    dtype : str or numpy.dtype
        Feature dtype.
    columns : array-like or None
        Only these neurons of the last layer.
    verify : bool
        Check the blocks of an existing store against their checksums first (damaged ones
        are generated again).
    store_format : {"zarr", "npy"} or None
        Format of a new store (see :func:`~swimdist.store.backends.store_backend`).

    Returns
    -------
    features : dask.array.Array
        The features, read back lazily from the store.
    info : dict
        ``blocks`` (total), ``written`` (generated now), ``reused`` and ``verified``.
    """
    dtype = np.dtype(dtype)
    rows = X.chunks[0][0]
    if any(c != rows for c in X.chunks[0][:-1]) or X.chunks[0][-1] > rows:
        raise ValueError("X must have regular row chunks before building a store")
    width = layers[-1].width if columns is None else len(columns)
    n_blocks = len(X.chunks[0])
    shape = (X.shape[0], width)
    backend = store_backend(url, store_format)
    meta = backend.meta()
    reused = 0
    if meta is not None:
        _check_version(url, meta)
        if meta.get("fingerprint") != fingerprint:
            raise StoreError(
                f"Feature store {url!r} was produced by a different job (data, seed or "
                f"parameters differ: fingerprint {meta.get('fingerprint')} != {fingerprint}). "
                "It was left untouched; use another store path or delete it first.")
        if verify:
            reused = verify_blocks(backend, rows)
    else:
        check_free_space(url, int(np.prod(shape)) * dtype.itemsize)
        meta = {"format": STORE_FORMAT, "version": STORE_VERSION, "fingerprint": fingerprint,
                "shape": list(shape), "rows_per_block": rows, "dtype": dtype.str,
                "store_format": backend.kind, "complete": False}
        backend.create(shape, rows, n_blocks, dtype, meta)
    params = broadcast(list(layers))  # to every worker once, not embedded in the graph
    cols = None if columns is None else np.asarray(columns)
    done = X.map_blocks(_write_block, params, cols, dtype, backend,
                        chunks=((1,) * n_blocks, (1,)), dtype=np.uint8,
                        meta=np.empty((0, 0), np.uint8))
    written = int(compute(done, "features", unit="blocks").sum())
    meta["complete"] = True
    backend.set_meta(meta)
    return backend.array(rows), {"blocks": n_blocks, "written": written,
                                 "reused": n_blocks - written, "verified": reused}


def describe_store(url: str) -> dict:
    """What a feature store holds and how much of it is intact; changes nothing.

    Parameters
    ----------
    url : str
        Local path or fsspec URL of a Zarr or npy feature store.

    Returns
    -------
    dict
        ``format`` (zarr or npy), ``path``, ``version``, ``shape``, ``dtype``,
        ``rows_per_block``, ``cols_per_chunk`` (Zarr column tile; None for npy),
        ``fingerprint``, ``complete`` (the build finished and every block verifies) and
        ``blocks``: ``total``, ``written`` (a checksum is recorded) and ``verified`` (the
        checksum matches the block's data).

    Raises
    ------
    StoreError
        Nothing is there, the content is not a swimdist feature store, or its metadata is
        damaged.
    """
    backend = store_backend(url)
    meta = backend.meta()
    if meta is None:
        raise StoreError(f"Nothing at {url!r}: no swimdist feature store or model file there.")
    _check_version(url, meta)
    try:
        shape = [int(n) for n in meta["shape"]]
        rows = int(meta["rows_per_block"])
        dtype = np.dtype(meta["dtype"]).name
        cols = meta.get("cols_per_chunk")
        cols = None if backend.kind == "npy" or cols is None else int(cols)
        if len(shape) != 2 or rows < 1:
            raise ValueError(f"shape {shape}, rows per block {rows}")
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"Feature store {url!r} is damaged: its metadata is incomplete or "
                         f"invalid ({type(exc).__name__}: {exc}).") from None
    try:
        crcs = backend.crcs()
    except Exception as exc:  # noqa: BLE001 - zarr and numpy raise many types on bad files
        raise StoreError(f"Feature store {url!r} is damaged: its block checksums cannot be "
                         f"read ({type(exc).__name__}).") from None
    verified = verify_blocks(backend, rows, reset=False, crcs=crcs)
    return {
        "format": backend.kind,
        "path": str(url),
        "version": meta["version"],
        "shape": shape,
        "dtype": dtype,
        "rows_per_block": rows,
        "cols_per_chunk": cols,
        "fingerprint": meta.get("fingerprint"),
        # complete: the build finished and every block still verifies (a block damaged or
        # lost since is generated again by the next run of the job)
        "complete": bool(meta.get("complete", False)) and verified == len(crcs),
        "blocks": {"total": int(len(crcs)), "written": int(np.count_nonzero(crcs)),
                   "verified": verified},
    }


# --------------------------------------------------------------------------- temporary stores
def temporary_root() -> str:
    """The directory temporary feature stores go in: ``swimdist.store-root``, else the
    system's temporary directory."""
    return config.get("store-root") or tempfile.gettempdir()


def temporary_store_path() -> str:
    """A fresh directory for a temporary feature store (under ``swimdist.store-root``)."""
    root = config.get("store-root")
    if root:
        os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix="swimdist-features-", dir=root)


def remove_store(url: str) -> None:
    """Delete a (temporary) local store directory."""
    if not is_url(url):
        shutil.rmtree(local_path(url), ignore_errors=True)
