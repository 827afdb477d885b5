"""Store or regenerate: where ``A`` lives when it does not fit in memory, chosen by cost.

Regenerated features (every pass recomputes its blocks from X on the workers) must give the
model a stored copy gives, on any worker count, and both must agree with a dense gelsd
solve; X given as a file (Zarr, HDF5, npy) is read by the workers a row block at a time.
"""

from __future__ import annotations

import logging
import pickle
import re

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

from swimdist import SWIMRegressor
from swimdist.design import build_design, choose_placement, placement_costs
from swimdist.features import forward
from swimdist.inputs import file_backed, load_array
from swimdist.lstsq.costs import Rates, solver_passes
from swimdist.sampling import sample_layers

#: A budget far below A (3000 x 41 float64 = 1 MB): A never stays in memory.
SMALL = {"swimdist.memory-budget": "64KB"}


def _problem(n=3000, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, d))
    y = np.sin(2 * X).sum(axis=1) + 0.01 * rng.standard_normal(n)
    return X, y


def _gelsd(model, X, y, rcond):
    """The dense reference: gelsd on the model's own features, the same rcond."""
    A = np.concatenate([forward(X, model.layers_), np.ones((X.shape[0], 1))], axis=1)
    sol = np.linalg.lstsq(A, y, rcond=rcond)[0]
    return A, sol


KW = dict(hidden_layer_sizes=(40,), random_state=0, solver="normal", rcond=1e-5,
          chunk_rows=500)


def test_stored_and_regenerated_features_give_the_same_model(tmp_path):
    """Regenerated, a temporary store and a persistent store: the same coefficients (the
    same blocks reduced in the same order: equal to rounding), and the prediction gelsd
    gives on the same features (``rcond = 1e-5``, above the Gram matrix's resolution
    ``sqrt(16 n eps) = 1.6e-6``, so both keep the same directions)."""
    X, y = _problem()
    fits = {}
    for place in ("regenerate", "store"):
        with dask.config.set({**SMALL, "swimdist.placement": place,
                              "swimdist.store-root": str(tmp_path / "tmp")}):
            fits[place] = SWIMRegressor(**KW).fit(X, y)
    with dask.config.set(SMALL):
        fits["persistent"] = SWIMRegressor(store=str(tmp_path / "s"), **KW).fit(X, y)
    assert fits["regenerate"].fit_info_["placement"] == "regenerate"
    assert fits["store"].fit_info_["placement"] == "temporary"
    assert fits["persistent"].fit_info_["placement"] == "store"
    ref = fits["regenerate"]
    for name in ("store", "persistent"):
        np.testing.assert_allclose(fits[name].coef_, ref.coef_, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(fits[name].intercept_, ref.intercept_, rtol=1e-9, atol=1e-9)
    A, sol = _gelsd(ref, X, y, KW["rcond"])
    # predictions, not coefficients: a cutoff at 1e-5 of an ill-conditioned A leaves the
    # kept subspace well defined, its coordinates less so
    np.testing.assert_allclose(ref.predict(X), A @ sol, atol=2e-6)
    r_ref = np.linalg.norm(A @ sol - y)
    assert np.linalg.norm(ref.predict(X) - y) <= r_ref * (1 + 1e-6)


@pytest.mark.parametrize("n_workers", [1, 2])
def test_regenerated_on_workers_matches_the_threaded_fit(local_cluster_factory, n_workers):
    """Blocks regenerated on 1 or 2 worker processes: the threaded scheduler's model."""
    X, y = _problem(seed=1)
    with dask.config.set({**SMALL, "swimdist.placement": "regenerate"}):
        local = SWIMRegressor(**KW).fit(X, y)
        local_cluster_factory(n_workers=n_workers)
        dist = SWIMRegressor(**KW).fit(X, y)
    assert dist.fit_info_["placement"] == "regenerate"
    np.testing.assert_allclose(dist.coef_, local.coef_, rtol=1e-10, atol=1e-10)


def test_placement_is_logged_and_recorded(caplog):
    X, y = _problem(n=2000)
    with dask.config.set(SMALL), caplog.at_level(logging.INFO, logger="swimdist"):
        m = SWIMRegressor(**KW).fit(X, y)
    info = m.fit_info_
    assert info["placement"] in ("regenerate", "temporary")
    assert info["placement_reason"]
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("swimdist")]
    # 41 columns, fewer when identical neurons were merged
    assert any(re.match(rf"design matrix 2000 x \d+: {info['placement']} \(", s)
               for s in msgs), msgs


