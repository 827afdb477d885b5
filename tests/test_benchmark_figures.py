"""The benchmark scripts' figure helpers (benchmarks/_plots.py) draw PNGs, or skip cleanly."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest

PLOTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "_plots.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_plots():
    """A fresh copy of benchmarks/_plots.py (not a package: loaded from its path)."""
    spec = importlib.util.spec_from_file_location("swimdist_bench_plots", PLOTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_png(path) -> None:
    path = pathlib.Path(path)
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_SIGNATURE)


def test_every_figure_is_written_as_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plots = load_plots()
    # residual histories: LSQR crawling, LSRN converging in a few steps; one failed entry (None)
    lsqr = [0.5 ** (k / 50) for k in range(300)]
    lsrn = [2e-7 * (1 + 0.5**k) for k in range(30)]
    out = plots.residual_histories(
        {"LSQR (300 it.)": lsqr, "LSRN Gaussian (29 it.)": lsrn, "LSRN sparse sign": [None, 1e-6]},
        {"direct (gelsd)": 2e-7, "normal equations": 3e-5, "dask lstsq": math.inf},
        title="synthetic: A 500 x 101",
        path=tmp_path / "residuals.png",
    )
    assert out == tmp_path / "residuals.png"
    assert_png(out)
    # times against N/M, a NaN where a run failed
    out = plots.times_vs_aspect(
        [5, 10, 20, 40],
        {"direct": [0.1, 0.2, 0.4, 0.8], "lsrn": [0.3, 0.35, math.nan, 0.5]},
        title="synthetic times",
        path=tmp_path / "sub" / "times.png",  # parent directories are created
    )
    assert_png(out)
    # split panels: 4 panels -> a 2 x 3 grid with two hidden axes
    panels = [
        {
            "title": f"M = {m}, alpha = {a}",
            "splits": [1, 2, 3],
            "full": 1e-4,
            "values": {"norm": [1e-4, 5e-5, 2e-4], "random": [1e-4, 1e-3, 1e-2]},
        }
        for m in (100, 200)
        for a in (1, 5)
    ]
    assert_png(plots.split_mae(panels, title="synthetic split", path=tmp_path / "split.png"))
    out = plots.error_curve(
        [250, 500, 1000],
        {"test": [9.0, 5.5, 3.9], "train": [8.5, 4.0, 2.0]},
        title="synthetic width",
        xlabel="hidden neurons M",
        path=tmp_path / "width.png",
        references={"full: 3.0 %": 3.0},
        logx=True,
        logy=True,
        annotate="test",
    )
    assert_png(out)
    printed = capsys.readouterr().out
    assert printed.count("figure: ") == 4
    assert plots.SKIP_MESSAGE not in printed


def test_without_matplotlib_figures_are_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    plots = load_plots()
    assert plots.pyplot() is None
    out = plots.residual_histories(
        {"LSQR": [1.0, 0.5]}, {"direct": 0.1}, title="t", path=tmp_path / "r.png"
    )
    assert out is None
    assert plots.times_vs_aspect([5, 10], {"d": [1, 2]}, title="t", path=tmp_path / "t.png") is None
    assert plots.split_mae([], title="t", path=tmp_path / "s.png") is None
    assert (
        plots.error_curve([1], {"e": [1]}, title="t", xlabel="x", path=tmp_path / "e.png") is None
    )
    assert list(tmp_path.iterdir()) == []
    # one line, once per process, whatever the number of figures skipped
    assert capsys.readouterr().out == plots.SKIP_MESSAGE + "\n"
    assert plots.SKIP_MESSAGE == (
        "matplotlib not installed (pip install '.[plot]'): figures skipped"
    )
