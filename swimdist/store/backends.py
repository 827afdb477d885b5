"""The two feature-store formats: Zarr v3 (any fsspec URL) and memory-mapped .npy files.

Zarr layout (a Zarr v3 group at a local path or any fsspec URL)::

    <store>/zarr.json             attributes["swimdist"]: format, version, fingerprint, shape
    <store>/features              N x M float array, chunks = (rows per block, column tile)
    <store>/block_crc             one uint64 per row block: crc32(block bytes) + 1, 0 = missing

npy layout (local disks only)::

    <store>/store.json            the same metadata
    <store>/features.npy          N x M float array
    <store>/block_crc.npy         one uint64 per row block

Both backends offer the same small interface: ``meta`` (read and validate the metadata),
``create``, ``set_meta``, ``crc`` / ``crcs`` / ``set_crc`` (block checksums), ``read_rows``,
``reader``, ``write_rows`` and ``array`` (the features as a lazy dask array). Backends are
small picklable objects: block tasks on workers carry them.
"""

from __future__ import annotations

import json
import os

import dask
import dask.array as da
import numpy as np
import zarr

from .. import config
from .._io import is_url, local_path, write_text_atomic
from ..exceptions import StoreError, ValidationError

__all__ = [
    "COLUMN_CHUNK",
    "STORE_FORMAT",
    "STORE_FORMATS",
    "STORE_VERSION",
    "NpyBackend",
    "ZarrBackend",
    "store_backend",
]

STORE_FORMAT = "swimdist.feature-store"
STORE_VERSION = 1
STORE_FORMATS = ("zarr", "npy")
#: Most neurons per Zarr chunk (column tiles; see ZarrBackend.create).
COLUMN_CHUNK = 5000


