"""Datasets: the embedded sine problem, MNIST from the standard IDX files, generic inputs."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import urllib.request
import zlib

import numpy as np

from . import config
from ._io import write_atomic
from .exceptions import ValidationError

logger = logging.getLogger("swimdist.datasets")


def sine(n: int, *, alpha: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The seed report's regression problem ``f(x, y) = sin(alpha (x + y))`` on ``[0, 1]^2``.

    Returns ``X`` (n, 2) uniform on the unit square and ``y`` (n,).
    """
    if int(n) < 1:
        raise ValidationError(f"sine needs n >= 1 samples; got {n!r}.")
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, 1.0, size=(int(n), 2))
    return X, np.sin(alpha * X.sum(axis=1))


# --------------------------------------------------------------------------- MNIST
MNIST_FILES = {
    "train-images": ("train-images-idx3-ubyte.gz",
                     "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971"),
    "train-labels": ("train-labels-idx1-ubyte.gz",
                     "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203"),
    "test-images": ("t10k-images-idx3-ubyte.gz",
                    "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be"),
    "test-labels": ("t10k-labels-idx1-ubyte.gz",
                    "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b"),
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array; checks the header and length."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValidationError(f"IDX file {path!r} does not exist.") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise ValidationError(f"IDX file {path!r} is corrupt or truncated ({exc}).") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValidationError(f"{path!r} is not an IDX file (bad magic number).")
    ndim = data[3]
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise ValidationError(f"IDX file {path!r} has a truncated header.")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    body = memoryview(data)[4 + 4 * ndim:]
    if len(body) != need:
        raise ValidationError(f"IDX file {path!r} is truncated or padded: header promises "
                              f"shape {shape} ({need} bytes), file holds {len(body)} bytes.")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: str, gz_name: str) -> str | None:
    for name in (gz_name, gz_name[:-3]):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    return None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, f, digest: str) -> None:
    """Copy ``url`` into the open file ``f``; refuse content whose sha256 is not ``digest``
    (raised inside :func:`swimdist._io.write_atomic`: the target is then left untouched)."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as r:
        for block in iter(lambda: r.read(1 << 20), b""):
            h.update(block)
            f.write(block)
    if h.hexdigest() != digest:
        raise ValidationError(f"checksum mismatch for {url}")


def download_mnist(directory: str) -> None:
    """Download the four gzipped MNIST files into ``directory``, verifying their sha256."""
    os.makedirs(directory, exist_ok=True)
    for name, digest in MNIST_FILES.values():
        target = os.path.join(directory, name)
        if os.path.exists(target) and _sha256(target) == digest:
            continue
        last = None
        for mirror in MNIST_MIRRORS:
            try:
                logger.info("downloading %s%s", mirror, name)
                write_atomic(target, lambda f, url=mirror + name, d=digest: _download(url, f, d))
                break
            except Exception as exc:  # noqa: BLE001 - try the next mirror
                last = exc
        else:
            raise ValidationError(f"Could not download MNIST file {name}: {last}. Put the IDX "
                                  f"files in a directory and pass --data-dir.") from None


def mnist_dir(data_dir: str | None = None) -> str:
    """The MNIST directory: argument, ``swimdist.data-dir``, ``SWIMDIST_DATA_DIR``, or cache."""
    return (data_dir or config.get("data-dir") or os.environ.get("SWIMDIST_DATA_DIR")
            or os.path.join(config.get("cache-dir") or os.path.expanduser("~/.cache/swimdist"),
                            "mnist"))


def load_mnist(data_dir: str | None = None, *, download: bool = False, scale: bool = True):
    """MNIST as ``(X_train, y_train, X_test, y_test)``; images flattened to 784 columns.

    Parameters
    ----------
    data_dir : str, optional
        Directory holding the standard IDX files (gzipped or not). Default: see
        :func:`mnist_dir`.
    download : bool
        Download missing files into that directory (checked against their sha256).
    scale : bool
        Return float64 pixels in [0, 1] (else the raw uint8).
    """
    d = mnist_dir(data_dir)
    paths = {k: _find(d, name) for k, (name, _) in MNIST_FILES.items()}
    if any(p is None for p in paths.values()):
        if not download:
            missing = [MNIST_FILES[k][0] for k, p in paths.items() if p is None]
            raise ValidationError(f"MNIST files not found in {d!r} (missing {missing}). Pass "
                                  "--data-dir / set SWIMDIST_DATA_DIR, or allow download.")
        download_mnist(d)
        paths = {k: _find(d, name) for k, (name, _) in MNIST_FILES.items()}
    out = []
    for split in ("train", "test"):
        X = read_idx(paths[f"{split}-images"])
        y = read_idx(paths[f"{split}-labels"])
        if X.ndim != 3 or y.ndim != 1 or X.shape[0] != y.shape[0]:
            raise ValidationError(f"MNIST {split} files disagree: images {X.shape}, labels "
                                  f"{y.shape}.")
        X = X.reshape(X.shape[0], -1)
        out += [X / 255.0 if scale else X, y.astype(np.int64)]
    return tuple(out)
