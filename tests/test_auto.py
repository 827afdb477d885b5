"""solver="auto": the choice by shape / target / memory / cluster, its log, and the fallbacks."""

from __future__ import annotations

import functools
import logging

import dask.array as da
import numpy as np
import pytest

from swimdist.exceptions import ValidationError
from swimdist.lstsq import SOLVERS, solve
from swimdist.lstsq.auto import choose, looks_like_classification
from swimdist.testing import assert_lstsq_close, make_lstsq_problem

GB = 2.0**30


def test_registered():
    assert {"auto", "normal", "sketch-direct"} <= set(SOLVERS)


@pytest.mark.parametrize(
    "shape, kw, expected",
    [
        # small: gelsd itself
        ((5000, 300), dict(classification=False), "direct"),
        # not tall (N/n = 5): a sketch of 2n rows saves little -> gelsd
        ((5000, 1001), dict(classification=False), "direct"),
        # tall classification (MNIST, M = 2000): the Gram matrix's resolution suffices
        ((60000, 2001), dict(classification=True), "normal"),
        # tall regression with rcond 1e-10: below the Gram matrix's resolution
        ((40000, 1001), dict(classification=False), "sketch-direct"),
        # tall regression with an rcond the Gram matrix resolves
        ((40000, 1001), dict(classification=False, rcond=1e-5), "normal"),
        # ridge regression: the preconditioned solve handles the damping
        ((40000, 1001), dict(classification=False, alpha=1e-8), "sketch-direct"),
        # not tall, but A is a dask array on 4 workers and too big to gather
        ((20000, 5000), dict(classification=False, in_memory=False, n_workers=4), "sketch-direct"),
        # not tall, too big for the client's memory -> no gelsd
        ((20000, 5000), dict(classification=True, memory_limit=2 * GB), "normal"),
    ],
)
def test_choose(shape, kw, expected):
    base = dict(rcond=1e-10, alpha=0.0, in_memory=True, memory_limit=16 * GB)
    name, reason = choose(shape, **{**base, **kw})
    assert name == expected, reason
    assert reason


def test_choose_too_wide_for_memory():
    base = dict(classification=True, rcond=1e-10, alpha=0.0, in_memory=False, memory_limit=1 * GB)
    name, reason = choose((100_000, 20_001), registered=("split",), **base)
    assert name == "split" and "exceeds the client memory" in reason
    with pytest.raises(ValidationError, match="20001 columns: the dense"):
        choose((100_000, 20_001), registered=(), **base)


@pytest.mark.parametrize(
    "Y, expected",
    [
        (np.eye(3)[[0, 2, 1, 1]], True),  # one-hot
        (np.array([[1.0], [-1.0], [1.0]]), True),  # two classes as +-1
        (np.array([[0.5], [1.0], [0.0]]), False),  # continuous
        (np.array([[1.0, 1.0], [0.0, 1.0]]), False),  # 0/1 but not one-hot
    ],
)
def test_looks_like_classification(Y, expected):
    assert looks_like_classification(Y) is expected
    assert looks_like_classification(da.from_array(Y, chunks=2)) is expected


def _classification_problem(N=3000, n=40, K=3, seed=0):
    rng = np.random.default_rng(seed)
    A = np.tanh(rng.standard_normal((N, n - 1)) @ rng.standard_normal((n - 1, n - 1)))
    A = np.concatenate([A, A[:, :1], np.ones((N, 1))], axis=1)  # a duplicated neuron + bias
    labels = np.argmax(A[:, :K] + 0.3 * rng.standard_normal((N, K)), axis=1)
    return A, np.eye(K)[labels]


def test_auto_picks_verified_normal_for_classification(caplog):
    A, Y = _classification_problem()
    ref = solve(A, Y, method="direct")
    with caplog.at_level(logging.INFO, logger="swimdist.lstsq"):
        res = solve(A, Y, method="auto", small_entries=0)
    assert res.method == "auto"
    assert res.info["chosen"] == "normal"
    assert "classification" in res.info["reason"]
    assert res.info["task"] == "classification"
    assert res.converged and res.rank == ref.rank
    assert_lstsq_close(res, ref, rtol=1.5)
    assert any("auto: normal" in r.getMessage() for r in caplog.records)


