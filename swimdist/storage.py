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

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
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

logger = logging.getLogger("swimdist.storage")

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
STORE_FORMATS = ("zarr", "npy")
#: Most neurons per Zarr chunk (column tiles; see _ZarrBackend.create).
COLUMN_CHUNK = 5000


class _ZarrBackend:
    """Zarr v3 group: ``features`` (chunks = row blocks), ``block_crc``, attrs["swimdist"]."""

    kind = "zarr"

    def __init__(self, url: str):
        self.url = url

    def meta(self) -> dict | None:
        """The store's swimdist metadata, None if nothing is there; refuses foreign data."""
        if not is_url(self.url):
            p = _local(self.url)
            if os.path.isfile(p):
                raise StoreError(f"Store path {self.url!r} is a file, not a swimdist feature "
                                 "store; choose a new or empty directory.")
            if not os.path.exists(p) or not os.listdir(p):
                return None
        try:
            grp = zarr.open_group(store=self.url, mode="r")
        except Exception as exc:  # noqa: BLE001 - zarr raises several types for foreign data
            if not is_url(self.url):
                raise StoreError(
                    f"{self.url!r} is not empty and is not a swimdist feature store "
                    f"({type(exc).__name__}); it was left untouched. Choose a new or empty "
                    "directory.") from None
            return None
        meta = grp.attrs.get("swimdist")
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.url!r} holds a Zarr group that is not a swimdist feature "
                             "store; it was left untouched. Choose a new or empty location.")
        why = "shapes, chunks or dtypes differ"
        try:  # the arrays' own metadata must agree with the store's
            shape, rows = tuple(meta["shape"]), int(meta["rows_per_block"])
            feats, crc = grp["features"], grp["block_crc"]
            cols = int(meta.get("cols_per_chunk", shape[1]))
            ok = (feats.shape == shape and feats.chunks == (rows, cols)
                  and feats.dtype == np.dtype(meta["dtype"]) and crc.dtype == np.uint64
                  and crc.shape == (-(-shape[0] // rows),))
        except Exception as exc:  # noqa: BLE001 - zarr raises many types for bad metadata
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            raise StoreError(f"Feature store {self.url!r} is damaged: its arrays do not match its "
                             f"metadata ({why}). It was left untouched; delete it to start over.")
        return dict(meta)

    def create(self, shape, rows, n_blocks, dtype, meta) -> None:
        if not is_url(self.url):
            os.makedirs(_local(self.url), exist_ok=True)
        grp = zarr.open_group(store=self.url, mode="w")
        # Column tiles of at most COLUMN_CHUNK neurons: a row-block task writes whole chunks
        # (aligned writes), and column-tile readers (the tiled Gram) read only their columns.
        cols = meta["cols_per_chunk"] = min(shape[1], COLUMN_CHUNK)
        grp.create_array("features", shape=shape, chunks=(rows, cols), dtype=dtype,
                         compressors=None, fill_value=0)
        grp.create_array("block_crc", shape=(n_blocks,), chunks=(1,), dtype="uint64",
                         fill_value=0)
        grp.attrs["swimdist"] = meta

    def set_meta(self, meta: dict) -> None:
        zarr.open_group(store=self.url, mode="r+").attrs["swimdist"] = meta

    def crcs(self) -> np.ndarray:
        arr = zarr.open_group(store=self.url, mode="r")["block_crc"]
        try:
            return arr[:]
        except Exception:  # noqa: BLE001 - a damaged checksum chunk: that block counts as missing
            out = np.zeros(arr.shape, dtype=np.uint64)
            for i in range(arr.shape[0]):
                try:
                    out[i] = arr[i]
                except Exception:  # noqa: BLE001
                    continue
            return out

    def set_crc(self, i: int, value: int) -> None:
        zarr.open_group(store=self.url, mode="r+")["block_crc"][i] = value

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        return zarr.open_group(store=self.url, mode="r")["features"][r0:r1, :]

    def reader(self):
        """A function ``(r0, r1, c0, c1) -> block`` reading from one open array."""
        arr = zarr.open_group(store=self.url, mode="r")["features"]
        return lambda r0, r1, c0, c1: arr[r0:r1, c0:c1]

    def write_rows(self, r0: int, h: np.ndarray) -> None:
        zarr.open_group(store=self.url, mode="r+")["features"][r0:r0 + h.shape[0], :] = h

    def array(self, rows: int) -> da.Array:
        arr = zarr.open_group(store=self.url, mode="r")["features"]
        return da.from_zarr(arr, chunks=(rows, arr.shape[1]))


class _NpyRows:
    """Picklable lazy row view of a .npy file, memory-mapped per read (worker-safe)."""

    def __init__(self, path: str):
        self.path = path
        m = np.load(path, mmap_mode="r")
        self.shape, self.dtype, self.ndim = m.shape, m.dtype, m.ndim

    def __getitem__(self, sl):
        return np.array(np.load(self.path, mmap_mode="r")[sl])


class _NpyBackend:
    """A directory of memory-mapped .npy files: ``features.npy``, ``block_crc.npy``,
    ``store.json``. Local disks only; every worker maps the same file."""

    kind = "npy"

    def __init__(self, url: str):
        if is_url(url):
            raise StoreError(f"store format 'npy' needs a local directory, not {url!r}; use "
                             "the zarr format for fsspec URLs.")
        self.dir = _local(url)
        self.url = url

    def _p(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def meta(self) -> dict | None:
        if os.path.isfile(self.dir):
            raise StoreError(f"Store path {self.url!r} is a file, not a swimdist feature store; "
                             "choose a new or empty directory.")
        if not os.path.exists(self.dir) or not os.listdir(self.dir):
            return None
        try:
            with open(self._p("store.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.url!r} is not empty and is not a swimdist feature store; "
                             "it was left untouched. Choose a new or empty directory.")
        return meta

    def create(self, shape, rows, n_blocks, dtype, meta) -> None:
        os.makedirs(self.dir, exist_ok=True)
        np.lib.format.open_memmap(self._p("features.npy"), mode="w+", dtype=dtype,
                                  shape=shape).flush()
        np.lib.format.open_memmap(self._p("block_crc.npy"), mode="w+", dtype=np.uint64,
                                  shape=(n_blocks,)).flush()
        self.set_meta(meta)

    def set_meta(self, meta: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, self._p("store.json"))

    def crcs(self) -> np.ndarray:
        return np.array(np.load(self._p("block_crc.npy"), mmap_mode="r"))

    def set_crc(self, i: int, value: int) -> None:
        m = np.load(self._p("block_crc.npy"), mmap_mode="r+")
        m[i] = value
        m.flush()

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        return np.array(np.load(self._p("features.npy"), mmap_mode="r")[r0:r1])

    def reader(self):
        """A function ``(r0, r1, c0, c1) -> block`` reading from one memory map."""
        path = self._p("features.npy")

        def read(r0, r1, c0, c1):
            m = np.load(path, mmap_mode="r")
            out = np.array(m[r0:r1, c0:c1])
            del m  # unmap: mapped pages must not pile up in the worker's RSS
            return out

        return read

    def write_rows(self, r0: int, h: np.ndarray) -> None:
        m = np.load(self._p("features.npy"), mmap_mode="r+")
        m[r0:r0 + h.shape[0]] = h
        m.flush()

    def array(self, rows: int) -> da.Array:
        view = _NpyRows(self._p("features.npy"))
        return da.from_array(view, chunks=(rows, view.shape[1]), asarray=True,
                             name="swimdist-npy-" + dask.base.tokenize(self.dir, view.shape,
                                                                       os.path.getmtime(
                                                                           view.path)))


def store_backend(url: str, store_format: str | None = None):
    """The backend for ``url``: ``store_format`` if given, else what is there (npy if the
    directory holds ``store.json``), else zarr."""
    if not is_url(url) and os.path.exists(os.path.join(_local(url), "store.json")):
        store_format = "npy"  # an existing store keeps its own format
    elif not is_url(url) and os.path.exists(os.path.join(_local(url), "zarr.json")):
        store_format = "zarr"
    store_format = store_format or config.get("store-format") or "zarr"
    if store_format not in STORE_FORMATS:
        raise ValidationError(f"Unknown store format {store_format!r}; valid formats are: "
                              f"{', '.join(STORE_FORMATS)}.")
    return _NpyBackend(url) if store_format == "npy" else _ZarrBackend(url)


def _existing_group(url: str):
    """Metadata of the store at ``url`` (None if empty); refuses foreign content."""
    return store_backend(url).meta()


def _block_crc(h: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(h).view(np.uint8)) + 1


def _write_block(x, params, columns, dtype, backend, block_info=None):
    """Generate one row block of features and write it, then its checksum (one task)."""
    from .features import _forward

    info = block_info[0]
    i = info["chunk-location"][0]
    r0 = info["array-location"][0][0]
    if int(backend.crcs()[i]) != 0:
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


def _verify_blocks(backend, rows: int) -> int:
    """Reset the checksum of blocks whose data do not verify; return how many were good."""
    stored = backend.crcs()
    good = 0
    for i in np.flatnonzero(stored):
        try:
            ok = _block_crc(backend.read_rows(i * rows, (i + 1) * rows)) == int(stored[i])
        except Exception:  # noqa: BLE001 - a damaged chunk that does not decode: regenerate it
            ok = False
        if ok:
            good += 1
        else:
            backend.set_crc(i, 0)
    return good


def check_free_space(url: str, nbytes: int) -> None:
    """Refuse up front when a local store's disk cannot hold ``nbytes`` more."""
    if is_url(url):
        return
    d = os.path.abspath(_local(url))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    free = shutil.disk_usage(d).free
    if free < nbytes:
        raise StoreError(f"Not enough disk space for the feature store at {url!r}: it needs "
                         f"{nbytes / 1e9:.2f} GB, the disk has {free / 1e9:.2f} GB free. Free "
                         "space, use float32 features, or point --store elsewhere.")


def build_feature_store(X: da.Array, layers: list[Layer], url: str, *, fingerprint: str,
                        dtype="float64", columns=None, verify: bool = True,
                        store_format: str | None = None) -> tuple[da.Array, dict]:
    """Generate the features of ``X`` into the store at ``url``, resuming what is done.

    ``X`` must be a dask array with regular row chunks; each chunk becomes one store chunk.
    Blocks already written and whose checksums verify are not generated again. Returns the
    features read back lazily from the store and a dict of what was done.
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
        if not isinstance(meta.get("version"), int) or meta["version"] > STORE_VERSION:
            raise StoreError(f"Feature store {url!r} has format version {meta.get('version')!r}; "
                             f"this swimdist reads versions up to {STORE_VERSION}.")
        if meta.get("fingerprint") != fingerprint:
            raise StoreError(
                f"Feature store {url!r} was produced by a different job (data, seed or "
                f"parameters differ: fingerprint {meta.get('fingerprint')} != {fingerprint}). "
                "It was left untouched; use another store path or delete it first.")
        if verify:
            reused = _verify_blocks(backend, rows)
    else:
        check_free_space(url, int(np.prod(shape)) * dtype.itemsize)
        meta = {"format": STORE_FORMAT, "version": STORE_VERSION, "fingerprint": fingerprint,
                "shape": list(shape), "rows_per_block": rows, "dtype": dtype.str,
                "store_format": backend.kind, "complete": False}
        backend.create(shape, rows, n_blocks, dtype, meta)
    params = dask.delayed(list(layers), pure=True)
    cols = None if columns is None else np.asarray(columns)
    done = X.map_blocks(_write_block, params, cols, dtype, backend,
                        chunks=((1,) * n_blocks, (1,)), dtype=np.uint8,
                        meta=np.empty((0, 0), np.uint8))
    written = int(compute_with_progress(done.sum(), "features"))
    meta["complete"] = True
    backend.set_meta(meta)
    return backend.array(rows), {"blocks": n_blocks, "written": written,
                                 "reused": n_blocks - written, "verified": reused}


def compute_with_progress(x, label: str = ""):
    """Compute a dask collection; with ``swimdist.progress`` set and a distributed client,
    show distributed's progress bar while it runs."""
    if config.get("progress", False):
        try:
            from distributed import get_client, progress

            client = get_client()
        except (ImportError, ValueError):
            return x.compute()
        fut = client.compute(x)
        if sys.stderr.isatty():
            progress(fut)
        return fut.result()
    return x.compute()


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



# --------------------------------------------------------------------------- solve checkpoints
def save_npy_atomic(directory: str, name: str, arr: np.ndarray) -> str:
    """Write ``arr`` as ``<directory>/<name>.npy`` atomically (a temporary file moved over
    the target); returns the path. Runs on workers too (local or shared filesystems)."""
    path = os.path.join(directory, name + ".npy")
    _write_atomic(path, lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))
    return path


def _write_atomic(path: str, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, synced, then moved over it: a
    reader sees the old file or the whole new one, never a part."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class SolveCheckpoint:
    """Intermediate results of a solve kept beside a local feature store (``<store>.solve``),
    so that a solve interrupted by Ctrl-C, a killed process or a lost machine resumes.

    The directory records what it belongs to (the store's job fingerprint plus the solver's
    parameters, see :meth:`open`); a checkpoint of any other job or parameters is discarded,
    never mixed in. Files are written atomically and read without unpickling; an unreadable
    one counts as missing. :meth:`remove` deletes it once the model is safe.
    """

    def __init__(self, path: str, fingerprint: str):
        self.path = os.path.abspath(path)
        self.fingerprint = fingerprint

    @classmethod
    def for_store(cls, url: str, fingerprint: str) -> SolveCheckpoint | None:
        """The checkpoint of a local store (None for fsspec URLs)."""
        if is_url(url):
            return None
        return cls(_local(url).rstrip("/\\") + ".solve", fingerprint)

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
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.path)
            with os.fdopen(fd, "w") as f:
                json.dump(key, f)
            os.replace(tmp, meta)
        return self

    def save_npy(self, name: str, arr: np.ndarray) -> str:
        return save_npy_atomic(self.path, name, arr)

    def load_npy(self, name: str) -> np.ndarray | None:
        try:
            return np.load(os.path.join(self.path, name + ".npy"), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None

    def save(self, name: str, **arrays: np.ndarray) -> None:
        _write_atomic(os.path.join(self.path, name + ".npz"), lambda f: np.savez(f, **arrays))

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        try:
            with np.load(os.path.join(self.path, name + ".npz"), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError):
            return None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


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
    _write_atomic(_local(path), lambda f: np.savez(f, **payload))


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
    if isinstance(meta.get("version"), bool) or not isinstance(meta.get("version"), int):
        raise StoreError(f"Model {path!r} has no valid format version ({meta.get('version')!r}).")
    if meta["version"] > MODEL_VERSION:
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

        try:
            with h5py.File(self.path, "r") as f:
                return f[self.key][sl]
        except Exception as exc:  # noqa: BLE001 - h5py raises several types on bad data
            raise _read_error(self.path, exc) from None


class _ZarrRows:
    """Picklable lazy view of a Zarr array whose read errors name the file (a damaged chunk
    otherwise surfaces as a bare codec error from deep inside a dask task)."""

    def __init__(self, arr, path: str):
        self.arr, self.path = arr, path
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __getitem__(self, sl):
        try:
            return self.arr[sl]
        except Exception as exc:  # noqa: BLE001 - zarr and its codecs raise many types
            raise _read_error(self.path, exc) from None


def _read_error(path: str, exc: Exception) -> ValidationError:
    return ValidationError(f"Could not read data from {path!r} ({type(exc).__name__}: {exc}); "
                           "the file may be damaged or truncated.")


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
            return da.from_array(_ZarrRows(arr, p), chunks=arr.chunks, asarray=True,
                                 name="zarr-" + dask.base.tokenize(p, key, arr.shape,
                                                                   str(arr.dtype)))
    except (ValidationError, StoreError):
        raise
    except FileNotFoundError:
        raise ValidationError(f"Input file {p!r} does not exist.") from None
    except Exception as exc:  # noqa: BLE001 - format libraries raise many types
        raise ValidationError(f"Could not read {p!r} ({exc.__class__.__name__}: {exc}).") from None
    raise ValidationError(f"Unknown input format for {p!r}; use .npy, .npz, .h5/.hdf5 or .zarr.")


# --------------------------------------------------------------------------- locking
class StoreLock:
    """An exclusive lease on a feature store, held by one job at a time.

    The lease is a small JSON object ``<store>.lock`` (beside the store, so it never mixes
    with store content) holding the owner and an expiry time that a background thread renews;
    a job that dies stops renewing, and its lease lapses after ``ttl`` seconds, so a dead job
    never holds a store forever. A live owner on this host is also detected by its pid.
    Works for local paths and fsspec URLs (object stores: best effort, no compare-and-swap).
    """

    def __init__(self, url: str, *, ttl: float = 60.0):
        self.url = str(url).rstrip("/")
        self.path = self.url + ".lock"
        self.ttl = ttl
        self.token = f"{os.getpid()}-{os.urandom(6).hex()}"
        self._stop = None

    def _fs(self):
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.path if is_url(self.path) else _local(self.path))
        return fs, path

    def _read(self):
        fs, path = self._fs()
        try:
            with fs.open(path, "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}

    def _write(self) -> None:
        import socket
        import time as _time

        fs, path = self._fs()
        rec = {"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
               "expires": _time.time() + self.ttl}
        if not is_url(self.path):
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-lock-", dir=d)
            with os.fdopen(fd, "w") as f:
                json.dump(rec, f)
            os.replace(tmp, path)
        else:
            with fs.open(path, "w") as f:
                json.dump(rec, f)

    def _held_by_other(self, rec) -> str | None:
        import socket
        import time as _time

        if not rec or rec.get("token") == self.token:
            return None
        alive = rec.get("expires", 0) > _time.time()
        if alive and rec.get("host") == socket.gethostname():
            try:
                os.kill(int(rec.get("pid", -1)), 0)
            except (OSError, ValueError):
                alive = False  # the owner process is gone: a stale lease
        if alive:
            return f"pid {rec.get('pid')} on {rec.get('host')}"
        return None

    def acquire(self) -> StoreLock:
        import threading

        if not is_url(self.path):
            # O_EXCL creation makes two local jobs racing for a free store see each other.
            path = _local(self.path)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
            except FileExistsError:
                owner = self._held_by_other(self._read())
                if owner:
                    raise StoreError(f"Feature store {self.url!r} is in use by another job "
                                     f"({owner}); wait for it or use another store.") from None
        else:
            owner = self._held_by_other(self._read())
            if owner:
                raise StoreError(f"Feature store {self.url!r} is in use by another job "
                                 f"({owner}); wait for it or use another store.")
        self._write()
        self._stop = threading.Event()

        def renew():
            while not self._stop.wait(self.ttl / 3):
                try:
                    self._write()
                except Exception:  # noqa: BLE001 - renewal is best effort
                    logging.getLogger("swimdist.storage").warning("could not renew lock %s",
                                                                  self.path)

        threading.Thread(target=renew, daemon=True, name="swimdist-store-lock").start()
        return self

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        rec = self._read()
        if rec and rec.get("token") == self.token:
            fs, path = self._fs()
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
