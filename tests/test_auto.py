"""solver="auto": the choice by shape / target / memory / cluster, its log, and the fallbacks."""

from __future__ import annotations

import functools
import logging

import dask.array as da
import numpy as np
import pytest

from swimdist.exceptions import ValidationError
from swimdist.lstsq import SOLVERS, solve
from swimdist.lstsq.auto import (
    choose,
    looks_like_classification,
    predict,
    regret,
    unresolved_budget,
)
from swimdist.lstsq.costs import Rates
from swimdist.testing import assert_lstsq_close, make_lstsq_problem

GB = 2.0**30


def test_registered():
    assert {"auto", "normal", "sketch-direct"} <= set(SOLVERS)


#: A two-core machine's rates (measured by :func:`swimdist.lstsq.costs.measure_rates`).
RATES = Rates(
    gelsd_a={"256": 1.47e-10, "1024": 6.82e-11}, gelsd_b={"256": 8.48e-10, "1024": 2.93e-10},
    syrk={"256": 1.72e-11, "1024": 1.46e-11}, gemm={"256": 1.43e-11, "1024": 1.45e-11},
    gemm32={"256": 6.68e-12, "1024": 5.73e-12}, eigh={"256": 3.65e-10, "1024": 1.67e-10},
    svd={"256": 8.43e-10, "1024": 4.27e-10}, sketch={"256": 8.1e-09, "1024": 6.32e-09},
)


@pytest.mark.parametrize(
    "shape, kw, expected",
    [
        # small: gelsd itself, before any rates are known
        ((5000, 300), dict(classification=False, rates=None), "direct"),
        # tall classification (MNIST, M = 2000): the Gram matrix at BLAS-3 rates
        ((60000, 2001), dict(classification=True), "normal"),
        # tall regression with rcond 1e-10: normal's worst case (all directions verified) is
        # the Gram matrix plus the fallback; its best case far below gelsd's
        ((40000, 1001), dict(classification=False), "normal"),
        ((40000, 1001), dict(classification=False, rcond=1e-5), "normal"),
        # ridge: Cholesky on the damped Gram matrix
        ((40000, 1001), dict(classification=False, alpha=1e-8), "normal"),
        # gelsd does not fit the client's memory: not a candidate
        ((20000, 5000), dict(classification=True, memory_limit=2 * GB), "normal"),
        # a sketch of 2n rows would not compress a matrix of N < 2n rows
        ((3000, 2000), dict(classification=False, candidates=("direct", "sketch-direct")),
         "direct"),
        # a machine with a fast gelsd and slow products: the reference
        ((40000, 1001), dict(classification=True, rates=Rates(
            **{**RATES.__dict__, "gelsd_a": {"256": 1e-12}, "gelsd_b": {"256": 1e-12}})),
         "direct"),
    ],
)
def test_choose(shape, kw, expected, monkeypatch, tmp_path):
    base = dict(rcond=1e-10, alpha=0.0, in_memory=True, memory_limit=16 * GB, rates=RATES,
                registered=("direct", "normal", "sketch-direct", "lsrn", "split"))
    if kw.get("rates", RATES) is None:  # a machine whose rates are not measured yet
        from swimdist.lstsq import costs

        monkeypatch.setenv("SWIMDIST_RATES", str(tmp_path / "rates.json"))
        monkeypatch.setattr(costs, "_RATES", None)
        assert not costs.rates_known()
    name, reason = choose(shape, **{**base, **kw})
    assert name == expected, reason
    assert reason


def test_regret_rule_against_the_predictions():
    """The first choice is the candidate whose loss against the best in hindsight is least,
    over the best and worst cases the data decides between."""
    for shape in [(5000, 1001), (30000, 601), (100000, 1001), (4000, 2001)]:
        secs = predict(shape, classification=False, rcond=1e-10, alpha=0.0, in_memory=True,
                       memory_limit=16 * GB, rates=RATES)
        name, _ = choose(shape, classification=False, rcond=1e-10, alpha=0.0, in_memory=True,
                         memory_limit=16 * GB, rates=RATES)
        pool = [c for c in secs if np.isfinite(secs[c][1])]
        assert regret(name, pool, secs) == min(regret(c, pool, secs) for c in pool)
        lo, hi = secs["normal"]
        assert lo <= hi <= lo + min(secs["direct"][1], secs["sketch-direct"][1])


def test_unresolved_budget_is_where_verification_stops_paying():
    shape = (40000, 1001)
    fallback = RATES.gelsd(*shape)
    frac = unresolved_budget(shape, n_rhs=1, fallback_seconds=fallback, rates=RATES)
    k = int(frac * shape[1])
    cost = lambda k: RATES.product(*shape, k + 1) + RATES.eig(max(k, 1))  # noqa: E731
    assert cost(k) <= fallback
    assert k == shape[1] or cost(k + 1) > fallback
    assert unresolved_budget(shape, n_rhs=1, fallback_seconds=np.inf, rates=RATES) == 1.0


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
        (np.array([[1.0, 1.0], [0.0, 1.0]]), True),  # multi-label indicators
        (np.array([[1.0, -1.0], [-1.0, 1.0]]), True),  # +-1 indicators per class
        (np.array([[2.0], [1.0], [0.0]]), False),  # counts: a regression
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
        res = solve(A, Y, method="auto", candidates=["normal"])
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
    res = solve(da.from_array(p["A"], chunks=(500, 40)), p["Y"], method="auto",
                candidates=["sketch-direct"])
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


