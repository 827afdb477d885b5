"""Lazy features and the Zarr feature store: bit-exact round trip, refusal of foreign data."""

import os

import dask.array as da
import numpy as np
import pytest
import zarr

from swimdist.exceptions import StoreError, ValidationError
from swimdist.features import block_rows, design_matrix, hidden_features
from swimdist.inputs import load_array
from swimdist.sampling import sample_layers
from swimdist.store import build_feature_store, fingerprint_job


@pytest.fixture
def problem(rng):
    X = rng.random((250, 3))
    y = np.sin(X.sum(1))[:, None]
    layers = sample_layers(X, y, (16, 12), seed=2)
    return X, layers


def dense_reference(X, layers):
    Z = X
    for layer in layers:
        Z = np.tanh(Z @ layer.weights + layer.biases)
    return Z


def test_features_are_lazy_and_match_dense(problem):
    X, layers = problem
    H = hidden_features(X, layers, chunk_rows=64)
    assert isinstance(H, da.Array)
    assert H.chunks == ((64, 64, 64, 58), (12,))
    np.testing.assert_allclose(H.compute(), dense_reference(X, layers), rtol=0, atol=1e-15)
    A = design_matrix(X, layers, chunk_rows=64, columns=[3, 1])
    np.testing.assert_array_equal(A[:, -1].compute(), 1.0)
    np.testing.assert_allclose(A[:, :2].compute(), dense_reference(X, layers)[:, [3, 1]])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_store_round_trip_is_bit_exact_and_aligned(problem, tmp_path, dtype):
    X, layers = problem
    Xd = da.from_array(X, chunks=(64, -1))
    url = str(tmp_path / "store")
    H, info = build_feature_store(Xd, layers, url, fingerprint="fp", dtype=dtype)
    assert info == {"blocks": 4, "written": 4, "reused": 0, "verified": 0}
    arr = zarr.open_group(url, mode="r")["features"]
    assert arr.chunks == (64, 12) and arr.dtype == np.dtype(dtype)
    expected = hidden_features(Xd, layers, dtype=dtype).compute()
    got = H.compute()
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, expected)


def test_store_is_reused_and_resumed_block_by_block(problem, tmp_path):
    X, layers = problem
    Xd = da.from_array(X, chunks=(64, -1))
    url = str(tmp_path / "s")
    H1, _ = build_feature_store(Xd, layers, url, fingerprint="fp")
    first = H1.compute()
    # corrupt one block: its checksum no longer verifies, so only it is regenerated
    grp = zarr.open_group(url, mode="r+")
    grp["features"][64:70, :] = 0.0
    H2, info = build_feature_store(Xd, layers, url, fingerprint="fp")
    assert info["written"] == 1 and info["reused"] == 3 and info["verified"] == 3
    np.testing.assert_array_equal(H2.compute(), first)


def test_store_from_another_job_is_refused_and_untouched(problem, tmp_path):
    X, layers = problem
    Xd = da.from_array(X, chunks=(64, -1))
    url = str(tmp_path / "s")
    H, _ = build_feature_store(Xd, layers, url, fingerprint="one")
    before = H.compute()
    with pytest.raises(StoreError, match="different job"):
        build_feature_store(Xd, layers, url, fingerprint="two")
    np.testing.assert_array_equal(da.from_zarr(url, component="features").compute(), before)


def test_foreign_directory_and_foreign_zarr_are_refused(problem, tmp_path):
    X, layers = problem
    Xd = da.from_array(X, chunks=(64, -1))
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8 not zarr")
    with pytest.raises(StoreError, match="not a swimdist feature store"):
        build_feature_store(Xd, layers, str(foreign), fingerprint="fp")
    assert os.listdir(foreign) == ["cat.jpg"]
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_array("x", shape=(3,), dtype="f8")
    with pytest.raises(StoreError, match="not a swimdist feature store"):
        build_feature_store(Xd, layers, str(other), fingerprint="fp")
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        build_feature_store(Xd, layers, str(afile), fingerprint="fp")


def test_fingerprint_changes_with_data_and_layers(problem):
    X, layers = problem
    a = fingerprint_job(x=X, layers=layers)
    assert a == fingerprint_job(x=X.copy(), layers=layers)
    X2 = X.copy()
    X2[0, 0] += 1e-12
    assert a != fingerprint_job(x=X2, layers=layers)
    assert a != fingerprint_job(x=X, layers=layers[:1])


def test_block_rows_respects_block_budget():
    import dask

    with dask.config.set({"swimdist.max-block-bytes": "8MiB", "swimdist.chunk-rows": 100000}):
        assert block_rows(1000, "float64") == 8 * 2**20 // 8000
    assert block_rows(10, "float64", chunk_rows=77) == 77


def test_load_array_formats(tmp_path, rng):
    import h5py

    X = rng.random((30, 4))
    np.save(tmp_path / "x.npy", X)
    np.savez(tmp_path / "x.npz", X=X)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["X"] = X
    zarr.open_group(str(tmp_path / "x.zarr"), mode="w").create_array(
        "X", shape=X.shape, dtype=X.dtype)[:] = X
    for name in ("x.npy", "x.npz", "x.h5", "x.zarr"):
        got = load_array(str(tmp_path / name), "X")
        np.testing.assert_array_equal(np.asarray(got), X)
    with pytest.raises(ValidationError, match="has no dataset 'Y'"):
        load_array(str(tmp_path / "x.h5"), "Y")
    with pytest.raises(ValidationError, match="Unknown input format"):
        load_array(str(tmp_path / "x.csv"), "X")
    (tmp_path / "bad.h5").write_bytes(b"garbage")
    with pytest.raises(ValidationError, match="Could not read"):
        load_array(str(tmp_path / "bad.h5"), "X")


def test_npy_store_matches_zarr_store_and_resumes(problem, tmp_path):
    X, layers = problem
    Xd = da.from_array(X, chunks=(64, -1))
    Hz, _ = build_feature_store(Xd, layers, str(tmp_path / "z"), fingerprint="fp")
    Hn, info = build_feature_store(Xd, layers, str(tmp_path / "n"), fingerprint="fp",
                                   store_format="npy")
    assert info["written"] == 4
    assert sorted(os.listdir(tmp_path / "n")) == ["block_crc.npy", "features.npy", "store.json"]
    np.testing.assert_array_equal(Hn.compute(), Hz.compute())
    m = np.load(tmp_path / "n" / "features.npy", mmap_mode="r+")
    m[130, 0] += 1.0  # corrupt block 2
    m.flush()
    del m
    H2, info = build_feature_store(Xd, layers, str(tmp_path / "n"), fingerprint="fp")
    assert info == {"blocks": 4, "written": 1, "reused": 3, "verified": 3}
    np.testing.assert_array_equal(H2.compute(), Hz.compute())


def test_store_refuses_when_disk_is_too_small(problem, tmp_path, monkeypatch):
    import shutil

    X, layers = problem
    Xd = da.from_array(X, chunks=(64, -1))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 5))
    with pytest.raises(StoreError, match="Not enough disk space .* needs 0.00 GB"):
        build_feature_store(Xd, layers, str(tmp_path / "s"), fingerprint="fp")
    assert not (tmp_path / "s").exists()
