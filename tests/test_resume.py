"""A training process killed in the middle of its solve, started again, gives the model of
an uninterrupted fit, without regenerating the finished feature blocks."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from swimdist import load_model


def _argv(out, store):
    # normal-tiled with cg_tol 0 runs all of its 40 CG steps, a checkpoint every 2
    return [sys.executable, "-m", "swimdist.cli", "train", "--dataset", "sine",
            "--n-train", "3000", "--n-test", "300", "--hidden", "150", "--seed", "3",
            "--chunk-rows", "500", "--n-workers", "1", "--solver", "normal-tiled",
            "--solver-option", "cg_tol=0", "--solver-option", "max_iter=40",
            "--solver-option", "checkpoint_every=2", "--solver-option", "tile=40",
            "--store", str(store), "-o", str(out)]


def test_killed_mid_solve_resumes_to_the_same_model(tmp_path):
    ref_out = tmp_path / "ref"
    r = subprocess.run(_argv(ref_out, tmp_path / "ref-store"), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr
    reference = load_model(str(ref_out / "model.npz"))

    out, store = tmp_path / "out", tmp_path / "store"
    state = tmp_path / "store.solve" / "pcg.npz"
    proc = subprocess.Popen(_argv(out, store), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 200
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: a lost machine
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the solve finished before it could be killed"
    assert not (out / "model.npz").exists()
    assert json.loads((out / "status.json").read_text())["phase"] == "fitting"
    with np.load(state) as z:
        assert 0 < int(z["it"]) < 40  # killed in the middle of CG

    r = subprocess.run(_argv(out, store), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "status.json").read_text())["fit_info"]
    assert info["blocks"]["written"] == 0
    assert info["blocks"]["reused"] == info["blocks"]["blocks"] == 6
    assert info["panels_reused"] == info["panels"] and info["cg_resumed_at"] >= 2
    resumed = load_model(str(out / "model.npz"))
    np.testing.assert_allclose(resumed.coef_, reference.coef_, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(resumed.intercept_, reference.intercept_, rtol=1e-12, atol=1e-14)
    # the checkpoint goes once the model is written
    assert not os.path.exists(tmp_path / "store.solve")