class ZarrBackend:
    """Zarr v3 group: ``features`` (chunks = row blocks), ``block_crc``, attrs["swimdist"]."""

    kind = "zarr"

    def __init__(self, url: str):
        self.url = url

    def meta(self) -> dict | None:
        """The store's swimdist metadata, None if nothing is there; refuses foreign data."""
        if not is_url(self.url):
            p = local_path(self.url)
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
        """Create the (empty) arrays and write ``meta`` (gains ``cols_per_chunk``)."""
        if not is_url(self.url):
            os.makedirs(local_path(self.url), exist_ok=True)
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
        """Replace the store's metadata."""
        zarr.open_group(store=self.url, mode="r+").attrs["swimdist"] = meta

    def _crc_array(self, mode: str = "r"):
        return zarr.open_group(store=self.url, mode=mode)["block_crc"]

    def crc(self, i: int) -> int:
        """The checksum of block ``i`` (0: missing); reads that one entry only."""
        arr = self._crc_array()
        try:
            return int(arr[i])
        except Exception:  # noqa: BLE001 - a damaged checksum chunk: the block counts as missing
            return 0

    def crcs(self) -> np.ndarray:
        """All block checksums (0: missing)."""
        arr = self._crc_array()
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
        """Record the checksum of block ``i`` (0: missing)."""
        self._crc_array("r+")[i] = value

    def _features(self, mode: str = "r"):
        return zarr.open_group(store=self.url, mode=mode)["features"]

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of the features."""
        return self._features()[r0:r1, :]

    def reader(self):
        """A function ``(r0, r1, c0, c1, view=False) -> block`` reading from one open array
        (``view`` is the memory-map form of the npy store; a zarr read always decodes)."""
        arr = self._features()
        return lambda r0, r1, c0, c1, view=False: arr[r0:r1, c0:c1]

    def write_rows(self, r0: int, h: np.ndarray) -> None:
        """Write ``h`` as the rows from ``r0`` on."""
        self._features("r+")[r0:r0 + h.shape[0], :] = h

    def array(self, rows: int) -> da.Array:
        """The features as a dask array of row blocks."""
        arr = self._features()
        return da.from_zarr(arr, chunks=(rows, arr.shape[1]))


class _NpyRows:
    """Picklable lazy row view of a .npy file, memory-mapped per read (worker-safe)."""

    def __init__(self, path: str):
        self.path = path
        m = np.load(path, mmap_mode="r")
        self.shape, self.dtype, self.ndim = m.shape, m.dtype, m.ndim

    def __getitem__(self, sl):
        return np.array(np.load(self.path, mmap_mode="r")[sl])


class _NpyReader:
    """Rows of a C-ordered 2-D .npy file read with ``readinto`` (see NpyBackend.reader).

    Written by hand: numpy offers only whole-file reads and memory maps, and neither
    reuses a caller's buffer."""

    def __init__(self, path: str):
        try:
            m = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:  # e.g. shorter than its header says
            raise StoreError(f"{path!r} cannot be read as the store's features ({exc}); the "
                             "store is damaged.") from None
        if m.ndim != 2 or not m.flags.c_contiguous:
            raise StoreError(f"{path!r} is not a C-ordered 2-D array; the store is damaged.")
        self.path, self.shape, self.dtype, self.offset = path, m.shape, m.dtype, int(m.offset)
        del m
        self._f = None
        self._buf = np.empty(0, dtype=self.dtype)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __call__(self, r0, r1, c0, c1, view=False):
        r0, r1 = max(0, int(r0)), min(self.shape[0], int(r1))
        k, ncols = max(0, r1 - r0), self.shape[1]
        if view:
            if self._buf.size < k * ncols:
                self._buf = np.empty(k * ncols, dtype=self.dtype)
            rows = self._buf[:k * ncols].reshape(k, ncols)
        else:
            rows = np.empty((k, ncols), dtype=self.dtype)
        if k:
            if self._f is None:
                self._f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open
            self._f.seek(self.offset + r0 * ncols * self.dtype.itemsize)
            mv, got = memoryview(rows.reshape(-1).view(np.uint8)), 0
            while got < mv.nbytes:
                n = self._f.readinto(mv[got:])
                if not n:
                    raise StoreError(f"{self.path!r} ends before row {r1}; the store is "
                                     "damaged.")
                got += n
        if c0 == 0 and c1 >= ncols:
            return rows
        return rows[:, c0:c1] if view else np.ascontiguousarray(rows[:, c0:c1])

    def __del__(self):
        if getattr(self, "_f", None) is not None:
            self._f.close()


