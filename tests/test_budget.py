"""One memory budget for every process of a job: the client's share, then the workers'."""

from __future__ import annotations

import json

import pytest
from dask.utils import parse_bytes

from swimdist.cluster import CLUSTER_OVERHEAD, WORKER_FLOOR, plan_memory
from swimdist.exceptions import ValidationError
from swimdist.lstsq.auto import choose, client_dense_bytes, tiled_client_bytes

MB = 2**20


@pytest.mark.parametrize("total, workers, n, rss", [
    ("2GB", 2, 4001, 600 * MB), ("5GB", 2, 20001, 650 * MB), ("8GB", 3, 1001, 300 * MB),
    ("1GB", 1, 201, 150 * MB), ("24GB", 2, 8001, 900 * MB),
])
def test_plan_splits_the_whole_budget_and_agrees_with_auto(total, workers, n, rss):
    plan = plan_memory(total, workers, n, client_rss=rss)
    budget = parse_bytes(total)
    assert plan.client_fixed == rss + CLUSTER_OVERHEAD
    used = plan.client_fixed + plan.client_dense + plan.n_workers * plan.worker_limit
    assert budget - workers <= used <= budget  # all of it, and no more
    assert plan.worker_limit >= WORKER_FLOOR
    # auto, given the client's share and a worker's limit, picks the family planned for
    name, _ = choose((60000, n), classification=True, rcond=1e-10, alpha=0.0,
                     in_memory=False, n_workers=workers, memory_limit=plan.client_dense,
                     registered=("direct", "normal", "normal-tiled", "sketch-direct", "split"),
                     store_streaming=True, worker_memory=plan.worker_limit)
    if plan.plan == "normal equations":
        assert plan.client_dense == client_dense_bytes(n)
        assert name != "normal-tiled"
    else:
        assert plan.client_dense == tiled_client_bytes(n, plan.gram_tile)
        assert name == "normal-tiled"
        assert settings_tile(plan) == plan.gram_tile
    settings = plan.settings()
    assert settings["swimdist.memory-budget"] == budget
    assert settings["swimdist.client-memory"] == plan.client_dense
    assert settings["swimdist.max-block-bytes"] == max(plan.worker_limit // 8, MB)


def settings_tile(plan):
    return plan.settings().get("swimdist.gram-tile")


def test_row_panels_shrink_with_the_budget():
    tiles = [plan_memory(b, 2, 20001, client_rss=650 * MB).gram_tile
             for b in ("12GB", "6GB", "5GB", "4.2GB")]
    assert tiles == sorted(tiles, reverse=True) and tiles[-1] < tiles[0]


def test_plan_refuses_a_budget_the_client_alone_exceeds():
    with pytest.raises(ValidationError, match=r"too small for 20001 columns on 2 workers"):
        plan_memory("1GB", 2, 20001, client_rss=500 * MB)
    with pytest.raises(ValidationError, match="Raise --memory-limit"):
        plan_memory("700MB", 2, 11, client_rss=500 * MB)


@pytest.mark.parametrize("n", [11, 501, 4001, 20001])
def test_the_refusal_names_the_least_budget_that_plans(n):
    """The budget a refusal names is one that plans (and a little less does not)."""
    from dask.utils import parse_bytes

    with pytest.raises(ValidationError, match="at least") as err:
        plan_memory("300MB", 2, n, client_rss=250 * MB)
    least = parse_bytes(str(err.value).split("at least ")[1].split(",")[0])
    plan_memory(int(least) + MB, 2, n, client_rss=250 * MB)
    with pytest.raises(ValidationError):
        plan_memory(int(least * 0.98), 2, n, client_rss=250 * MB)


def test_train_with_a_budget_sizes_the_workers_from_what_is_left(tmp_path, monkeypatch):
    """The embedded cluster's workers get the budget minus the client's measured share."""
    from swimdist import service

    seen = {}
    real_connect = __import__("swimdist.cluster", fromlist=["connect"]).connect

    def spy(address=None, **kw):
        seen.update(kw)
        return real_connect(address, **kw)

    monkeypatch.setattr("swimdist.cluster.connect", spy)
    spec = service.load_spec(overrides={
        "data": {"dataset": "sine", "n_train": 800, "n_test": 200},
        "model": {"hidden_layer_sizes": [80]},
        "output": str(tmp_path / "out"),
        "cluster": {"n_workers": 2, "memory_limit": "3GB"},
    })
    metrics = service.run_job(spec)
    assert metrics["test"]["mae"] < 0.1
    limit = parse_bytes(seen["memory_limit"]) if isinstance(seen["memory_limit"], str) \
        else int(seen["memory_limit"])
    assert 0 < limit < parse_bytes("3GB") - CLUSTER_OVERHEAD
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["phase"] == "done"
