"""Progress you can watch: every long stage reports done/total, rate and ETA (iterations:
their residual against the target) to log lines, bars, the job's status record and
callbacks; estimators stay quiet unless asked; ``swimdist train`` prints no library noise."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import dask
import numpy as np
import pytest

from swimdist import SWIMClassifier, SWIMRegressor, progress
from swimdist.progress import Event, format_event

LINE = re.compile(r"^[a-z][a-z0-9 -]*: \d+(/\d+)? [a-z]+( \(\d+%\))?(, .+)?$")


def _fit(est, X, y, **settings):
    """Fit on the threaded scheduler, collecting every event."""
    events: list[Event] = []
    est.set_params(progress_callback=events.append)
    with dask.config.set({"scheduler": "threads", **settings}):
        est.fit(X, y)
    return events


def _stages(events) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for ev in events:
        out.setdefault(ev.stage, []).append(ev)
    return out


def _check_stage(evs: list[Event], *, total: bool):
    """A stage's events: counts rise, its last event is the finished one, and a known total
    is reached with rate and ETA on the way."""
    assert evs[-1].finished and all(not e.finished for e in evs[:-1])
    done = [e.done for e in evs]
    assert done == sorted(done) and done[-1] >= 1
    if total:
        assert evs[-1].total is not None and evs[-1].done == evs[-1].total
        assert evs[-1].eta == 0.0
        mid = [e for e in evs if not e.finished and e.done]
        assert mid and all(e.rate > 0 and e.eta is not None for e in mid)
    else:
        assert evs[-1].total is None
        assert any(e.residual is not None and e.target is not None for e in evs)


@pytest.fixture
def data():
    from swimdist.datasets import sine

    return sine(2000, alpha=2.0, seed=0)


# ------------------------------------------------------------------ each stage, by solver
@pytest.mark.parametrize("solver, options, store, expect", [
    # sampling, and features persisted in memory (one block per 250 rows)
    ("direct", {}, None, {"sampling": True, "features": True}),
    # feature blocks written to a store, Gram panels, their factorization, CG iterations
    # (a loose preconditioner, so that CG takes steps)
    ("normal-tiled", {"tile": 20, "precond_ridge": 1e-2, "max_iter": 10, "cg_tol": 1e-12},
     "store",
     {"features": True, "gram panels": True, "factorization": True, "cg": False}),
    # the sketch pass over A's blocks, then LSQR's iterations
    ("lsrn", {}, None, {"sketch": True, "lsqr": False}),
    # split blocks, each solved directly
    ("split", {"n_splits": 4, "sub_solver": "direct"}, None, {"split blocks": True}),
    # the one-pass Gram matrix
    ("normal", {}, None, {"gram": True}),
    # ... and its verification passes, iterations with the possible gain against accept_tol
    ("normal", {"verify": True}, None, {"gram": True, "verification": False}),
])
def test_each_stage_reports(data, tmp_path, solver, options, store, expect):
    X, y = data
    est = SWIMRegressor(hidden_layer_sizes=(60,), solver=solver, solver_options=options,
                        random_state=0, chunk_rows=250,
                        store=str(tmp_path / "s") if store else None)
    import warnings

    from swimdist.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed number of CG steps
        stages = _stages(_fit(est, X, y))
    for name, known in expect.items():
        assert name in stages, sorted(stages)
        _check_stage(stages[name], total=known)
    if "features" in expect:
        assert stages["features"][-1].total == 8 and stages["features"][-1].unit == "blocks"


def test_resuming_from_a_store_reports_its_verification(data, tmp_path):
    X, y = data
    est = SWIMRegressor(hidden_layer_sizes=(30,), solver="direct", random_state=0,
                        chunk_rows=250, store=str(tmp_path / "s"))
    _fit(est, X, y)
    stages = _stages(_fit(est, X, y))  # the same job again: the written blocks are checked
    _check_stage(stages["verify store"], total=True)
    assert stages["verify store"][-1].total == 8
    assert est.fit_info_["blocks"]["verified"] == 8


def test_sampling_counts_layers(data):
    X, y = data
    stages = _stages(_fit(SWIMRegressor(hidden_layer_sizes=(20, 30), solver="direct",
                                        random_state=0), X, y))
    ev = stages["sampling"][-1]
    assert (ev.done, ev.total, ev.unit) == (2, 2, "layers")


def test_prediction_of_large_inputs_reports_rows(data):
    X, y = data
    est = SWIMRegressor(hidden_layer_sizes=(20,), solver="direct", random_state=0).fit(X, y)
    events = []
    est.set_params(progress_callback=events.append)
    big = np.tile(X, (6, 1))  # 12 000 rows: more than one 8192-row piece
    est.predict(big)
    ev = _stages(events)["predict"][-1]
    assert ev.finished and (ev.done, ev.total, ev.unit) == (12000, 12000, "rows")
    events.clear()
    est.predict(X)  # small: nothing to watch
    assert events == []


def test_distributed_blocks_are_counted_as_futures_complete(data, tmp_path,
                                                            local_cluster_factory):
    X, y = data
    local_cluster_factory(n_workers=2)
    events: list[Event] = []
    est = SWIMRegressor(hidden_layer_sizes=(60,), solver="lsrn", random_state=0,
                        chunk_rows=250, store=str(tmp_path / "s"),
                        progress_callback=events.append).fit(X, y)
    again: list[Event] = []  # the same job again: its written blocks are verified
    SWIMRegressor(hidden_layer_sizes=(60,), solver="lsrn", random_state=0, chunk_rows=250,
                  store=str(tmp_path / "s"), progress_callback=again.append).fit(X, y)
    _check_stage(_stages(again)["verify store"], total=True)
    stages = _stages(events)
    for name in ("features", "sketch"):
        _check_stage(stages[name], total=True)
        assert stages[name][-1].total == 8
    _check_stage(stages["lsqr"], total=False)
    assert est.fit_info_["relative_residual"] < 1e-3


# ------------------------------------------------------------------ quiet by default
def test_estimators_are_silent_by_default(data, caplog, capsys):
    X, y = data
    caplog.set_level(logging.DEBUG, logger="swimdist.progress")
    with dask.config.set({"scheduler": "threads"}):
        SWIMRegressor(hidden_layer_sizes=(40,), solver="lsrn", random_state=0).fit(X, y)
        SWIMClassifier(hidden_layer_sizes=(40,), random_state=0).fit(X, y > 0)
    assert not [r for r in caplog.records if r.name == "swimdist.progress"]
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_verbose_writes_plain_lines_off_a_terminal(data, caplog, capsys):
    X, y = data
    caplog.set_level(logging.INFO, logger="swimdist.progress")
    with dask.config.set({"scheduler": "threads", "swimdist.progress-interval": 0}):
        SWIMRegressor(hidden_layer_sizes=(60,), solver="lsrn", random_state=0, chunk_rows=250,
                      verbose=1).fit(X, y)
    lines = [r.getMessage() for r in caplog.records if r.name == "swimdist.progress"]
    assert lines and all(LINE.match(x) for x in lines), lines
    assert any(re.match(r"features: \d+/8 blocks \(\d+%\), [\d.e+]+ blocks/s, ETA \d+ s$", x)
               for x in lines), lines
    assert any(re.match(r"lsqr: \d+ it, residual \d\.\d\de-\d\d \(target 1\.0e-12\)", x)
               for x in lines), lines
    assert capsys.readouterr().err == ""  # no bar: stderr is not a terminal


def test_log_lines_are_throttled_per_stage(caplog):
    caplog.set_level(logging.INFO, logger="swimdist.progress")
    with dask.config.set({"swimdist.progress-interval": 3600}), progress.report(verbose=1):
        with progress.stage("blocks", total=100, unit="blocks") as st:
            for _ in range(100):
                st.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "swimdist.progress"]
    assert lines == []  # a short stage that never reached the interval says nothing


@pytest.mark.parametrize("ev, text", [
    (Event("features", 12, 30, "blocks", 6.0, 2.0, 9.0), "features: 12/30 blocks (40%), "
     "2 blocks/s, ETA 9 s"),
    (Event("gram panels", 3, 8, "panels", 60.0, 0.05, 100.0), "gram panels: 3/8 panels (38%), "
     "0.05 panels/s, ETA 1:40 min"),
    # unknown total: the residual against its target
    (Event("cg", 7, None, "it", 4.0, 1.75, None, 3.2e-4, 3e-5), "cg: 7 it, residual 3.20e-04 "
     "(target 3.0e-05), 1.75 it/s"),
    (Event("lsqr", 25, None, "it", 3.1, 8.0, None, 5.5e-13, 1e-12, True),
     "lsqr: 25 it, residual 5.50e-13 (target 1.0e-12), done in 3 s"),
    (Event("sampling", 0, 1, "layers", 0.0, None, None), "sampling: 0/1 layers (0%)"),
])
def test_line_format(ev, text):
    assert format_event(ev) == text
    assert LINE.match(text)


def test_a_callback_sees_the_same_events_as_the_job(tmp_path):
    from swimdist.service import StatusRecord

    seen = []
    st = StatusRecord(str(tmp_path))
    try:
        with progress.report(callback=seen.append, status=st):
            with progress.stage("split blocks", total=2, unit="blocks") as s:
                s.update(1, residual=0.5)
                s.update(1, residual=0.25)
    finally:
        st.close()
    data = json.loads((tmp_path / "status.json").read_text())
    assert [e.done for e in seen] == [0, 1, 2, 2] and seen[-1].finished
    assert data["stage"]["stage"] == "split blocks" and data["stage"]["finished"]
    assert data["residual"] == {"value": 0.25, "target": None, "stage": "split blocks"}
    assert data["stages"] == [{"name": "split blocks", "seconds": data["stages"][0]["seconds"],
                               "done": 2, "total": 2, "residual": 0.25}]


# ------------------------------------------------------------------ the command line
def _cli(*args, timeout=240, env=None):
    return subprocess.run([sys.executable, "-m", "swimdist.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


NOISE = re.compile(r"warn|host wildcard|large graph|traceback|hint", re.IGNORECASE)


def test_train_on_sine_prints_no_library_noise(tmp_path):
    out = tmp_path / "out"
    r = _cli("train", "--dataset", "sine", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert not NOISE.search(r.stderr), r.stderr
    # the dashboard link once, with where a record of it can go
    assert r.stderr.count("dashboard: http://127.0.0.1:") == 1
    assert "--performance-report" in r.stderr
    status = json.loads((out / "status.json").read_text())
    names = [s["name"] for s in status["stages"]]
    assert names[:2] == ["sampling", "features"]


@pytest.mark.slow
def test_train_on_mnist_prints_no_library_noise(tmp_path, mnist_path):
    import os

    r = _cli("train", "--dataset", "mnist", "--hidden", "2000", "-o", str(tmp_path / "out"),
             timeout=900, env={**os.environ, "SWIMDIST_DATA_DIR": mnist_path})
    assert r.returncode == 0, r.stderr
    assert not NOISE.search(r.stderr), r.stderr
    assert "test: error_pct" in r.stdout


def test_the_record_follows_the_innermost_stage_and_keeps_every_end(tmp_path):
    from swimdist.service import StatusRecord

    st = StatusRecord(str(tmp_path))
    try:
        with progress.report(status=st):
            with progress.stage("split blocks", total=2, unit="blocks") as outer:
                with progress.stage("lsqr", unit="it", target=1e-12) as inner:
                    inner.update(1, residual=1e-3)
                    outer.update(0)  # an outer update while the inner one runs: not shown
                    assert st.data["stage"]["stage"] == "lsqr"
                outer.update(1, residual=0.5)
                assert st.data["stage"]["stage"] == "split blocks"
    finally:
        st.close()
    assert [s["name"] for s in st.data["stages"]] == ["lsqr", "split blocks"]


def test_the_heartbeat_brings_a_stalled_stage_eta_to_now(tmp_path, monkeypatch):
    import time

    from swimdist.service import StatusRecord

    monkeypatch.setattr(StatusRecord, "HEARTBEAT", 0.2)
    st = StatusRecord(str(tmp_path))
    try:
        st.progress(Event("gram panels", 1, 4, "panels", 1.0, 1.0, 3.0))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.2)
            ev = json.loads((tmp_path / "status.json").read_text()).get("stage")
            if ev and ev["elapsed"] > 1.3:
                break
    finally:
        st.close()
    # nothing done since: the same rate over a longer time, the ETA grown in proportion
    assert ev["elapsed"] > 1.3 and ev["done"] == 1
    assert ev["eta"] == pytest.approx(3.0 * ev["elapsed"], rel=0.01)
    assert ev["rate"] == pytest.approx(1.0 / ev["elapsed"], rel=0.01)


def _ticking_task(topic, key, steps, pause):
    import time as _time

    tick = progress.task_ticker(topic, key, interval=0.0)
    for _ in range(steps):
        _time.sleep(pause)
        tick(1.0)
    return key


def test_long_tasks_report_their_work_while_they_run(local_cluster_factory):
    """A stage of two long tasks side by side (as the Gram panels are) has a rate and an
    ETA from the work the workers report, before either task ends; a finished task's
    unreported work is counted when it ends, so the stage reaches its total work once."""
    from distributed import as_completed

    client = local_cluster_factory(n_workers=2)
    events: list[Event] = []
    with progress.report(callback=events.append):
        with progress.stage("long tasks", total=2, unit="tasks", work=40.0) as st, \
                progress.TaskWork(st, client) as tw:
            assert tw.topic is not None
            futs = {client.submit(_ticking_task, tw.topic, k, 10, 0.1, pure=False): k
                    for k in ("a", "b")}
            for fut in as_completed(list(futs)):
                tw.finish(futs[fut], 20.0)
            assert st.work_done == pytest.approx(40.0)
    before = [e for e in events if e.stage == "long tasks" and e.done == 0 and e.eta is not None]
    assert before, "no ETA before the first task ended"
    assert events[-1].finished and events[-1].done == 2 and events[-1].eta == 0.0


def test_without_a_report_tasks_send_nothing(local_cluster_factory):
    client = local_cluster_factory(n_workers=1)
    with progress.stage("quiet", total=1, work=1.0) as st, progress.TaskWork(st, client) as tw:
        assert tw.topic is None  # estimators are quiet by default: no events at all
    assert progress.task_ticker(None, "x")(1.0) is None


def test_a_stage_ended_by_an_error_says_it_stopped():
    """A stage left by an exception (an error, Ctrl-C) reports that it stopped, not that it
    was done."""
    from swimdist import progress

    events = []
    with pytest.raises(KeyboardInterrupt), progress.report(0, events.append), \
            progress.stage("sketch", total=4, unit="blocks") as st:
        st.update(1)
        raise KeyboardInterrupt
    last = events[-1]
    assert last.finished and last.stopped and last.done == 1
    assert "stopped after" in progress.format_event(last)
    with progress.report(0, events.append), \
            progress.stage("sketch", total=1, unit="blocks") as st:
        st.update(1)
    assert events[-1].finished and not events[-1].stopped