def test_classification_is_certified_over_what_the_gram_matrix_resolves():
    # declared classification with cond 1e12: most directions are below the Gram matrix's
    # resolution; normal cuts there and certifies the best residual over the rest
    p = make_lstsq_problem(2000, 40, cond=1e12, noise=1e-6, n_rhs=2, seed=2)
    res = solve(p["A"], p["Y"], method="auto", task="classification", candidates=["normal"])
    assert res.info["chosen"] == "normal" and res.converged
    assert res.info["certified_subspace"] == "resolved"
    cut = res.info["cutoff"]
    assert cut == pytest.approx(np.sqrt(16 * 40 * np.finfo(float).eps))
    ref = solve(p["A"], p["Y"], method="direct", rcond=cut)  # the best over that subspace
    full = solve(p["A"], p["Y"], method="direct")
    assert res.rank == ref.rank < full.rank
    r, r_ref = np.linalg.norm(res.residual_norm), np.linalg.norm(ref.residual_norm)
    assert r <= r_ref * (1 + 1e-3)
    # regression on the same matrix certifies down to rcond instead
    reg = solve(p["A"], p["Y"], method="auto", task="regression", candidates=["normal"])
    assert reg.converged and abs(reg.rank - full.rank) <= 1  # a value at the cutoff
    assert np.linalg.norm(reg.residual_norm) <= np.linalg.norm(full.residual_norm) * 1.01


def test_fallback_when_normal_cannot_be_vouched_for(caplog, monkeypatch):
    real = SOLVERS["normal"]

    @functools.wraps(real)
    def refused(*args, **kw):
        res = real(*args, **kw)
        res.converged = False
        res.info["reason"] = "refused by the test"
        return res

    monkeypatch.setitem(SOLVERS, "normal", refused)
    p = make_lstsq_problem(2000, 40, cond=1e12, noise=1e-6, n_rhs=2, seed=2)
    ref = solve(p["A"], p["Y"], method="direct")
    with caplog.at_level(logging.INFO, logger="swimdist.lstsq"):
        res = solve(p["A"], p["Y"], method="auto", candidates=["normal"])
    assert [a["solver"] for a in res.info["attempts"]][0] == "normal"
    assert res.info["chosen"] in ("sketch-direct", "direct") and res.converged
    assert "fell back to" in res.info["reason"]
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
    res = solve(A, Y, method="auto", candidates=["normal"])
    tried = [a["solver"] for a in res.info["attempts"]]
    assert tried[0] == "normal" and tried[-1] == "direct"
    assert res.info["chosen"] == "direct" and res.converged
    assert res.info["reason"].count("refused by the test") == len(tried) - 1
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
        # gelsd's copy of A does not fit 1 MB
        res = solve(p["A"], p["Y"], method="auto", candidates=["sketch-direct"],
                    memory_limit=1e6)
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


def test_rates_are_measured_once_and_cached(monkeypatch, tmp_path):
    from swimdist.lstsq import costs

    path = tmp_path / "rates.json"
    monkeypatch.setenv("SWIMDIST_RATES", str(path))
    monkeypatch.setattr(costs, "_RATES", None)
    calls = []
    real = costs.measure_rates
    monkeypatch.setattr(costs, "measure_rates", lambda: calls.append(1) or real((64, 128)))
    monkeypatch.setattr(costs, "CALIBRATION_WIDTHS", (64, 128))
    monkeypatch.setattr(costs, "WIDE_WIDTHS", (192,))
    r = costs.machine_rates(width=100)  # within the calibrated widths: no wide rates yet
    assert path.exists() and calls == [1]
    for table in (r.gelsd_a, r.syrk, r.gemm, r.gemm32, r.eigh, r.svd, r.sketch):
        assert set(table) == {"64", "128"} and all(np.isfinite(v) and v > 0 for v in table.values())
    # a wider problem adds gelsd's and eigh's rates at the wide width, once
    r = costs.machine_rates(width=300)
    assert set(r.gelsd_a) == set(r.gelsd_b) == set(r.eigh) == {"64", "128", "192"}
    assert set(r.syrk) == {"64", "128"} and r.gelsd_a["192"] > 0 and r.eigh["192"] > 0
    monkeypatch.setattr(costs, "_RATES", None)  # a new process reads the file
    assert costs.machine_rates(width=300) == r and calls == [1]
    # the models count the work: twice the rows, twice the Gram pass and the products
    assert r.gram(2000, 100) == pytest.approx(2 * r.gram(1000, 100))
    assert r.product(2000, 100, 10) == pytest.approx(2 * r.product(1000, 100, 10))
    assert r.gelsd(4000, 128) > r.gelsd(1000, 128)
