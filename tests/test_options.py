"""Solver options: every solver refuses what it does not take, by name, everywhere; a plain
``swimdist train`` sends no large graphs."""

from __future__ import annotations

import inspect
import re
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from swimdist import SWIMRegressor, solve
from swimdist.cli import main
from swimdist.exceptions import JobSpecError, ValidationError
from swimdist.lstsq import SOLVERS, check_options, solver_options
from swimdist.service import load_spec

ALL = sorted(SOLVERS)


def _problem():
    rng = np.random.default_rng(0)
    return rng.standard_normal((60, 8)), rng.standard_normal((60, 2))


@pytest.mark.parametrize("method", ALL)
def test_solve_refuses_a_misspelled_option_by_name(method):
    A, Y = _problem()
    valid = solver_options(method)
    with pytest.raises(ValidationError, match=f"Unknown option 'tolx' for solver '{method}'") \
            as err:
        solve(A, Y, method=method, tolx=1e-3)
    for name in valid:  # the message lists every valid option
        assert re.search(rf"\b{re.escape(name)}\b", str(err.value))


@pytest.mark.parametrize("method", ALL)
def test_the_solver_functions_refuse_it_too(method):
    # no solver swallows unknown keywords (no **kwargs), so a direct call fails the same way
    A, Y = _problem()
    with pytest.raises((TypeError, ValidationError), match="tolx"):
        SOLVERS[method](A, Y, rcond=1e-10, alpha=0.0, tolx=1e-3)


@pytest.mark.parametrize("method", ALL)
def test_valid_options_come_from_the_signature(method):
    fn = SOLVERS[method]
    params = inspect.signature(fn).parameters
    own = {p.name for p in params.values() if p.kind is p.KEYWORD_ONLY} - {"rcond", "alpha"}
    assert own <= set(solver_options(method))
    check_options(method, {name: None for name in solver_options(method)})  # all accepted


def test_auto_takes_its_candidates_options_and_passes_each_only_its_own():
    A, Y = _problem()
    # "tile" is normal's and normal-tiled's, "sketch" is lsrn's: direct (chosen: A is small)
    # must receive neither
    res = solve(A, Y, method="auto", tile=4, sketch="gaussian", seed=3)
    ref = solve(A, Y, method="direct")
    np.testing.assert_allclose(res.solution, ref.solution, rtol=1e-12, atol=1e-12)
    assert set(solver_options("auto")) >= set(solver_options("lsrn")) | set(
        solver_options("normal-tiled"))


@pytest.mark.parametrize("tol_name, method", [
    ("tol", "normal"), ("tol", "sketch-direct"), ("tol", "normal-tiled"),
    ("cg_tol", "lsrn"), ("accept_tol", "lsrn"), ("cg_tol", "normal"),
])
def test_each_tolerance_name_has_one_meaning(tol_name, method):
    # tol is LSQR's, accept_tol the certificate's, cg_tol normal-tiled's: never interchanged
    A, Y = _problem()
    with pytest.raises(ValidationError, match=f"Unknown option '{tol_name}'"):
        solve(A, Y, method=method, **{tol_name: 1e-3})


def test_split_checks_its_sub_solvers_options():
    A, Y = _problem()
    with pytest.raises(ValidationError, match="Unknown option 'gama' for solver 'lsrn'"):
        solve(A, Y, method="split", sub_solver="lsrn", sub_options={"gama": 3})


@pytest.mark.parametrize("method", ALL)
def test_estimator_refuses_before_sampling(method, monkeypatch):
    import swimdist.estimators as est_mod

    def never(*a, **k):  # pragma: no cover - the check must come first
        raise AssertionError("sampled before checking the solver options")

    monkeypatch.setattr(est_mod, "sample_layers", never)
    X, y = _problem()
    with pytest.raises(ValidationError, match=f"Unknown option 'tolx' for solver '{method}'"):
        SWIMRegressor(solver=method, solver_options={"tolx": 1}).fit(X, y[:, 0])


@pytest.mark.parametrize("method", ALL)
def test_job_spec_refuses_it(method):
    with pytest.raises(JobSpecError, match=f"Unknown option 'tolx' for solver '{method}'"):
        load_spec(None, {"model": {"solver": method, "solver_options": {"tolx": 1}}})


@pytest.mark.parametrize("method", ALL)
def test_cli_refuses_it_with_one_line_and_exit_code_1(method, tmp_path):
    r = CliRunner().invoke(main, ["train", "--dataset", "sine", "--solver", method,
                                  "--solver-option", "tolx=1e-3", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert f"Unknown option 'tolx' for solver '{method}'" in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o" / "model.npz").exists()


def _train_in_process(args, tmp_path):
    """``swimdist train ARGS`` in this process; returns (result, warnings seen)."""
    import logging

    saved = {name: (lg.handlers[:], lg.level, lg.propagate)
             for name, lg in [("swimdist", logging.getLogger("swimdist"))]}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, ["train", *args, "-o", str(tmp_path / "out")])
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    return r, [str(w.message) for w in seen]


def test_train_sine_sends_no_large_graph(tmp_path):
    r, seen = _train_in_process(["--dataset", "sine", "--n-workers", "2"], tmp_path)
    assert r.exit_code == 0, r.output
    assert not [m for m in seen if "large graph" in m.lower()], seen
    assert (tmp_path / "out" / "model.npz").exists()


def test_train_mnist_2000_sends_no_large_graph(tmp_path, mnist_path):
    r, seen = _train_in_process(["--dataset", "mnist", "--data-dir", mnist_path,
                                 "--hidden", "2000", "--n-workers", "2"], tmp_path)
    assert r.exit_code == 0, r.output
    assert not [m for m in seen if "large graph" in m.lower()], seen
    assert "error_pct" in (tmp_path / "out" / "metrics.json").read_text()


@pytest.mark.parametrize("method", ["auto", "lsrn", "normal", "normal-tiled"])
def test_numeric_options_of_the_wrong_kind_are_refused_up_front(method):
    """A numeric option that is not a number is refused before any work, for ``auto`` too
    (where it went unnoticed unless the candidate that takes it was chosen); a string that
    reads as a number (YAML 1.1 leaves 1e-3 a string) is accepted."""
    opts = {"auto": "tol", "lsrn": "tol", "normal": "accept_tol", "normal-tiled": "cg_tol"}
    key = opts[method]
    with pytest.raises(ValidationError, match=f"{key} must be a number"):
        solve(np.eye(4), np.ones(4), method=method, **{key: "abc"})
    solve(np.eye(4), np.ones(4), method=method, **{key: "1e-3"})
