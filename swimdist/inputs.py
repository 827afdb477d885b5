"""Array inputs: .npy, .npz, HDF5 and Zarr files (local paths or fsspec URLs).

HDF5 and Zarr inputs come back as lazy dask arrays whose blocks are read by picklable
views (:class:`_H5Rows`, :class:`_ZarrRows`), so they work on any scheduler and name the
file when a read fails. A .npy file comes back memory-mapped; ``fit`` turns such a map into
a dask array of the same kind (:func:`file_backed`), so the workers read its row blocks
and the client never holds it.
"""

from __future__ import annotations

import os

import dask
import dask.array as da
import numpy as np
import zarr

from . import config
from ._io import is_url, local_path
from .exceptions import StoreError, ValidationError

__all__ = ["file_backed", "load_array"]


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


class _NpyRows:
    """Picklable lazy view of a memory-mapped .npy file: each read maps the file on the
    process that reads (a worker), so its rows never pass through the client."""

    def __init__(self, path: str, offset: int, shape, dtype, order: str):
        self.path, self.offset, self.order = path, int(offset), order
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, sl):
        try:
            m = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                          shape=self.shape, order=self.order)
            return np.array(m[sl])
        except Exception as exc:  # noqa: BLE001 - the file may have changed or gone
            raise _read_error(self.path, exc) from None


def file_backed(X) -> da.Array | None:
    """A memory map of a whole file (``np.load(..., mmap_mode="r")``, not a slice of one) as
    a lazy dask array whose row blocks are read where they are computed (on the workers),
    or None for anything else."""
    import mmap

    if not (isinstance(X, np.memmap) and isinstance(X.base, mmap.mmap)
            and getattr(X, "filename", None) and X.ndim == 2):
        return None
    order = "F" if X.flags.f_contiguous and not X.flags.c_contiguous else "C"
    view = _NpyRows(X.filename, X.offset, X.shape, X.dtype, order)
    rows = int(config.get("chunk-rows"))
    return da.from_array(view, chunks=(rows, -1), asarray=True,
                         name="npy-" + dask.base.tokenize(X.filename, X.offset, X.shape,
                                                          str(X.dtype),
                                                          os.path.getmtime(X.filename)))


def _read_error(path: str, exc: Exception) -> ValidationError:
    return ValidationError(f"Could not read data from {path!r} ({type(exc).__name__}: {exc}); "
                           "the file may be damaged or truncated.")


def holds_one_array(path) -> bool:
    """Whether ``path`` is a single array (.npy, or a Zarr array rather than a group), which
    has no names for inputs and targets."""
    p = str(path).lower().rstrip("/")
    if p.endswith(".npy"):
        return os.path.isfile(local_path(str(path)))  # a missing one: load_array says so
    if p.endswith(".zarr") or is_url(str(path)):
        try:
            return not isinstance(zarr.open(store=str(path), mode="r"), zarr.Group)
        except Exception:  # noqa: BLE001 - unreadable: load_array says why
            return False
    return False


def load_array(path: str, key: str | None = None, *, chunk_rows: int | None = None):
    """Load an array from .npy, .npz, HDF5 (.h5/.hdf5) or Zarr (.zarr / fsspec URL).

    .npy is memory-mapped; HDF5 and Zarr come back as lazy dask arrays chunked by rows.

    Parameters
    ----------
    path : str
        The file (a local path; Zarr also an fsspec URL).
    key : str or None
        The array's name inside .npz, HDF5 or a Zarr group.
    chunk_rows : int or None
        Rows per block of an HDF5 input (default ``swimdist.chunk-rows``).

    Returns
    -------
    numpy.ndarray or dask.array.Array

    Raises
    ------
    ValidationError
        A missing, unknown or unreadable input, or no array ``key`` in it.
    """
    p = str(path)
    low = p.lower().rstrip("/")
    try:
        if low.endswith(".npy"):
            return np.load(local_path(p), mmap_mode="r", allow_pickle=False)
        if low.endswith(".npz"):
            with np.load(local_path(p), allow_pickle=False) as z:
                if key not in z.files:
                    raise ValidationError(f"{p!r} has no array {key!r}; it has {z.files}.")
                return z[key]
        if low.endswith((".h5", ".hdf5", ".he5")):
            import h5py

            with h5py.File(local_path(p), "r") as f:
                if key not in f:
                    raise ValidationError(f"{p!r} has no dataset {key!r}; it has {list(f)}.")
            view = _H5Rows(local_path(p), key)
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
