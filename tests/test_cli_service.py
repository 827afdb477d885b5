"""The command line and the job service: specs, status records, errors, exit codes."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from swimdist import load_model
from swimdist.cli import main
from swimdist.exceptions import JobSpecError
from swimdist.service import load_spec


def run_cli(*args, timeout=240, env=None):
    return subprocess.run([sys.executable, "-m", "swimdist.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_train_embedded_cluster_writes_model_status_metrics(tmp_path):
    out = tmp_path / "out"
    report = tmp_path / "report.html"
    r = run_cli("train", "--dataset", "sine", "--n-train", "800", "--n-test", "200",
                "--hidden", "80", "--solver", "direct", "--n-workers", "1", "-o", str(out),
                "--performance-report", str(report))
    assert r.returncode == 0, r.stderr
    assert "model written to" in r.stdout and "dashboard" in r.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "done" and status["progress"] == 1.0 and status["error"] is None
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["mae"] < 1e-4
    m = load_model(str(out / "model.npz"))
    from swimdist.datasets import sine

    Xt, yt = sine(200, alpha=1.0, seed=1)
    assert np.abs(m.predict(Xt) - yt).mean() == pytest.approx(metrics["test"]["mae"])
    assert report.stat().st_size > 1000
    # evaluate and predict on the saved model
    r = run_cli("evaluate", "--model", str(out / "model.npz"), "--dataset", "sine",
                "--n-test", "200")
    assert r.returncode == 0 and "mae" in r.stdout
    np.save(tmp_path / "x.npy", Xt)
    r = run_cli("predict", "--model", str(out / "model.npz"), "--input", str(tmp_path / "x.npy"),
                "-o", str(tmp_path / "p.npy"))
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), m.predict(Xt))


def test_unreachable_scheduler_fails_fast_with_status(tmp_path):
    t0 = time.perf_counter()
    r = run_cli("train", "--scheduler", "tcp://127.0.0.1:1", "--solver", "direct", "-o",
                str(tmp_path / "o"),
                env={**__import__("os").environ, "DASK_SWIMDIST__CLUSTER__CONNECT_TIMEOUT": "3"})
    assert r.returncode == 1
    assert time.perf_counter() - t0 < 60
    assert "Could not reach the Dask scheduler at 'tcp://127.0.0.1:1'" in r.stderr
    status = json.loads((tmp_path / "o" / "status.json").read_text())
    assert status["phase"] == "failed" and "Could not reach" in status["error"]


def test_config_file_flags_and_env_precedence(tmp_path, monkeypatch):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"model": {"hidden_layer_sizes": [50], "solver": "direct"},
                                    "data": {"n_train": 300}}))
    s = load_spec(str(spec))
    assert s["model"]["hidden_layer_sizes"] == [50] and s["data"]["n_train"] == 300
    monkeypatch.setenv("DASK_SWIMDIST__JOB__DATA__N_TRAIN", "400")
    import dask.config

    dask.config.refresh()
    try:
        assert load_spec(str(spec))["data"]["n_train"] == 400
        assert load_spec(str(spec), {"data": {"n_train": 500}})["data"]["n_train"] == 500
    finally:
        monkeypatch.delenv("DASK_SWIMDIST__JOB__DATA__N_TRAIN")
        dask.config.refresh()


@pytest.mark.parametrize("content, msg", [
    ({"model": {"solverr": "direct"}}, "Unknown job-spec key 'model.solverr'"),
    ({"model": {"solver": "magic"}}, "model.solver 'magic' is unknown; valid: .*direct"),
    ({"model": {"rcond": "small"}}, "'model.rcond' must be int or float"),
    ({"model": {"hidden_layer_sizes": [0]}}, "hidden_layer_sizes must be a list of integers"),
    ({"data": {"dataset": "cifar"}}, "data.dataset must be sine, mnist or file"),
    ({"data": {"dataset": "file"}}, "data.path is required"),
    ({"cluster": "local"}, "'cluster' must be a mapping"),
    ({"version": 2}, "version' 2 is not supported"),
    ({"select": {"cv": 3}}, "give select.widths or select.alphas"),
    ({"data": {"dataset": "sine", "path": "x.npz"}}, "read with data.dataset 'file' only"),
    ({"cluster": {"tls_ca_file": "a", "tls_cert": "b", "tls_key": "c"}},
     "the embedded cluster does not use them"),
    ({"select": {"validation_fraction": 0.3}}, "give select.widths or select.alphas"),
    ({"select": {"widths": [10, 20], "cv": 3, "validation_fraction": 0.2}},
     "give one of them"),
])
def test_bad_job_specs_name_the_key(tmp_path, content, msg):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(content))
    with pytest.raises(JobSpecError, match=msg):
        load_spec(str(p))


def test_cli_errors_exit_nonzero_with_message(tmp_path):
    runner = CliRunner()
    p = tmp_path / "job.yaml"
    p.write_text("model: [unclosed")
    r = runner.invoke(main, ["train", "--config", str(p)])
    assert r.exit_code == 1 and "not valid YAML" in r.output
    r = runner.invoke(main, ["train", "--hidden", "ten"])
    assert r.exit_code == 1 and "--hidden must be integers" in r.output
    r = runner.invoke(main, ["evaluate", "--model", str(tmp_path / "none.npz")])
    assert r.exit_code == 1 and "No model file" in r.output


def test_info_and_config_commands():
    runner = CliRunner()
    r = runner.invoke(main, ["info"])
    assert r.exit_code == 0 and "solvers:" in r.output and "direct" in r.output
    r = runner.invoke(main, ["config"])
    assert r.exit_code == 0 and "chunk-rows" in r.output
    r = runner.invoke(main, ["config", "cluster.blas-threads"])
    assert r.exit_code == 0 and r.output.strip() == "1"


def test_cli_refuses_bad_inputs_and_places_in_one_line(tmp_path):
    """Refusals a new user meets, each one line and exit code 1, before any training."""
    runner = CliRunner()
    np.save(tmp_path / "X.npy", np.ones((50, 3)))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "good.npz", X=rng.normal(size=(50, 3)), y=rng.normal(size=50))
    np.savez(tmp_path / "bad.npz", X=rng.normal(size=(20, 4)), y=rng.normal(size=20))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    base = ["train", "--dataset", "sine", "--n-train", "200", "--hidden", "10"]
    out = ["-o", str(tmp_path / "o")]
    cases = [
        (["train", "--dataset", "file", "--task", "regression", "--input",
          str(tmp_path / "X.npy"), *out], "holds a single array"),
        ([*base, "-o", str(tmp_path / "afile")], "is a file"),
        ([*base, "--memory-limit", "5XB", *out], "is not a size such as"),
        ([*base, "--memory-limit", "-3GB", *out], "must be a positive size"),
        ([*base, "--n-workers", "0", *out], "must be >= 1"),
        ([*base, "--scheduler", "notanaddress", *out], "not a Dask scheduler address"),
        (["train", "--config", str(tmp_path / "bin.yaml"), *out], "not a text file"),
        ([*base, "--hidden", "", *out], "--hidden is empty"),
        (["train", "--dataset", "file", "--task", "regression", "--input",
          str(tmp_path / "good.npz"), "--test-input", str(tmp_path / "bad.npz"),
          "--hidden", "10", "--n-workers", "1", *out], "training inputs 3 features"),
    ]
    for args, msg in cases:
        r = runner.invoke(main, args)
        assert r.exit_code == 1 and msg in r.output, (args, r.output)
        assert "Traceback" not in r.output
    assert (tmp_path / "afile").read_text() == "x"


def test_evaluate_takes_the_task_from_the_model(tmp_path):
    from swimdist import SWIMRegressor
    from swimdist.datasets import sine

    X, y = sine(200, seed=0)
    path = SWIMRegressor(hidden_layer_sizes=(20,), random_state=0).fit(X, y).save(
        str(tmp_path / "m.npz"))
    np.savez(tmp_path / "d.npz", X=X, y=y)
    runner = CliRunner()
    args = ["evaluate", "--model", path, "--dataset", "file", "--input", str(tmp_path / "d.npz")]
    r = runner.invoke(main, args)
    assert r.exit_code == 0 and "mae" in r.output, r.output
    r = runner.invoke(main, [*args, "--task", "classification"])
    assert r.exit_code == 1 and "cannot be evaluated as classification" in r.output


def test_an_interrupted_job_reads_interrupted(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt, also what SIGTERM becomes) is recorded as resumable, not
    as a failure."""
    from swimdist import service

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(service, "load_data", interrupt)
    spec = load_spec(None, {"output": str(tmp_path / "o"), "data": {"dataset": "sine"}})
    with pytest.raises(KeyboardInterrupt):
        service.run_job(spec)
    st = service.read_status(str(tmp_path / "o"))
    assert st["state"] == "interrupted" and "resume" in st["reason"]


def test_config_of_an_unknown_key_is_an_error():
    r = CliRunner().invoke(main, ["config", "clustr"])
    assert r.exit_code == 1 and "No setting swimdist.clustr" in r.output
