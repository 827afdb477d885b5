"""Feature stores: ``swimdist info``, checksum bookkeeping, block verification, the store lock
and atomic writes."""

from __future__ import annotations

import glob
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading

import dask
import dask.array as da
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from swimdist import SWIMRegressor
from swimdist._io import write_atomic
from swimdist.cli import main
from swimdist.datasets import sine
from swimdist.exceptions import StoreError
from swimdist.sampling import sample_layers
from swimdist.store import (
    NpyBackend,
    StoreLock,
    ZarrBackend,
    build,
    build_feature_store,
    describe_store,
    store_backend,
    verify_blocks,
)

N, ROWS = 300, 50  # six row blocks
BLOCKS = N // ROWS


def fit_store(path, store_format: str):
    X, y = sine(N, seed=1)
    with dask.config.set({"swimdist.store-format": store_format}):
        return SWIMRegressor(hidden_layer_sizes=(20,), store=str(path), random_state=0,
                             solver="direct", chunk_rows=ROWS).fit(X, y)


def corrupt_block(path, store_format: str, block: int) -> None:
    """Change bytes of one row block's data, leaving its checksum as it is."""
    if store_format == "npy":
        m = np.load(os.path.join(path, "features.npy"), mmap_mode="r+")
        m[block * ROWS + 3, 5] += 1.0
        m.flush()
        del m
        return
    (chunk,) = glob.glob(os.path.join(path, "features", "c", str(block), "*"))
    with open(chunk, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))


def info(path):
    return CliRunner().invoke(main, ["info", str(path)])


# --------------------------------------------------------------------------- swimdist info
@pytest.mark.parametrize("store_format", ["zarr", "npy"])
def test_info_describes_a_store_and_sees_a_damaged_block(tmp_path, store_format):
    path = tmp_path / "s"
    est = fit_store(path, store_format)
    assert est.fit_info_["blocks"]["written"] == BLOCKS
    r = info(path)
    assert r.exit_code == 0, r.output
    d = yaml.safe_load(r.stdout)
    fingerprint = store_backend(str(path)).meta()["fingerprint"]
    assert d["format"] == store_format
    assert d["shape"] == [N, 20] and d["dtype"] == "float64" and d["rows_per_block"] == ROWS
    assert d["fingerprint"] == fingerprint and len(fingerprint) == 32
    assert d["complete"] is True
    assert d["blocks"] == {"total": BLOCKS, "written": BLOCKS, "verified": BLOCKS}
    assert d["cols_per_chunk"] == (20 if store_format == "zarr" else None)

    corrupt_block(str(path), store_format, 2)
    d = yaml.safe_load(info(path).stdout)
    assert d["blocks"] == {"total": BLOCKS, "written": BLOCKS, "verified": BLOCKS - 1}
    assert d["complete"] is False  # a block no longer verifies: the next run rebuilds it
    # describing changes nothing: the damaged block still counts as written
    assert describe_store(str(path))["blocks"]["written"] == BLOCKS


@pytest.mark.parametrize("content", ["empty", "missing", "foreign", "file"])
def test_info_on_something_that_is_not_a_store_is_one_error_line(tmp_path, content):
    path = tmp_path / "d"
    if content == "empty":
        path.mkdir()
    elif content == "foreign":
        path.mkdir()
        (path / "notes.txt").write_text("not a store")
    elif content == "file":
        path.write_text("not a store")
    r = info(path)
    assert r.exit_code == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
    assert "Traceback" not in r.output
    if content == "foreign":
        assert os.listdir(path) == ["notes.txt"]  # left untouched


# --------------------------------------------------------------------------- checksums
def small_problem(n_blocks: int, rows: int = 8):
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(n_blocks * rows, 3))
    layers = sample_layers(X, np.sin(X.sum(axis=1))[:, None], [12], seed=0)
    return da.from_array(X, chunks=(rows, -1)), layers


@pytest.mark.parametrize("store_format", ["zarr", "npy"])
def test_block_tasks_read_only_their_own_checksum(tmp_path, monkeypatch, store_format):
    calls = {"crcs": 0, "crc": 0}
    for cls in (ZarrBackend, NpyBackend):
        crcs, crc = cls.crcs, cls.crc

        def counted_crcs(self, _f=crcs):
            calls["crcs"] += 1
            return _f(self)

        def counted_crc(self, i, _f=crc):
            calls["crc"] += 1
            return _f(self, i)

        monkeypatch.setattr(cls, "crcs", counted_crcs)
        monkeypatch.setattr(cls, "crc", counted_crc)
    Xd, layers = small_problem(40)
    url = str(tmp_path / "s")
    _, info1 = build_feature_store(Xd, layers, url, fingerprint="fp", store_format=store_format)
    assert info1["written"] == 40
    assert calls == {"crcs": 0, "crc": 40}  # one entry per block task, never the whole array
    _, info2 = build_feature_store(Xd, layers, url, fingerprint="fp")
    assert info2 == {"blocks": 40, "written": 0, "reused": 40, "verified": 40}
    # the resumed build reads the checksum array once (to plan verification), on the client
    assert calls == {"crcs": 1, "crc": 80}


# --------------------------------------------------------------------------- verification
def test_verification_runs_one_task_per_written_block(tmp_path, monkeypatch):
    Xd, layers = small_problem(6)
    url = str(tmp_path / "s")
    build_feature_store(Xd, layers, url, fingerprint="fp")
    backend = store_backend(url)
    backend.set_crc(4, 0)  # block 4 missing: nothing to verify there
    seen = []
    original = build._verify_block

    def spy(*args):
        ok = original(*args)
        seen.append((args[1], threading.current_thread() is threading.main_thread(), ok))
        return ok

    monkeypatch.setattr(build, "_verify_block", spy)
    assert verify_blocks(backend, 8) == 5
    assert sorted(i for i, _, _ in seen) == [0, 1, 2, 3, 5]
    assert not any(main for _, main, _ in seen)  # run by the scheduler, not on the client
    assert all(ok is True for _, _, ok in seen)