def _rates(gemm: float, act: float, read: float, write: float, root) -> Rates:
    import os

    r = Rates(gemm={"256": gemm}, activation={"tanh": act})
    r.disk[f"device {os.stat(root).st_dev}"] = [read, write]
    return r


@pytest.mark.parametrize(
    "d, gemm, act, read, expect",
    [
        # few inputs, a fast CPU (100 GFLOP/s, 5 ns a tanh) and a 500 MB/s disk: a block is
        # generated faster than it is read back
        (16, 1e-11, 5e-9, 5e8, "regenerate"),
        # 5000 inputs (the products 2 N d M dominate) and a 20 GB/s disk: the store wins
        (5000, 1e-11, 5e-9, 2e10, "temporary"),
    ],
)
def test_choice_follows_the_flop_and_byte_counts(tmp_path, d, gemm, act, read, expect):
    layers = sample_layers(np.random.default_rng(0).standard_normal((64, d)), None, (256,),
                           sampler="random", seed=0)
    X = da.zeros((1_000_000, d), chunks=(10_000, d))
    rates = _rates(gemm, act, read, read, tmp_path)
    with dask.config.set({"swimdist.store-root": str(tmp_path)}):
        place, reason, costs = choose_placement(X, layers, dtype="float64", passes=3,
                                                rates=rates)
    assert place == expect, reason
    N, M = 1_000_000, 256
    gen = gemm * 2 * N * d * M + act * N * M / costs_threads()
    assert costs["generate"] == pytest.approx(gen)
    assert costs["store"] == pytest.approx(gen + 8 * N * M / read * 4)  # write + 3 reads
    assert costs["regenerate"] == pytest.approx(3 * gen + 2 * N * d * 8 / read)


def costs_threads() -> int:
    import os

    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def test_solvers_that_need_a_store_get_one():
    assert solver_passes("normal-tiled") is None
    assert solver_passes("normal") == 1
    # the Gram pass, 2 refinement passes, the narrowing sketch and a possible full Z pass
    assert solver_passes("normal", {"verify": True, "max_refine": 2}) == 5
    assert solver_passes("normal", {"verify": "resolved", "max_refine": 2}) == 3
    X = da.zeros((1000, 2), chunks=(100, 2))
    layers = sample_layers(np.zeros((4, 2)), None, (8,), sampler="random", seed=0)
    assert choose_placement(X, layers, dtype="float64", passes=None)[0] == "temporary"


def test_unknown_placement_setting_is_refused():
    from swimdist.exceptions import ValidationError

    X, y = _problem(n=500)
    with dask.config.set({**SMALL, "swimdist.placement": "disk"}), \
            pytest.raises(ValidationError, match="placement must be auto, store or regenerate"):
        SWIMRegressor(**KW).fit(X, y)


def test_placement_costs_grow_linearly_in_rows(tmp_path):
    rates = _rates(1e-11, 5e-9, 1e9, 1e9, tmp_path)
    layers = sample_layers(np.zeros((4, 16)), None, (100,), sampler="random", seed=0)
    a = placement_costs(10**6, 16, layers, "float64", 2, str(tmp_path), rates=rates, threads=2)
    b = placement_costs(2 * 10**6, 16, layers, "float64", 2, str(tmp_path), rates=rates,
                        threads=2)
    for k in ("store", "regenerate"):
        assert b[k] == pytest.approx(2 * a[k])