class NpyBackend:
    """A directory of memory-mapped .npy files: ``features.npy``, ``block_crc.npy``,
    ``store.json``. Local disks only; every worker maps the same file."""

    kind = "npy"

    def __init__(self, url: str):
        if is_url(url):
            raise StoreError(f"store format 'npy' needs a local directory, not {url!r}; use "
                             "the zarr format for fsspec URLs.")
        self.dir = local_path(url)
        self.url = url

    def _p(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def meta(self) -> dict | None:
        """The store's swimdist metadata, None if nothing is there; refuses foreign data."""
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
        why = "shapes or dtypes differ"
        try:  # the files' own headers must agree with the store's metadata
            shape, rows = tuple(meta["shape"]), int(meta["rows_per_block"])
            # features.npy: its header only (rows cut short are found by their checksums
            # and generated again); block_crc.npy whole
            with open(self._p("features.npy"), "rb") as f:
                read = (np.lib.format.read_array_header_1_0
                        if np.lib.format.read_magic(f) == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                f_shape, _, f_dtype = read(f)
            crc = np.load(self._p("block_crc.npy"), mmap_mode="r")
            ok = (tuple(f_shape) == shape and f_dtype == np.dtype(meta["dtype"])
                  and crc.dtype == np.uint64 and crc.shape == (-(-shape[0] // rows),))
            del crc
        except Exception as exc:  # noqa: BLE001 - numpy raises many types for bad files
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            raise StoreError(f"Feature store {self.url!r} is damaged: its files do not match its "
                             f"metadata ({why}). It was left untouched; delete it to start over.")
        return meta

    def create(self, shape, rows, n_blocks, dtype, meta) -> None:
        """Create the (zeroed) files and write ``meta``."""
        os.makedirs(self.dir, exist_ok=True)
        np.lib.format.open_memmap(self._p("features.npy"), mode="w+", dtype=dtype,
                                  shape=shape).flush()
        np.lib.format.open_memmap(self._p("block_crc.npy"), mode="w+", dtype=np.uint64,
                                  shape=(n_blocks,)).flush()
        self.set_meta(meta)

    def set_meta(self, meta: dict) -> None:
        """Replace ``store.json`` atomically."""
        write_text_atomic(self._p("store.json"), json.dumps(meta))

    def crc(self, i: int) -> int:
        """The checksum of block ``i`` (0: missing); reads that one entry only."""
        m = np.load(self._p("block_crc.npy"), mmap_mode="r")
        try:
            return int(m[i])
        finally:
            del m

    def crcs(self) -> np.ndarray:
        """All block checksums (0: missing)."""
        return np.array(np.load(self._p("block_crc.npy"), mmap_mode="r"))

    def set_crc(self, i: int, value: int) -> None:
        """Record the checksum of block ``i`` (0: missing)."""
        m = np.load(self._p("block_crc.npy"), mmap_mode="r+")
        m[i] = value
        m.flush()

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of the features."""
        return np.array(np.load(self._p("features.npy"), mmap_mode="r")[r0:r1])

    def reader(self):
        """A function ``(r0, r1, c0, c1, view=False) -> block`` reading rows of the file.

        A new array by default; ``view=True`` reads the rows into one buffer that the
        reader reuses, so the block is valid until its next read (a pass over the store
        then costs one copy out of the page cache: memory-mapping every block instead spent
        more time in page faults and unmapping than in the products)."""
        return _NpyReader(self._p("features.npy"))

    def write_rows(self, r0: int, h: np.ndarray) -> None:
        """Write ``h`` as the rows from ``r0`` on."""
        m = np.load(self._p("features.npy"), mmap_mode="r+")
        m[r0:r0 + h.shape[0]] = h
        # no msync: the rows are in the page cache, which outlives this process; a block
        # lost to a machine crash fails its checksum when the store is opened again and is
        # generated again (build_store verifies every block it reuses)
        del m

    def array(self, rows: int) -> da.Array:
        """The features as a dask array of row blocks."""
        view = _NpyRows(self._p("features.npy"))
        return da.from_array(view, chunks=(rows, view.shape[1]), asarray=True,
                             name="swimdist-npy-" + dask.base.tokenize(self.dir, view.shape,
                                                                       os.path.getmtime(
                                                                           view.path)))


def store_backend(url: str, store_format: str | None = None):
    """The backend for ``url``.

    Parameters
    ----------
    url : str
        Local path or fsspec URL of the store.
    store_format : {"zarr", "npy"} or None
        Used for a new store; an existing local store keeps its own format (npy if the
        directory holds ``store.json``, zarr if it holds ``zarr.json``). Default:
        ``swimdist.store-format``, else zarr.

    Returns
    -------
    ZarrBackend or NpyBackend
    """
    if not is_url(url) and os.path.exists(os.path.join(local_path(url), "store.json")):
        store_format = "npy"  # an existing store keeps its own format
    elif not is_url(url) and os.path.exists(os.path.join(local_path(url), "zarr.json")):
        store_format = "zarr"
    if is_url(url):  # the URL's file system must be known and installed
        import fsspec

        try:
            fsspec.get_filesystem_class(url.split("://", 1)[0])
        except (ImportError, ValueError) as exc:
            raise StoreError(f"Cannot use the store URL {url!r}: {exc}") from None
    store_format = store_format or config.get("store-format") or "zarr"
    if store_format not in STORE_FORMATS:
        raise ValidationError(f"Unknown store format {store_format!r}; valid formats are: "
                              f"{', '.join(STORE_FORMATS)}.")
    return NpyBackend(url) if store_format == "npy" else ZarrBackend(url)