@pytest.mark.parametrize("store_format", ["zarr", "npy"])
def test_verification_resets_only_the_damaged_block_and_the_rebuild_writes_only_it(
        tmp_path, store_format):
    path = tmp_path / "s"
    first = fit_store(path, store_format)
    backend = store_backend(str(path))
    before = backend.crcs().copy()
    corrupt_block(str(path), store_format, 3)
    assert verify_blocks(backend, ROWS, reset=False) == BLOCKS - 1
    np.testing.assert_array_equal(backend.crcs(), before)  # counting alone changes nothing
    assert verify_blocks(backend, ROWS) == BLOCKS - 1
    after = backend.crcs()
    assert after[3] == 0 and np.count_nonzero(after) == BLOCKS - 1
    np.testing.assert_array_equal(np.delete(after, 3), np.delete(before, 3))
    # the next fit regenerates block 3 alone, and it is the block it was
    second = fit_store(path, store_format)
    assert second.fit_info_["blocks"] == {"blocks": BLOCKS, "written": 1, "reused": BLOCKS - 1,
                                          "verified": BLOCKS - 1}
    np.testing.assert_array_equal(backend.crcs(), before)
    np.testing.assert_allclose(second.coef_, first.coef_, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- lock
def _contend(store: str, barrier, results, rounds: int) -> None:
    """One contender: each round, try to take the lock at the same moment as the others and,
    if it won, hold it until every contender has tried."""
    for r in range(rounds):
        barrier.wait()
        lock = None
        try:
            lock = StoreLock(store).acquire()
            results.put((r, os.getpid(), None))
        except StoreError as exc:
            results.put((r, os.getpid(), str(exc)))
        barrier.wait()  # everyone has tried
        if lock is not None:
            lock.release()
        barrier.wait()  # released


def leave_stale_lease(store: str) -> None:
    code = ("import os, sys; from swimdist.store import StoreLock; "
            "StoreLock(sys.argv[1], ttl=3600).acquire(); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code, store], timeout=120)
    assert r.returncode == -signal.SIGKILL
    assert os.path.exists(store + ".lock")


def test_exactly_one_of_many_contenders_gets_the_lock(tmp_path):
    """Eight processes start at one barrier: on a free store and on one whose lease was left
    by a killed job, exactly one wins; the others are told who holds it."""
    store, n, rounds = str(tmp_path / "store"), 8, 2
    # forkserver: the contenders fork from one process that has imported swimdist already
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["swimdist.store.lock", _contend.__module__])
    barrier, results = ctx.Barrier(n + 1, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(store, barrier, results, rounds))
             for _ in range(n)]
    for p in procs:
        p.start()
    try:
        outcomes = []
        for r in range(rounds):
            if r == 1:
                leave_stale_lease(store)
            for _ in range(3):
                barrier.wait()
            outcomes.append([results.get(timeout=60) for _ in range(n)])
    finally:
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    host = socket.gethostname()
    for got in outcomes:
        winners = [pid for _, pid, err in got if err is None]
        assert len(winners) == 1, got
        for _, pid, err in got:
            if pid != winners[0]:
                assert f"is in use by another job (pid {winners[0]} on {host})" in err
    # released: free for the next job, and nothing is left beside the store
    StoreLock(store).acquire().release()
    assert sorted(os.listdir(tmp_path)) == []


def test_lock_is_refused_while_held_and_free_after_release(tmp_path):
    store = str(tmp_path / "store")
    with StoreLock(store) as held:
        assert os.path.exists(store + ".lock")
        with pytest.raises(StoreError, match=rf"in use by another job \(pid {os.getpid()} on "):
            StoreLock(store).acquire()
        assert held._fd is not None
    again = StoreLock(store).acquire()
    again.release()
    leave_stale_lease(store)
    StoreLock(store).acquire().release()  # a killed holder does not block the store
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- atomic writes
def test_write_atomic_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(b"old content")

    def half_then_fail(f):
        f.write(b"new, but only ha")
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        write_atomic(str(path), half_then_fail)
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["model.npz"]
    write_atomic(str(path), lambda f: f.write(b"new content"))
    assert path.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["model.npz"]


def test_npy_reader_reuses_its_buffer_and_refuses_a_truncated_file(tmp_path):
    from swimdist.store.backends import NpyBackend

    rng = np.random.default_rng(0)
    H = rng.standard_normal((50, 7)).astype(np.float32)
    b = NpyBackend(str(tmp_path / "s"))
    b.create(H.shape, 10, 5, np.float32, {"format": "swimdist.feature-store"})
    b.write_rows(0, H)
    read = b.reader()
    v1 = read(0, 10, 0, 7, view=True)
    np.testing.assert_array_equal(v1, H[:10])
    v2 = read(10, 20, 2, 5, view=True)  # a column range of the same buffer
    np.testing.assert_array_equal(v2, H[10:20, 2:5])
    assert np.shares_memory(v1, v2)  # valid until the next read, as documented
    copy = read(40, 50, 0, 7)
    np.testing.assert_array_equal(copy, H[40:])
    assert not np.shares_memory(copy, v1)
    np.testing.assert_array_equal(b.read_rows(5, 15), H[5:15])
    path = tmp_path / "s" / "features.npy"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 7 * 4 * 3])  # three rows short
    with pytest.raises(StoreError, match="damaged"):
        b.reader()(40, 50, 0, 7)
