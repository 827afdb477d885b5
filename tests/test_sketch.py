"""Sketches S [A | Y]: the keyed-stream contract, the distributions, the embedding property."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from swimdist.exceptions import ValidationError
from swimdist.lstsq.sketch import (
    KEY_ROWS,
    KINDS,
    sketch,
    sketch_block,
    sketch_lazy,
    sketch_size,
    sketching_matrix,
)


@pytest.fixture
def AY(rng):
    return rng.standard_normal((2500, 12)), rng.standard_normal((2500, 3))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "chunk_rows, block_bytes",
    [
        (2500, None),  # one chunk, default budget
        (700, None),  # chunks not aligned with the key blocks
        (KEY_ROWS, None),  # chunks aligned with the key blocks
        (333, 40 * 8 * 7),  # Gaussian pieces of 7 rows: many pieces per key block
        (1500, 40 * 8 * 3000),  # a piece larger than a key block
    ],
)
def test_sketch_is_S_times_A_whatever_the_chunking_and_budget(AY, kind, chunk_rows, block_bytes):
    A, Y = AY
    S = sketching_matrix(A.shape[0], s=40, kind=kind, seed=7)
    Ad = da.from_array(A, chunks=(chunk_rows, -1))
    SA, SY = sketch(Ad, Y, s=40, kind=kind, seed=7, block_bytes=block_bytes)
    # tolerance: sums of 2500 products of O(1) numbers in a different order
    np.testing.assert_allclose(SA, S @ A, rtol=0, atol=1e-12)
    np.testing.assert_allclose(SY, S @ Y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_and_dask_inputs_agree_and_y_is_optional(AY, kind):
    A, Y = AY
    SA, SY = sketch(A, Y[:, 0], s=30, kind=kind, seed=1)
    SA2, none = sketch(da.from_array(A, chunks=(512, -1)), s=30, kind=kind, seed=1)
    assert SY.shape == (30,) and none is None
    np.testing.assert_allclose(SA, SA2, rtol=0, atol=1e-12)
    lazy = sketch_lazy(da.from_array(A, chunks=(512, -1)), Y, s=30, kind=kind, seed=1)
    assert lazy.shape == (30, 15) and lazy.dtype == np.float64


@pytest.mark.parametrize("kind", KINDS)
def test_seed_changes_the_sketch(AY, kind):
    A, _ = AY
    SA0, _ = sketch(A, s=20, kind=kind, seed=0)
    SA1, _ = sketch(A, s=20, kind=kind, seed=1)
    assert np.abs(SA0 - SA1).max() > 0.1 * np.abs(SA0).max()


def test_block_partials_sum_to_the_sketch(AY):
    A, Y = AY
    parts = sum(
        sketch_block((A[i : i + 900], Y[i : i + 900]), i, s=25, seed=3)
        for i in range(0, A.shape[0], 900)
    )
    SA, SY = sketch(A, Y, s=25, seed=3)
    np.testing.assert_allclose(parts, np.hstack([SA, SY]), rtol=0, atol=1e-12)


def test_gaussian_entries_are_standard_normal_over_sqrt_s():
    s = 50
    S = sketching_matrix(4000, s=s, kind="gaussian", seed=0)
    z = S.ravel() * np.sqrt(s)  # 200 000 draws: mean and variance within ~5 standard errors
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)


def test_sparse_sign_columns_have_nnz_distinct_signed_entries():
    s, nnz = 20, 8
    S = sketching_matrix(3000, s=s, kind="sparse-sign", seed=0, nnz=nnz)
    assert ((S != 0).sum(axis=0) == nnz).all()  # distinct rows: no collisions summed away
    np.testing.assert_allclose(np.abs(S[S != 0]), 1 / np.sqrt(nnz))
    # rows hit uniformly: each row gets about N * nnz / s entries
    per_row = (S != 0).sum(axis=1)
    assert np.abs(per_row - 3000 * nnz / s).max() < 6 * np.sqrt(3000 * nnz / s)


def test_sparse_sign_nnz_is_capped_by_s():
    S = sketching_matrix(100, s=3, kind="sparse-sign", seed=0, nnz=8)
    assert ((S != 0).sum(axis=0) == 3).all()


@pytest.mark.parametrize("kind", KINDS)
def test_sketch_embeds_a_subspace_within_the_marchenko_pastur_edges(rng, kind):
    # The singular values of S Q (Q: orthonormal N x n, s = 2n) concentrate on
    # [1 - sqrt(n/s), 1 + sqrt(n/s)] = [0.29, 1.71]; allow 0.1 for finite-size fluctuation.
    n = 100
    Q, _ = np.linalg.qr(rng.standard_normal((5000, n)))
    SQ, _ = sketch(Q, s=sketch_size(n, 2.0), kind=kind, seed=0)
    sv = np.linalg.svd(SQ, compute_uv=False)
    assert sv.min() > 1 - np.sqrt(0.5) - 0.1
    assert sv.max() < 1 + np.sqrt(0.5) + 0.1


def test_sketch_size():
    assert sketch_size(1001, 2.0) == 2002
    assert sketch_size(10, 1.55) == 16


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"kind": "hadamard"}, "valid kinds are: gaussian, sparse-sign"),  # unknown kind
        ({"s": 0}, "positive integer"),  # empty sketch
        ({"nnz": 0}, "nnz must be"),  # no nonzeros
        ({"block_bytes": 0}, "block_bytes must be positive"),  # no memory
    ],
)
def test_invalid_arguments(kw, match):
    args = {"s": 5, **kw}
    with pytest.raises(ValidationError, match=match):
        sketch(np.ones((10, 2)), **args)


def test_invalid_shapes_and_gamma():
    with pytest.raises(ValidationError, match="same number of rows"):
        sketch(np.ones((10, 2)), np.ones(9), s=4)
    with pytest.raises(ValidationError, match="must be 2-D"):
        sketch(np.ones(10), s=4)
    with pytest.raises(ValidationError, match="gamma must be"):
        sketch_size(10, 0.5)
    with pytest.raises(ValidationError, match="needs a dask array"):
        sketch_lazy(np.ones((10, 2)), s=4)
