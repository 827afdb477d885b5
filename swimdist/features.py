"""Lazy feature matrix: row-chunked X -> sigma(... sigma(X W1 + b1) ... W_L + b_L).

Nothing here computes: every function returns a dask array whose blocks are generated on
the workers from the row block of X and the layer parameters (sent to every worker once,
:func:`swimdist._dask.broadcast`, never embedded per task). :func:`forward` is the one
forward pass (feature blocks and prediction).
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from . import config
from ._dask import broadcast
from .sampling import Layer


def block_rows(n_cols: int, dtype, chunk_rows: int | None = None) -> int:
    """Rows per block: ``chunk_rows`` (or the configured default), lowered so that one
    block of ``n_cols`` columns stays under ``swimdist.max-block-bytes``."""
    rows = int(chunk_rows or config.get("chunk-rows"))
    budget = dask.utils.parse_bytes(config.get("max-block-bytes"))
    itemsize = np.dtype(dtype).itemsize
    # blocks are computed in float64 and then cast: count both while both exist
    per_row = max(1, n_cols) * (8 + (itemsize if itemsize != 8 else 0))
    return max(1, min(rows, budget // per_row))


def forward(x, layers: list[Layer]) -> np.ndarray:
    """The hidden layers' output for rows ``x`` (numpy, float64): the one forward pass, used
    for feature blocks on the workers and for prediction alike."""
    return _forward(x, layers, None, np.float64, False)


def _forward(x: np.ndarray, params, columns, dtype, add_bias: bool) -> np.ndarray:
    """Apply all layers to one row block; the last layer only on ``columns``."""
    z = np.asarray(x, dtype=np.float64)
    for li, layer in enumerate(params):
        if li == len(params) - 1 and columns is not None:
            layer = layer.columns(columns)
        if li == len(params) - 1 and (add_bias or np.dtype(dtype) != np.float64):
            # The last layer goes straight into the block (in the output dtype) beside its
            # bias column: no concatenated or converted copy afterwards.
            out = np.empty((z.shape[0], layer.width + int(add_bias)), dtype=dtype)
            layer.apply(z, out=out[:, :layer.width])
            if add_bias:
                out[:, -1] = 1.0
            return out
        z = layer.apply(z)
    if add_bias:
        z = np.concatenate([z, np.ones((z.shape[0], 1))], axis=1)
    out = z.astype(dtype, copy=False)
    assert out.dtype == np.dtype(dtype)
    return out


def hidden_features(X, layers: list[Layer], *, columns=None, dtype="float64",
                    add_bias: bool = False, chunk_rows: int | None = None) -> da.Array:
    """The last hidden layer's output as a lazy row-chunked dask array.

    Parameters
    ----------
    X : ndarray or dask array, shape (N, d)
        numpy input is split into blocks of ``chunk_rows`` rows; a dask array keeps its row
        chunks (its columns are merged into one chunk).
    layers : list of Layer
    columns : array of int, optional
        Only these neurons of the last layer (split-and-solve blocks).
    dtype : str
        Output dtype (computation is float64 either way).
    add_bias : bool
        Append the all-ones column, giving the design matrix ``A = [H, 1]``.
    """
    dtype = np.dtype(dtype)
    width = layers[-1].width if columns is None else len(columns)
    n_out = width + int(add_bias)
    if not isinstance(X, da.Array):
        X = da.from_array(np.asarray(X), chunks=(block_rows(n_out, dtype, chunk_rows), -1))
    elif len(X.chunks[1]) != 1:
        X = X.rechunk({1: -1})
    layers = list(layers)
    if columns is not None:
        # Slice here, so only this block's weights and biases travel to the workers.
        layers[-1] = layers[-1].columns(np.asarray(columns))
    params = broadcast(layers)
    return X.map_blocks(
        _forward, params, None, dtype, add_bias,
        chunks=(X.chunks[0], (n_out,)), dtype=dtype, meta=np.empty((0, 0), dtype),
    )


def design_matrix(X, layers: list[Layer], **kw) -> da.Array:
    """``A = [H, 1]``: the hidden features with the bias column appended."""
    return hidden_features(X, layers, add_bias=True, **kw)


def add_bias_column(H: da.Array) -> da.Array:
    """Append the all-ones column to a row-chunked (single column chunk) array."""
    def _add(h):
        return np.concatenate([h, np.ones((h.shape[0], 1), dtype=h.dtype)], axis=1)

    return H.map_blocks(_add, chunks=(H.chunks[0], (H.shape[1] + 1,)), dtype=H.dtype,
                        meta=np.empty((0, 0), H.dtype))
