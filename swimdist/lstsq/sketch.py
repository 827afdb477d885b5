"""Random sketches ``S [A | Y]`` computed block by block where the rows live.

A sketch compresses the N rows of ``A`` (and of the right-hand sides ``Y``) into ``s`` rows:
``SA = S A`` and ``SY = S Y`` with a random ``S`` of shape (s, N). ``S`` is never formed: every
row block of ``A`` draws the columns of ``S`` it needs, multiplies, and the (s, n + K) partial
sketches are summed by a tree reduction. ``S`` is never stored and never sent.

Kinds
-----
``"gaussian"``
    Entries i.i.d. N(0, 1/s). Costs ``2 s N n`` flops (as much as a dense SVD of ``A`` when
    N/n is small) plus the random draws. The seed algorithm of LSRN; its distortion bounds are
    known (Marchenko-Pastur edges), which the Chebyshev iteration needs.
``"sparse-sign"``
    Every column of ``S`` has ``nnz`` (default 8) nonzeros ``+-1/sqrt(nnz)`` in distinct, uniformly
    chosen rows. Costs ``nnz N n`` flops: about one read of ``A``.

Reproducibility contract
------------------------
The rows of ``A`` are grouped into *key blocks* of :data:`KEY_ROWS` consecutive rows; key block
``j`` draws its part of ``S`` from ``numpy.random.Generator(PCG64(SeedSequence(seed,
spawn_key=(j,))))`` -- the generator ``SeedSequence(seed).spawn(j + 1)[j]`` would give. The
Gaussian draws column ``S[:, r]`` for the rows ``r`` of the key block in order, ``s`` numbers a
row. So ``S`` depends on ``(seed, kind, s, nnz)`` and the row index only: not on the dask chunking,
the number of workers, the scheduler, nor the memory budget. Sketches of the same data agree to
rounding (the order of the floating-point sums follows the chunking); with the same chunking they
agree to rounding on any number of workers, threads or processes.

Memory
------
A row block multiplies ``S`` in pieces of at most ``block_bytes`` bytes (default
:data:`DEFAULT_BLOCK_BYTES`), so a worker thread holds one piece of ``S``, its (s, n + K)
partial sum and its block of ``A`` -- never the whole (s, N) ``S``.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import scipy.sparse as sp
from scipy.linalg.blas import dgemm

from .._dask import tree_sum
from ..design import row_chunked, rows_like
from ..exceptions import ChunkingError, ValidationError
from ._common import is_dask
from .kernels import f64_pieces

#: Rows per key block: the granularity at which the random stream is keyed.
KEY_ROWS = 1024
#: Default upper bound on the bytes of one piece of a Gaussian sketching matrix a task holds.
DEFAULT_BLOCK_BYTES = 64 * 2**20
#: Nonzeros per column of the sparse-sign sketching matrix.
DEFAULT_NNZ = 8
KINDS = ("gaussian", "sparse-sign")

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_NNZ",
    "KEY_ROWS",
    "KINDS",
    "sketch",
    "sketch_block",
    "sketch_lazy",
    "sketch_size",
    "sketching_matrix",
]


def sketch_size(n: int, gamma: float = 2.0) -> int:
    """Sketch rows ``s = ceil(gamma * n)`` (LSRN's oversampling; ``gamma >= 1``)."""
    if not np.isfinite(gamma) or gamma < 1:
        raise ValidationError(f"gamma must be a finite number >= 1; got {gamma!r}.")
    return max(1, math.ceil(gamma * n))


def _key_generator(seed: int, key_block: int) -> np.random.Generator:
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(key_block,)))
    )


def _check(s: int, kind: str, nnz: int, block_bytes: int | None) -> int:
    if kind not in KINDS:
        raise ValidationError(f"Unknown sketch kind {kind!r}; valid kinds are: {', '.join(KINDS)}.")
    if not isinstance(s, (int, np.integer)) or s < 1:
        raise ValidationError(f"Sketch size s must be a positive integer; got {s!r}.")
    if not isinstance(nnz, (int, np.integer)) or nnz < 1:
        raise ValidationError(f"nnz must be a positive integer; got {nnz!r}.")
    block_bytes = DEFAULT_BLOCK_BYTES if block_bytes is None else int(block_bytes)
    if block_bytes < 1:
        raise ValidationError(f"block_bytes must be positive; got {block_bytes!r}.")
    return block_bytes