# --------------------------------------------------------------------------- X from files
def _write(fmt: str, path, X, y):
    if fmt == "zarr":
        g = zarr.open_group(store=str(path), mode="w")
        g.create_array("X", shape=X.shape, chunks=(700, X.shape[1]), dtype=X.dtype)[:] = X
        return str(path), load_array(str(path), "X")
    if fmt == "h5":
        import h5py

        with h5py.File(path, "w") as f:
            f["X"] = X
        return str(path), load_array(str(path), "X", chunk_rows=700)
    np.save(path, X)
    return str(path), load_array(str(path))


@pytest.mark.parametrize("fmt, name", [("zarr", "x.zarr"), ("h5", "x.h5"), ("npy", "x.npy")])
def test_x_from_files_is_read_by_the_workers_in_row_blocks(tmp_path, local_cluster_factory,
                                                           fmt, name):
    """X as a Zarr, HDF5 or .npy path: the design matrix's graph names row-block reads, no
    copy of X (its pickled graph is a small fraction of X's bytes), and the fit equals the
    one on X in memory."""
    X, y = _problem(n=4000, d=4, seed=2)
    _, Xf = _write(fmt, tmp_path / name, X, y)
    local_cluster_factory(n_workers=2)
    with dask.config.set({**SMALL, "swimdist.placement": "regenerate"}):
        Xd = file_backed(Xf) if fmt == "npy" else Xf
        assert isinstance(Xd, da.Array)
        layers = sample_layers(Xd, y[:, None], (40,), seed=0)
        with build_design(Xd, layers, chunk_rows=500, passes=1) as A:
            assert A.placement == "regenerate"
            graph = pickle.dumps(dict(A.array.__dask_graph__()))
            assert len(graph) < X.nbytes / 4, (len(graph), X.nbytes)
            assert A.array.numblocks[0] == 8
        from_file = SWIMRegressor(**KW).fit(Xf, y)
        in_memory = SWIMRegressor(**KW).fit(X, y)
    assert from_file.fit_info_["placement"] == "regenerate"
    np.testing.assert_allclose(from_file.coef_, in_memory.coef_, rtol=1e-9, atol=1e-9)


def test_npy_map_becomes_worker_reads(tmp_path):
    X = np.arange(60.0).reshape(20, 3)
    np.save(tmp_path / "x.npy", X)
    m = np.load(tmp_path / "x.npy", mmap_mode="r")
    d = file_backed(m)
    assert isinstance(d, da.Array)
    np.testing.assert_array_equal(d.compute(), X)
    assert file_backed(m[2:]) is None  # a slice of a map: not a whole file
    assert file_backed(X) is None


def test_out_of_core_sampling_reads_candidates_in_slices(monkeypatch):
    """X as a dask array, the candidate pool read in many slices: the same layers as X in
    memory (the same pairs, so bit-identical weights)."""
    import swimdist.sampling as sampling

    X, y = _problem(n=5000, d=3, seed=3)
    ref = sample_layers(X, y[:, None], (30, 20), seed=4)
    one = sample_layers(da.from_array(X, chunks=(600, 3)), y[:, None], (30, 20), seed=4)
    for a, b in zip(ref, one, strict=True):  # one slice: its rows give the chosen pairs'
        np.testing.assert_array_equal(a.weights, b.weights)
    calls = []
    real = sampling._gather_rows

    def counted(Xd, idx):
        calls.append(len(idx))
        return real(Xd, idx)

    monkeypatch.setattr(sampling, "candidate_bytes", lambda: 16 * 3 * 700)  # 700 a slice
    monkeypatch.setattr(sampling, "_gather_rows", counted)
    got = sample_layers(da.from_array(X, chunks=(600, 3)), y[:, None], (30, 20), seed=4)
    assert len(calls) >= 8 and max(calls) <= 1400
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.biases, b.biases)
