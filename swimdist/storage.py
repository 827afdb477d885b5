"""Feature stores (Zarr v3), model files (.npz + JSON, no pickle) and array inputs.

Feature store layout (a Zarr v3 group at a local path or any fsspec URL)::

    <store>/zarr.json             attributes["swimdist"]: format, version, fingerprint, shape
    <store>/features              N x M float array, chunks = (rows per block, M)
    <store>/block_crc             one uint64 per row block: crc32(block bytes) + 1, 0 = missing

Every row block is generated and written by one task on a worker, which writes its data
chunk and then its own ``block_crc`` entry (separate chunks, so no two tasks ever write the
same chunk); a block is reused on a later run only when its checksum verifies. A store
records the fingerprint of what produced it and refuses to serve a different job.
"""

from __future__ import annotations

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
import zarr

from . import config
from .exceptions import StoreError, ValidationError
from .sampling import Layer

STORE_FORMAT = "swimdist.feature-store"
STORE_VERSION = 1
MODEL_FORMAT = "swimdist.model"
MODEL_VERSION = 1


# --------------------------------------------------------------------------- helpers
def is_url(path: str) -> bool:
    """True for an fsspec URL other than a plain local path or ``file://``."""
    return "://" in str(path) and not str(path).startswith("file://")


def _local(path: str) -> str:
    return str(path)[len("file://"):] if str(path).startswith("file://") else str(path)


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
        else:
            h.update(json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- feature store
def _existing_group(url: str):
    """The swimdist group at ``url``, None if nothing is there; refuses foreign content."""
    if not is_url(url):
        p = _local(url)
        if os.path.isfile(p):
            raise StoreError(f"Store path {url!r} is a file, not a swimdist feature store; "
                             "choose a new or empty directory.")
        if not os.path.exists(p) or not os.listdir(p):
            return None
    try:
        grp = zarr.open_group(store=url, mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for foreign data
        if not is_url(url):
            raise StoreError(
                f"{url!r} is not empty and is not a swimdist feature store "
                f"({type(exc).__name__}); it was left untouched. Choose a new or empty "
                "directory."
            ) from None
        return None
    meta = grp.attrs.get("swimdist")
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise StoreError(f"{url!r} holds a Zarr group that is not a swimdist feature store; "
                         "it was left untouched. Choose a new or empty location.")
    if int(meta.get("version", 0)) > STORE_VERSION:
        raise StoreError(f"Feature store {url!r} has format version {meta.get('version')}, "
                         f"newer than this swimdist understands ({STORE_VERSION}); upgrade.")
    return grp


def _write_block(x, params, columns, dtype, url, block_info=None):
    """Generate one row block of features and write it and its checksum (one task)."""
    from .features import _forward

    info = block_info[0]
    i = info["chunk-location"][0]
    r0, r1 = info["array-location"][0]
    grp = zarr.open_group(store=url, mode="r+")
    crc = grp["block_crc"]
    if int(crc[i]) != 0:
        return np.zeros((1, 1), dtype=np.uint8)  # already written and verified
    h = _forward(x, params, columns, dtype, False)
    grp["features"][r0:r1, :] = h
    crc[i] = zlib.crc32(np.ascontiguousarray(h).view(np.uint8)) + 1
    return np.ones((1, 1), dtype=np.uint8)


def _verify_blocks(url: str, n_blocks: int, rows: int) -> int:
    """Reset the checksum of blocks whose data do not verify; return how many were good."""
    grp = zarr.open_group(store=url, mode="r+")
    crc, feats = grp["block_crc"], grp["features"]
    stored = crc[:]
    good = 0
    for i in np.flatnonzero(stored):
        h = feats[i * rows:(i + 1) * rows, :]
        if zlib.crc32(np.ascontiguousarray(h).view(np.uint8)) + 1 == int(stored[i]):
            good += 1
        else:
            crc[i] = 0
    return good


def build_feature_store(X: da.Array, layers: list[Layer], url: str, *, fingerprint: str,
                        dtype="float64", columns=None, verify: bool = True) -> tuple[da.Array, dict]:
    """Generate the features of ``X`` into the Zarr store at ``url`` (resuming if possible).

    ``X`` must be a dask array with regular row chunks; each chunk becomes one store chunk.
    Returns the features read back lazily from the store and a dict of what was done.
    """
    dtype = np.dtype(dtype)
    rows = X.chunks[0][0]
    if any(c != rows for c in X.chunks[0][:-1]) or X.chunks[0][-1] > rows:
        raise ValueError("X must have regular row chunks before building a store")
    width = layers[-1].width if columns is None else len(columns)
    n_blocks = len(X.chunks[0])
    shape = (X.shape[0], width)
    grp = _existing_group(url)
    reused = 0
    if grp is not None:
        meta = grp.attrs["swimdist"]
        if meta.get("fingerprint") != fingerprint:
            raise StoreError(
                f"Feature store {url!r} was produced by a different job (data, seed or "
                f"parameters differ: fingerprint {meta.get('fingerprint')} != {fingerprint}). "
                "It was left untouched; use another store path or delete it first."
            )
        if verify:
            reused = _verify_blocks(url, n_blocks, rows)
    else:
        if not is_url(url):
            os.makedirs(_local(url), exist_ok=True)
        grp = zarr.open_group(store=url, mode="w")
        grp.create_array("features", shape=shape, chunks=(rows, width), dtype=dtype,
                         compressors=None, fill_value=0)
        grp.create_array("block_crc", shape=(n_blocks,), chunks=(1,), dtype="uint64",
                         fill_value=0)
        grp.attrs["swimdist"] = {
            "format": STORE_FORMAT, "version": STORE_VERSION, "fingerprint": fingerprint,
            "shape": list(shape), "rows_per_block": rows, "dtype": dtype.str,
            "complete": False,
        }
    params = dask.delayed(list(layers), pure=True)
    cols = None if columns is None else np.asarray(columns)
    done = X.map_blocks(_write_block, params, cols, dtype, url, chunks=((1,) * n_blocks, (1,)),
                        dtype=np.uint8, meta=np.empty((0, 0), np.uint8))
    written = int(done.sum().compute())
    grp = zarr.open_group(store=url, mode="r+")
    meta = dict(grp.attrs["swimdist"])
    meta["complete"] = True
    grp.attrs["swimdist"] = meta
    H = da.from_zarr(grp["features"], chunks=(rows, width))
    return H, {"blocks": n_blocks, "written": written, "reused": n_blocks - written,
               "verified": reused}


def temporary_store_path() -> str:
    """A fresh directory for a temporary feature store (under ``swimdist.store-root``)."""
    root = config.get("store-root")
    if root:
        os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix="swimdist-features-", dir=root)


def remove_store(url: str) -> None:
    """Delete a (temporary) local store directory."""
    if not is_url(url):
        shutil.rmtree(_local(url), ignore_errors=True)


# --------------------------------------------------------------------------- models
def save_arrays(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write arrays and JSON metadata as one .npz file, atomically (never half-written).

    A local file is written beside its target and moved over it with ``os.replace``; an
    fsspec URL is written as one object (object stores replace objects atomically).
    """
    payload = dict(arrays)
    for k, v in payload.items():
        if np.asarray(v).dtype == object:
            raise ValidationError(f"Model array {k!r} has dtype object; models hold plain "
                                  "numeric or string arrays only.")
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    if is_url(path):
        import fsspec

        with fsspec.open(path, "wb") as f:
            np.savez(f, **payload)
        return
    path = _local(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_arrays(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`save_arrays`; never unpickles anything."""
    try:
        if is_url(path):
            import fsspec

            with fsspec.open(path, "rb") as f:
                data = f.read()
            import io

            npz = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            npz = np.load(_local(path), allow_pickle=False)
        with npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise StoreError(f"No model file at {path!r}.") from None
    except Exception as exc:  # noqa: BLE001 - numpy/zipfile raise many types on bad files
        raise StoreError(f"{path!r} is not a readable swimdist model file ({exc}).") from None
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except Exception:  # noqa: BLE001
        raise StoreError(f"{path!r} is not a swimdist model file (no metadata).") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise StoreError(f"{path!r} is not a swimdist model file.")
    if int(meta.get("version", 0)) > MODEL_VERSION:
        raise StoreError(f"Model {path!r} has format version {meta.get('version')}, newer than "
                         f"this swimdist understands ({MODEL_VERSION}); upgrade swimdist.")
    return arrays, meta


# --------------------------------------------------------------------------- inputs
class _H5Rows:
    """Picklable lazy view of an HDF5 dataset: opens the file per read (worker-safe).

    h5py objects cannot be pickled to workers, so ``dask.array.from_array`` on an open
    dataset only works with the threaded scheduler; this wrapper works everywhere.
    """

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        import h5py

        with h5py.File(path, "r") as f:
            ds = f[key]
            self.shape, self.dtype = ds.shape, ds.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, sl):
        import h5py

        with h5py.File(self.path, "r") as f:
            return f[self.key][sl]


def load_array(path: str, key: str | None = None, *, chunk_rows: int | None = None):
    """Load an array from .npy, .npz, HDF5 (.h5/.hdf5) or Zarr (.zarr / fsspec URL).

    .npy is memory-mapped; HDF5 and Zarr come back as lazy dask arrays chunked by rows.
    """
    p = str(path)
    low = p.lower().rstrip("/")
    try:
        if low.endswith(".npy"):
            return np.load(_local(p), mmap_mode="r", allow_pickle=False)
        if low.endswith(".npz"):
            with np.load(_local(p), allow_pickle=False) as z:
                if key not in z.files:
                    raise ValidationError(f"{p!r} has no array {key!r}; it has {z.files}.")
                return z[key]
        if low.endswith((".h5", ".hdf5", ".he5")):
            import h5py

            with h5py.File(_local(p), "r") as f:
                if key not in f:
                    raise ValidationError(f"{p!r} has no dataset {key!r}; it has {list(f)}.")
            view = _H5Rows(_local(p), key)
            rows = chunk_rows or config.get("chunk-rows")
            return da.from_array(view, chunks=(rows,) + view.shape[1:], asarray=True,
                                 name="h5-" + dask.base.tokenize(p, key, os.path.getmtime(p)))
        if low.endswith(".zarr") or is_url(p):
            node = zarr.open(store=p, mode="r")
            arr = node[key] if isinstance(node, zarr.Group) else node
            return da.from_zarr(arr)
    except (ValidationError, StoreError):
        raise
    except FileNotFoundError:
        raise ValidationError(f"Input file {p!r} does not exist.") from None
    except Exception as exc:  # noqa: BLE001 - format libraries raise many types
        raise ValidationError(f"Could not read {p!r} ({exc.__class__.__name__}: {exc}).") from None
    raise ValidationError(f"Unknown input format for {p!r}; use .npy, .npz, .h5/.hdf5 or .zarr.")