def _gaussian_block(
    Bs: list[np.ndarray], start: int, s: int, seed: int, block_bytes: int
) -> np.ndarray:
    """``G[:, start:start+rows] @ [B_1 | B_2 ...]`` with the keyed Gaussian stream.

    ``G`` is drawn in pieces of at most ``block_bytes``; each piece is multiplied into the
    (s, m) accumulator in place (BLAS ``dgemm`` with ``beta = 1``), so the task holds one piece,
    the accumulator and its blocks.
    """
    rows = Bs[0].shape[0]
    widths = [B.shape[1] for B in Bs]
    out = np.zeros((s, sum(widths)), dtype=np.float64, order="F")
    if rows == 0:
        return out
    offsets = np.cumsum([0] + widths)
    outs = [
        out[:, a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)
    ]  # F-contiguous views
    piece = int(max(1, min(rows, block_bytes // (8 * s))))
    buf = np.empty((piece, s), dtype=np.float64)  # G^T piece: row r holds column r of G

    def flush(fill: int, done: int) -> None:
        g = buf[:fill].T  # (s, fill), Fortran-contiguous
        for B, o in zip(Bs, outs, strict=True):
            if o.shape[1]:
                # in-place o += g @ B[done:done+fill]; B's rows are C-contiguous, so B.T is
                # Fortran-contiguous and passes to BLAS without a copy
                dgemm(1.0, g, B[done : done + fill].T, beta=1.0, c=o, trans_b=1, overwrite_c=1)

    fill = 0  # rows of buf filled
    done = 0  # rows of B multiplied
    stop = start + rows
    for j in range(start // KEY_ROWS, (stop - 1) // KEY_ROWS + 1):
        gen = _key_generator(seed, j)
        skip = max(start, j * KEY_ROWS) - j * KEY_ROWS  # rows of the key block before ours
        need = min(stop, (j + 1) * KEY_ROWS) - j * KEY_ROWS - skip
        while skip > 0:  # draw and discard: ziggurat draws cannot be skipped exactly
            k = min(skip, piece)
            gen.standard_normal(out=buf[:k])
            skip -= k
        while need > 0:
            k = min(need, piece - fill)
            gen.standard_normal(out=buf[fill : fill + k])
            fill += k
            need -= k
            if fill == piece:
                flush(fill, done)
                done += fill
                fill = 0
    if fill:
        flush(fill, done)
    out *= 1.0 / math.sqrt(s)
    return out


def _sparse_sign_columns(gen: np.random.Generator, n_cols: int, s: int, nnz: int):
    """Row indices (n_cols, nnz), distinct within each column, and signs +-1."""
    idx = gen.integers(0, s, size=(n_cols, nnz))
    if nnz > 1:
        while True:  # redraw the (rare) columns with a repeated row index
            idx.sort(axis=1)
            bad = np.flatnonzero((np.diff(idx, axis=1) == 0).any(axis=1))
            if bad.size == 0:
                break
            idx[bad] = gen.integers(0, s, size=(bad.size, nnz))
    signs = gen.integers(0, 2, size=(n_cols, nnz)).astype(np.float64) * 2.0 - 1.0
    return idx, signs


def _sparse_sign_matrix(start: int, rows: int, s: int, seed: int, nnz: int) -> sp.csc_array:
    """Columns ``start .. start+rows`` of the sparse-sign sketching matrix (s x rows, CSC)."""
    nnz = min(nnz, s)
    stop = start + rows
    idx_parts, sign_parts = [], []
    for j in range(start // KEY_ROWS, (stop - 1) // KEY_ROWS + 1):
        idx, signs = _sparse_sign_columns(_key_generator(seed, j), KEY_ROWS, s, nnz)
        lo = max(start, j * KEY_ROWS) - j * KEY_ROWS
        hi = min(stop, (j + 1) * KEY_ROWS) - j * KEY_ROWS
        idx_parts.append(idx[lo:hi])
        sign_parts.append(signs[lo:hi])
    indices = np.concatenate(idx_parts).ravel()
    data = np.concatenate(sign_parts).ravel() * (1.0 / math.sqrt(nnz))
    indptr = np.arange(0, rows * nnz + 1, nnz)
    return sp.csc_array((data, indices, indptr), shape=(s, rows))


def sketch_block(
    B,
    start: int,
    *,
    s: int,
    kind: str = "gaussian",
    seed: int = 0,
    nnz: int = DEFAULT_NNZ,
    block_bytes: int | None = None,
) -> np.ndarray:
    """The partial sketch ``S[:, start:start + rows] @ [B_1 | B_2 ...]`` of one row block.

    This is the per-block task: summing it over the row blocks of a matrix gives
    :func:`sketch`. Only a piece of ``S`` of at most ``block_bytes`` is held at a time.

    Parameters
    ----------
    B : ndarray or sequence of ndarray, each shape (rows, m_i)
        A row block, or several sharing the same rows (e.g. ``(A_i, Y_i)``): they are sketched
        with the same columns of ``S`` without being concatenated. 1-D arrays count as one column.
    start : int
        Global index of the block's first row (keys the random stream).
    s, kind, seed, nnz, block_bytes
        As in :func:`sketch`.

    Returns
    -------
    ndarray, shape (s, sum m_i), float64
    """
    block_bytes = _check(s, kind, nnz, block_bytes)
    Bs = [B] if isinstance(B, np.ndarray) or not isinstance(B, (list, tuple)) else list(B)
    Bs = [np.asarray(b) for b in Bs]
    Bs = [b[:, None] if b.ndim == 1 else b for b in Bs]
    # C-contiguous and aligned (distributed may deserialize blocks at odd addresses); float32
    # blocks stay float32 here and are converted a slice of rows at a time below
    Bs = [np.require(b, dtype=b.dtype if b.dtype in (np.float32, np.float64) else np.float64,
                     requirements=["C", "A"]) for b in Bs]
    rows = Bs[0].shape[0]
    if any(b.ndim != 2 or b.shape[0] != rows for b in Bs):
        raise ValidationError(
            f"Row blocks must be 2-D with the same number of rows; got shapes "
            f"{[b.shape for b in Bs]}."
        )
    start, s = int(start), int(s)
    if kind == "gaussian":
        return _gaussian_block(Bs, start, s, int(seed), block_bytes)
    out = np.empty((s, sum(b.shape[1] for b in Bs)), dtype=np.float64)
    if rows == 0:
        out[:] = 0.0
        return out
    S = _sparse_sign_matrix(start, rows, s, int(seed), int(nnz))
    col = 0
    for b in Bs:
        if b.dtype == np.float64:
            out[:, col : col + b.shape[1]] = S @ b
        else:
            # scipy would convert the whole block to float64; a slice of rows at a time
            dst = out[:, col : col + b.shape[1]]
            dst[:] = 0.0
            for r0, piece in f64_pieces(b):
                dst += S[:, r0 : r0 + piece.shape[0]] @ piece
        col += b.shape[1]
    return out


def _sketch_task(A_b, *rest, s, kind, seed, nnz, block_bytes):
    """blockwise task: ``rest`` is ``(Y_b, start)`` or ``(start,)``; returns (1, s, n [+ K])."""
    start = int(np.asarray(rest[-1]).ravel()[0])
    blocks = (A_b, rest[0]) if len(rest) == 2 else (A_b,)
    return sketch_block(blocks, start, s=s, kind=kind, seed=seed, nnz=nnz, block_bytes=block_bytes)[
        None
    ]


def sketch_lazy(
    A: da.Array,
    Y=None,
    *,
    s: int,
    kind: str = "gaussian",
    seed: int = 0,
    nnz: int = DEFAULT_NNZ,
    block_bytes: int | None = None,
    split_every: int | None = 4,
) -> da.Array:
    """The lazy sketch ``S [A | Y]`` of a row-chunked dask array, shape (s, n [+ K]).

    One task per row block draws its columns of ``S`` and multiplies; a tree reduction
    (``split_every`` partials per node) sums the (s, n + K) partials. Compute it together with
    other reductions over ``A`` to share the pass.

    Parameters
    ----------
    A : dask.array.Array, shape (N, n)
        Row-chunked (one column chunk; rechunked along columns otherwise).
    Y : array_like or dask.array.Array, shape (N,) or (N, K), optional
        Right-hand sides, sketched in the same pass (appended as the last K columns).
    s, kind, seed, nnz, block_bytes
        As in :func:`sketch`.
    split_every : int, optional
        Fan-in of the tree reduction.

    Returns
    -------
    dask.array.Array, shape (s, n) or (s, n + K), float64
    """
    return _sketch_parts(A, Y, s=s, kind=kind, seed=seed, nnz=nnz,
                         block_bytes=block_bytes).sum(axis=0, split_every=split_every)


def _sketch_parts(A, Y, *, s, kind, seed, nnz, block_bytes) -> da.Array:
    """The per-row-block partials of :func:`sketch_lazy`, shape (blocks, s, n [+ K])."""
    block_bytes = _check(s, kind, nnz, block_bytes)
    if not is_dask(A):
        raise ValidationError(
            f"sketch_lazy needs a dask array; got {type(A).__name__}. Use sketch() for numpy input."
        )
    if A.ndim != 2:
        raise ValidationError(f"A must be 2-D; got shape {A.shape}.")
    if any(math.isnan(c) for c in A.chunks[0]):
        raise ChunkingError(
            f"A has unknown row chunks {A.chunks[0]}; call A.compute_chunk_sizes() first."
        )
    A = row_chunked(A)
    n = A.shape[1]
    starts = np.cumsum((0,) + A.chunks[0][:-1]).astype(np.int64)
    starts = da.from_array(starts, chunks=1)
    kw = dict(s=int(s), kind=kind, seed=int(seed), nnz=int(nnz), block_bytes=block_bytes)
    if Y is None:
        args, m = (A, "br", starts, "b"), n
    else:
        Yd = rows_like(Y, A)
        args, m = (A, "br", Yd, "bq", starts, "b"), n + Yd.shape[1]
    parts = da.blockwise(
        _sketch_task,
        "bsc",
        *args,
        new_axes={"s": int(s), "c": m},
        adjust_chunks={"b": 1},
        concatenate=True,
        align_arrays=False,  # "b" pairs row blocks with their start offsets, not rows
        dtype=np.float64,
        meta=np.empty((0, 0, 0)),
        **kw,
    )
    return parts


def sketch(
    A,
    Y=None,
    *,
    s: int,
    kind: str = "gaussian",
    seed: int = 0,
    nnz: int = DEFAULT_NNZ,
    block_bytes: int | None = None,
    split_every: int | None = 4,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sketch ``A`` (and ``Y`` in the same pass): ``(S A, S Y)`` as numpy arrays.

    Parameters
    ----------
    A : array_like or dask.array.Array, shape (N, n)
        numpy, or a row-chunked dask array (one pass, computed on the workers).
    Y : array_like or dask.array.Array, shape (N,) or (N, K), optional
        Right-hand sides sketched with the same ``S``.
    s : int
        Sketch rows, e.g. :func:`sketch_size` ``(n, gamma)``.
    kind : {"gaussian", "sparse-sign"}
        Sketching distribution (see the module docstring).
    seed : int
        Seed of the keyed random stream (see the reproducibility contract above).
    nnz : int
        Nonzeros per column of the sparse-sign matrix (ignored for the Gaussian).
    block_bytes : int, optional
        Most bytes of ``S`` one task holds at a time (default :data:`DEFAULT_BLOCK_BYTES`).
    split_every : int, optional
        Fan-in of the tree reduction (dask input).

    Returns
    -------
    SA : ndarray, shape (s, n)
    SY : ndarray, shape (s, K) or (s,) following ``Y``, or None when ``Y`` is None
    """
    y_1d = Y is not None and getattr(Y, "ndim", np.ndim(Y)) == 1
    if is_dask(A):
        # one partial per row block, summed as sketch_lazy sums them (blocks counted)
        parts = _sketch_parts(A, Y, s=s, kind=kind, seed=seed, nnz=nnz,
                              block_bytes=block_bytes)
        S = tree_sum(parts, split_every, "sketch")
        n = A.shape[1]
    else:
        A = np.asarray(A)
        if A.ndim != 2:
            raise ValidationError(f"A must be 2-D; got shape {A.shape}.")
        n = A.shape[1]
        if is_dask(Y):
            Y = Y.compute()
        if Y is not None:
            Yn = np.asarray(Y, dtype=np.float64)
            if Yn.shape[0] != A.shape[0]:
                raise ValidationError(
                    f"A and Y must have the same number of rows; got A {A.shape} and Y {Yn.shape}."
                )
            block = (A, Yn.reshape(A.shape[0], -1))
        else:
            block = A
        S = sketch_block(block, 0, s=s, kind=kind, seed=seed, nnz=nnz, block_bytes=block_bytes)
    SA, SY = S[:, :n], (S[:, n:] if Y is not None else None)
    if y_1d:
        SY = SY[:, 0]
    return SA, SY


def sketching_matrix(
    n_rows: int, *, s: int, kind: str = "gaussian", seed: int = 0, nnz: int = DEFAULT_NNZ
) -> np.ndarray:
    """The dense (s, n_rows) sketching matrix ``S`` itself (for tests and small problems).

    ``sketch(A, s=s, kind=kind, seed=seed)[0]`` equals ``S @ A`` to rounding.
    """
    return sketch_block(np.eye(n_rows), 0, s=s, kind=kind, seed=seed, nnz=nnz)
