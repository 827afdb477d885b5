"""Shared fixtures: seeds, small problems, the MNIST directory, LocalClusters."""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def mnist_dir() -> str | None:
    """Where the test MNIST files are (SWIMDIST_DATA_DIR or ../shared/data/mnist), or None."""
    for d in (os.environ.get("SWIMDIST_DATA_DIR"), REPO.parent / "shared" / "data" / "mnist"):
        if d and (pathlib.Path(d) / "train-images-idx3-ubyte.gz").exists():
            return str(d)
    return None


@pytest.fixture
def mnist_path():
    d = mnist_dir()
    if d is None:
        pytest.skip("MNIST IDX files not available (set SWIMDIST_DATA_DIR)")
    return d


@pytest.fixture(autouse=True)
def _restore_swimdist_logging():
    """``swimdist.cli.main`` configures logging for its process (its own handler on the
    ``swimdist`` logger, no propagation); an in-process CliRunner call must not leave that
    to the tests after it (their ``caplog`` listens at the root)."""
    log = logging.getLogger("swimdist")
    handlers, propagate, level = log.handlers[:], log.propagate, log.level
    yield
    log.handlers[:] = handlers
    log.propagate = propagate
    log.setLevel(level)


@pytest.fixture(params=[0, 1], ids=["seed0", "seed1"])
def global_random_seed(request):
    return request.param


@pytest.fixture
def sine_data():
    from swimdist.datasets import sine

    X, y = sine(600, alpha=2.0, seed=0)
    Xt, yt = sine(300, alpha=2.0, seed=1)
    return X, y, Xt, yt


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def local_cluster_factory():
    """Start LocalClusters of worker processes on 127.0.0.1; closes them afterwards."""
    from distributed import Client, LocalCluster

    made = []

    def make(n_workers: int = 1, threads_per_worker: int = 1, processes: bool = True):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                               processes=processes, dashboard_address=None,
                               host="127.0.0.1", memory_limit="2GB")
        client = Client(cluster)
        made.append((client, cluster))
        return client

    yield make
    for client, cluster in made:
        client.close()
        cluster.close()
