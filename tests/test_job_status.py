"""A job's state you can trust: running, done, failed, and interrupted when its process is
gone, through ``read_status``, ``swimdist status OUTPUT`` and ``swimdist info OUTPUT``."""

from __future__ import annotations

import datetime
import json
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from swimdist.cli import main
from swimdist.exceptions import StoreError
from swimdist.service import StatusRecord, read_status, run_job

_WRITER = """
import sys, time
from swimdist.progress import Event
from swimdist.service import StatusRecord
st = StatusRecord(sys.argv[1])
st.update(phase="fitting")
st.progress(Event("cg", 0, None, "it", 0.0, None, None, None, 3e-5))
st.progress(Event("cg", 7, None, "it", 4.0, 1.75, None, 3.2e-4, 3e-5, True))
st.progress(Event("gram panels", 0, 8, "panels", 0.0, None, None))
time.sleep(1.1)  # events are written at most once a second (the heartbeat writes the rest)
st.progress(Event("gram panels", 3, 8, "panels", 60.0, 0.05, 100.0))
print("ready", flush=True)
time.sleep(600)
"""


def _start_writer(out):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _status_cli(out) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["status", str(out)])
    return r.exit_code, r.output


def test_running_then_killed_reads_as_interrupted(tmp_path):
    out = tmp_path / "job"
    proc = _start_writer(out)
    try:
        assert read_status(str(out))["state"] == "running"
        code, text = _status_cli(out)
        assert code == 0 and "state: running" in text and "phase: fitting" in text
        # the running stage, its count, the time left, the last residual and its target
        assert "stage: gram panels" in text and "done: 3/8 panels" in text
        assert re.search(r"eta: (1:\d\d min|\d+ s)", text), text
        assert "residual: 3.200e-04 (cg, target 3.0e-05)" in text
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    st = read_status(str(out))
    assert st["phase"] == "fitting"  # the record itself still says what it was doing
    assert st["state"] == "interrupted" and str(proc.pid) in st["reason"]
    code, text = _status_cli(out)
    assert code == 0 and "state: interrupted" in text
    # where it stopped; no time left is promised for a job that is gone
    assert "stage: gram panels" in text and "done: 3/8 panels" in text and "eta" not in text
    # info OUTPUT says the same
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 0 and "state: interrupted" in r.output


def test_heartbeat_keeps_the_record_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(StatusRecord, "HEARTBEAT", 0.2)
    st = StatusRecord(str(tmp_path))
    try:
        first = json.loads((tmp_path / "status.json").read_text())["updated"]
        seen = {first}
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            seen.add(json.loads((tmp_path / "status.json").read_text())["updated"])
        assert len(seen) >= 2  # rewritten without any phase change
    finally:
        st.close()


def test_a_reused_pid_is_not_the_job(tmp_path):
    st = StatusRecord(str(tmp_path))
    st.close()
    data = json.loads((tmp_path / "status.json").read_text())
    data["phase"] = "fitting"
    data["pid_started"] = data["pid_started"] - 1000.0  # same pid, another process
    (tmp_path / "status.json").write_text(json.dumps(data))
    assert read_status(str(tmp_path))["state"] == "interrupted"


def test_a_silent_job_on_another_host_reads_as_interrupted(tmp_path):
    st = StatusRecord(str(tmp_path))
    st.close()
    data = json.loads((tmp_path / "status.json").read_text())
    data.update(phase="fitting", host="elsewhere")
    (tmp_path / "status.json").write_text(json.dumps(data))
    assert read_status(str(tmp_path))["state"] == "running"  # heartbeat is fresh
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    data["updated"] = old.isoformat(timespec="seconds")
    (tmp_path / "status.json").write_text(json.dumps(data))
    st = read_status(str(tmp_path))
    assert st["state"] == "interrupted" and "no heartbeat" in st["reason"]


def _spec(out):
    from swimdist.service import load_spec

    return load_spec(None, {"data": {"dataset": "sine", "n_train": 400, "n_test": 50},
                            "model": {"hidden_layer_sizes": [20], "solver": "direct",
                                      "random_state": 0},
                            "cluster": {"n_workers": 1}, "output": str(out)})


def test_finished_and_failed_jobs(tmp_path):
    done = tmp_path / "done"
    run_job(_spec(done))
    assert read_status(str(done))["state"] == "done"
    code, text = _status_cli(done)
    assert code == 0 and "state: done" in text and "mae" in text
    st = read_status(str(done))
    assert [s["name"] for s in st["stages"]][:2] == ["sampling", "features"]
    assert "stage: " in text and "(finished)" in text and "eta" not in text
    failed = tmp_path / "failed"
    from swimdist.service import load_spec

    spec = load_spec(None, {"data": {"dataset": "file", "path": str(tmp_path / "none.npy"),
                                     "task": "regression"},
                            "cluster": {"n_workers": 1}, "output": str(failed)})
    with pytest.raises(Exception, match="does not exist"):
        run_job(spec)
    st = read_status(str(failed))
    assert st["state"] == "failed" and st["error"]
    code, text = _status_cli(failed)
    assert code == 0 and "state: failed" in text


def test_status_of_nothing_is_one_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no status.json"):
        read_status(str(tmp_path))
    code, text = _status_cli(tmp_path)
    assert code == 1 and "no status.json" in text and "Traceback" not in text