def test_auto_picks_sketch_direct_for_ill_conditioned_regression():
    p = make_lstsq_problem(2000, 40, cond=1e12, noise=1e-6, seed=1)
    ref = solve(p["A"], p["Y"], method="direct")
    res = solve(da.from_array(p["A"], chunks=(500, 40)), p["Y"], method="auto", small_entries=0)
    assert res.info["chosen"] == "sketch-direct"
    assert "regression" in res.info["reason"]
    assert res.rank == ref.rank
    assert_lstsq_close(res, ref, rtol=1.5)


def test_auto_small_problem_is_gelsd():
    p = make_lstsq_problem(200, 10, cond=1e3, noise=0.1, seed=0)
    res = solve(p["A"], p["Y"], method="auto")
    ref = solve(p["A"], p["Y"], method="direct")
    assert res.info["chosen"] == "direct"
    np.testing.assert_array_equal(res.solution, ref.solution)


def test_fallback_when_normal_cannot_be_vouched_for(caplog):
    # declared classification, but cond 1e12: most directions are below the Gram matrix's
    # resolution, so normal gives way to sketch-direct
    p = make_lstsq_problem(2000, 40, cond=1e12, noise=1e-6, n_rhs=2, seed=2)
    ref = solve(p["A"], p["Y"], method="direct")
    with caplog.at_level(logging.INFO, logger="swimdist.lstsq"):
        res = solve(p["A"], p["Y"], method="auto", task="classification", small_entries=0)
    assert [a["solver"] for a in res.info["attempts"]] == ["normal", "sketch-direct"]
    assert res.info["chosen"] == "sketch-direct"
    assert "fell back to sketch-direct" in res.info["reason"]
    assert "rejected_normal" in res.timings
    assert_lstsq_close(res, ref, rtol=1.5)
    assert any("falling back" in r.getMessage() for r in caplog.records)


def test_fallback_chain_ends_at_gelsd(monkeypatch):
    # make both fast solvers fail their checks: auto must end at gelsd (A fits in memory)
    def refused(name):
        real = SOLVERS[name]

        @functools.wraps(real)  # the registry reads the solver's options from its signature
        def fn(*args, **kw):
            res = real(*args, **kw)
            res.converged = False
            res.info["reason"] = "refused by the test"
            return res

        return fn

    for name in ("normal", "sketch-direct"):
        monkeypatch.setitem(SOLVERS, name, refused(name))
    A, Y = _classification_problem(seed=3)
    ref = solve(A, Y, method="direct")
    res = solve(A, Y, method="auto", small_entries=0)
    assert [a["solver"] for a in res.info["attempts"]] == ["normal", "sketch-direct", "direct"]
    assert res.info["chosen"] == "direct" and res.converged
    assert res.info["reason"].count("refused by the test") == 2
    np.testing.assert_allclose(res.solution, ref.solution)


def test_no_solver_accepted_warns(monkeypatch):
    from swimdist.exceptions import ConvergenceWarning

    real = SOLVERS["sketch-direct"]

    @functools.wraps(real)
    def refused(*args, **kw):
        res = real(*args, **kw)
        res.converged = False
        return res

    monkeypatch.setitem(SOLVERS, "sketch-direct", refused)
    p = make_lstsq_problem(2000, 40, cond=1e12, noise=1e-6, seed=5)
    # too big for gelsd's memory budget -> the chain is sketch-direct, lsrn
    monkeypatch.delitem(SOLVERS, "lsrn", raising=False)
    with pytest.warns(ConvergenceWarning, match="no solver passed its accuracy check"):
        res = solve(p["A"], p["Y"], method="auto", small_entries=0, direct_fraction=0.0)
    assert res.info["chosen"] == "sketch-direct" and not res.converged


def test_float32_storage_uses_float64_gelsd():
    p = make_lstsq_problem(300, 20, cond=1e4, noise=0.1, seed=4)
    A32 = p["A"].astype(np.float32)
    res = solve(A32, p["Y"], method="auto")
    ref = solve(A32.astype(np.float64), p["Y"], method="direct")
    assert res.info["chosen"] == "direct"
    np.testing.assert_allclose(res.solution, ref.solution, rtol=1e-10)


def test_unknown_task():
    p = make_lstsq_problem(50, 5, seed=0)
    with pytest.raises(ValidationError, match="Unknown task 'ranking'"):
        solve(p["A"], p["Y"], method="auto", task="ranking")
