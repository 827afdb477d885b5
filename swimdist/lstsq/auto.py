"""``solver="auto"``: pick the fastest solver whose accuracy can be vouched for, then check it.

Rules, in order (each choice is logged on ``swimdist.lstsq`` and stored in
``result.info["chosen"]`` / ``result.info["reason"]``):

1. The dense ``n x n`` work must fit the client's memory (``memory_limit``, default the
   available memory); otherwise ``"split"`` (column blocks) when it is registered.
2. ``direct`` (gelsd) when ``A`` is small (``N n <= small_entries``) or not tall
   (``N < tall_ratio * n``: a sketch of ``gamma n`` rows then saves little), and ``A`` fits
   on the client (at most ``direct_fraction`` of its memory; never gathered from a cluster of
   several workers unless small). It is the reference, so nothing is lost.
3. ``normal`` with verification when the target tolerates the Gram matrix's resolution:
   classification (``task="classification"``, or ``Y`` one-hot / +-1 columns) or an
   ``rcond`` the Gram matrix resolves (:func:`.normal.trusted_rcond`). One pass plus one thin
   verification pass; the check solves the subspace the Gram matrix cannot resolve from
   ``A V_0`` directly and accepts only when the residual cannot shrink by more than ``tol``.
   When that subspace is over ``max_unresolved`` of the columns the verification would cost
   more than the alternative, and ``sketch-direct`` runs instead.
4. Otherwise (regression with a tiny ``rcond``): ``sketch-direct``, whose refinement pass
   checks it the same way.
5. Fallbacks: a check that fails moves on to ``sketch-direct``, then ``direct`` (when ``A``
   fits) or ``lsrn``; ``info["attempts"]`` lists every try.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from .._dask import available_memory, client_memory, worker_memory
from ..design import as_design
from ..exceptions import ConvergenceWarning, ValidationError
from ._common import decision_rule, is_dask, looks_like_classification
from .costs import TASK_OVERHEAD, Rates, machine_rates, rates_known
from .normal import trusted_rcond
from .result import LstsqResult

logger = logging.getLogger("swimdist.lstsq")

TASKS = ("classification", "regression")

#: The solvers ``auto`` may run; its options are theirs (each gets the ones it takes).
CANDIDATES = ("direct", "normal", "sketch-direct", "lsrn", "normal-tiled", "split")

#: Below ``N n^2`` of this, gelsd (at 2 GFLOP/s or more) takes less time than measuring the
#: machine's rates would (about three seconds, once per machine): until they are measured (by
#: a larger problem), such problems go straight to the reference.
CALIBRATION_FLOPS = 2e9

#: Most verification passes ``auto`` lets ``normal`` make (each after the first is thin);
#: within it, the passes stop where their time would reach the fallback's.
MAX_REFINE = 20

__all__ = ["CALIBRATION_FLOPS", "CANDIDATES", "MAX_REFINE", "TASKS", "choose",
           "looks_like_classification", "predict", "solve_auto", "unresolved_budget"]


# --------------------------------------------------------------------------- byte counts
# The memory models every plan shares (the embedded cluster's budget split in
# :func:`swimdist.cluster.plan_memory` and the choice below): bytes of float64 dense work.


def client_dense_bytes(n: int, gamma: float = 2.0) -> float:
    """The client's dense ``n x n`` work of ``normal`` / ``sketch-direct``: the sketch
    ``S A`` (``gamma n x n``) or the Gram matrix, its eigen- or singular vectors, the
    preconditioner and a copy: ``8 n^2 (gamma + 3)`` bytes."""
    return 8.0 * n * n * (gamma + 3)


def gram_partials_bytes(n: int) -> float:
    """What ``normal``'s tree reduction holds on one worker: about five ``n x n`` partial
    sums (its inputs and its output), ``40 n^2`` bytes; a worker may give half its limit."""
    return 8.0 * n * n * 5


def tiled_client_bytes(n: int, tile: int) -> float:
    """``normal-tiled``'s client: the upper triangle of the Gram matrix as float64 row
    panels (``4 n^2 + 4 n tile`` bytes: half the square and the diagonal tiles' lower
    halves) and one panel in flight (float32 as it arrives and its float64 copy,
    ``12 n tile``)."""
    return 4.0 * n * n + 16.0 * n * tile


def tiled_worker_bytes(n: int, tile: int) -> float:
    """What one ``normal-tiled`` panel task holds on a worker: its float32 panel and the
    copy sent back (``8 n tile``) and two row blocks of its columns (the one read from
    the store and the one converted)."""
    from .tiled import PANEL_BLOCK_BYTES

    return 8.0 * n * tile + 2.0 * PANEL_BLOCK_BYTES


def predict(
    shape: tuple[int, int],
    *,
    n_rhs: int = 1,
    classification: bool,
    rcond: float,
    alpha: float,
    in_memory: bool,
    n_workers: int = 0,
    memory_limit: float | None = None,
    gamma: float = 2.0,
    dtype="float64",
    rates: Rates | None = None,
    bandwidth: float | None = None,
) -> dict[str, tuple[float, float]]:
    """Predicted seconds ``(best, worst)`` of ``direct``, ``normal`` and ``sketch-direct`` on
    an ``N x n`` problem, over what only the data can tell (``inf``: does not fit).

    ``normal``'s regression path ranges from no unresolved direction (one thin pass after
    the Gram matrix) to all of them (``k = n``), but once its eigendecomposition has shown
    ``k`` it verifies only while that is cheaper than the fallback
    (:func:`unresolved_budget`): its worst case is the Gram matrix and the fallback.
    ``sketch-direct`` is counted with a full sketch rank (``r = n``).
    """
    N, n, K = int(shape[0]), int(shape[1]), int(n_rhs)
    # gelsd's and eigh's rates measured as wide as n, unless gelsd takes less time than that
    rates = rates or machine_rates(n if N * n * n > CALIBRATION_FLOPS else None)
    mem = float(memory_limit) if memory_limit else available_memory()
    a_bytes = 8.0 * N * n
    # gelsd: numpy copies A (Fortran order) next to the client's copy; gathered from workers
    # when A lives there
    direct_bytes = a_bytes * (2 if in_memory else 3) + client_dense_bytes(n, 0.0)
    t = rates.gelsd(N, n)
    if not in_memory and n_workers > 0:
        t += a_bytes / (bandwidth or 100e6)
    direct = t if direct_bytes <= mem else math.inf
    thin = rates.product(N, n, K, dtype) * 2  # A X and A^T R
    s = math.ceil(gamma * n)
    sketch = (rates.sparse_sketch(N, n) + rates.gelsd(s, n) + rates.product(N, n, n, dtype)
              + rates.eig(n) / 3 + thin) if N >= s else math.inf
    gram = rates.gram(N, n, dtype)
    if classification or (alpha == 0 and rcond >= trusted_rcond(n)):
        normal = (gram + rates.eig(n) + thin,) * 2
    elif alpha > 0:
        normal = (gram + rates.eig(n) / 3 + thin,) * 2  # Cholesky: n^3 / 3
    else:
        full = rates.product(N, n, n + K, dtype) + rates.eig(n) + thin
        first = gram + rates.eig(n)
        normal = (first + thin, first + min(full, sketch, direct))
    # every pass over A has a fixed cost (a task at least): gelsd makes none
    normal = (normal[0] + 2 * TASK_OVERHEAD, normal[1] + 4 * TASK_OVERHEAD)
    sketch += 3 * TASK_OVERHEAD
    return {"direct": (direct, direct), "normal": normal, "sketch-direct": (sketch, sketch)}


def unresolved_budget(shape, *, n_rhs: int, fallback_seconds: float, rates: Rates | None = None,
                      dtype="float64") -> float:
    """The most columns of ``Z`` (as a fraction of ``n``) whose verification pass (``2 N n
    (k + K) + N k^2`` flops and a ``k x k`` eigendecomposition) costs less than the fallback:
    ``normal``'s ``max_unresolved`` under ``auto`` (``k``: the unresolved directions, or the
    part of them a sketch narrowed them to)."""
    N, n = int(shape[0]), int(shape[1])
    rates = rates or machine_rates()
    if not math.isfinite(fallback_seconds):
        return 1.0

    def cost(k):
        return rates.product(N, n, k + n_rhs, dtype) + rates.eig(max(k, 1))

    if cost(n) <= fallback_seconds:
        return 1.0
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= fallback_seconds else (lo, mid)
    return lo / n


def choose(
    shape: tuple[int, int],
    *,
    classification: bool,
    rcond: float,
    alpha: float,
    in_memory: bool,
    n_workers: int = 0,
    memory_limit: float | None = None,
    gamma: float = 2.0,
    registered=(),
    store_streaming: bool = False,
    worker_memory: float | None = None,
    n_rhs: int = 1,
    dtype="float64",
    rates: Rates | None = None,
    candidates=None,
    bandwidth: float | None = None,
) -> tuple[str, str]:
    """The solver ``auto`` starts with for a problem of this shape, and why (no data touched).

    Parameters
    ----------
    shape : (N, n)
    classification : bool
        The target is a classification (class indicators).
    rcond, alpha : float
        As in :func:`swimdist.solve`.
    in_memory : bool
        ``A`` is a numpy array on the client already.
    n_workers : int
        Workers of the distributed cluster in use (0: none).
    memory_limit : float, optional
        Bytes the client may use (default: the available memory).
    gamma : float
        Sketch oversampling of ``sketch-direct``.
    registered : iterable of str
        Solver names available (for ``split`` and ``normal-tiled``).
    store_streaming, worker_memory
        ``A`` is read from a feature store (``normal-tiled`` can stream it); a worker's limit.
    n_rhs, dtype
        Right-hand sides; ``A``'s dtype (float32 products run at float32 rates).
    rates : Rates, optional
        Measured rates (default: this machine's, :func:`.costs.machine_rates`).
    candidates : iterable of str, optional
        Restrict the first choice to these (default: direct, normal, sketch-direct).
    bandwidth : float, optional
        Bytes per second from the workers to the client (default: the scheduler's measure).
    """
    N, n = int(shape[0]), int(shape[1])
    mem = float(memory_limit) if memory_limit else available_memory()
    resolved = classification or (alpha == 0 and rcond >= trusted_rcond(n))
    # "normal"'s tree reduction holds about five (n x n) partial sums per worker; past the
    # budget, stream column tiles of the Gram matrix from the feature store instead.
    # On a cluster they must also fit half of one worker's memory limit.
    partials = gram_partials_bytes(n)
    room = min(mem, 0.5 * worker_memory) if worker_memory else mem
    if store_streaming and resolved and "normal-tiled" in registered and partials > room:
        return "normal-tiled", (
            f"{n} columns: the Gram reduction's partial sums ({partials / 2**30:.1f} GiB) "
            f"exceed the memory they may use ({room / 2**30:.1f} GiB: the budget, or half a "
            "worker's memory limit); row panels streamed from "
            "the feature store, float32 panel products preconditioning float64 block CG"
        )
    dense = client_dense_bytes(n, gamma)
    if dense > mem:
        if "split" in registered:
            return "split", (
                f"the dense {n} x {n} work ({dense / 2**30:.1f} GiB) exceeds the "
                f"client memory ({mem / 2**30:.1f} GiB); column blocks instead"
            )
        raise ValidationError(
            f"A has {n} columns: the dense {n} x {n} work needs about {dense / 2**30:.1f} GiB "
            f"but {mem / 2**30:.1f} GiB is available. Use fewer neurons or solver='split'."
        )
    if N * n * n <= CALIBRATION_FLOPS and not candidates and rates is None and not rates_known():
        # gelsd finishes before the rates could be measured
        return "direct", f"A is small ({N} x {n}); gelsd is the reference"
    secs = predict(shape, n_rhs=n_rhs, classification=classification, rcond=rcond, alpha=alpha,
                   in_memory=in_memory, n_workers=n_workers, memory_limit=mem, gamma=gamma,
                   dtype=dtype, rates=rates, bandwidth=bandwidth)
    pool = tuple(candidates) if candidates else tuple(secs)
    pool = [c for c in pool if c in secs and (not registered or c in registered)
            and math.isfinite(secs[c][1])]
    if not pool:
        if "lsrn" in registered or not registered:
            return "lsrn", "neither gelsd nor a dense n x n solve fits the client's memory"
        raise ValidationError(f"No solver fits a {N} x {n} problem in "
                              f"{mem / 2**30:.1f} GiB of client memory.")
    name = min(pool, key=lambda c: (regret(c, pool, secs), c != "direct"))
    table = ", ".join(f"{c} {_span(secs[c])} s" for c in ("direct", "normal", "sketch-direct")
                      if c in secs)
    why = {
        "direct": "gelsd is the reference",
        "normal": ("classification target: certified over the directions the Gram matrix "
                   "resolves" if classification else
                   "certified by its verification pass" if alpha == 0 else
                   "Cholesky on the damped Gram matrix"),
        "sketch-direct": "sketch-preconditioned direct solve, certified by its refinement pass",
    }[name]
    task = "classification" if classification else "regression"
    return name, f"predicted {table} ({task}; least regret over the data); {why}"


def _span(t: tuple[float, float]) -> str:
    return f"{t[0]:.2g}" if t[0] == t[1] else f"{t[0]:.2g}..{t[1]:.2g}"


def regret(name: str, pool, secs: dict[str, tuple[float, float]]) -> float:
    """The most time starting with ``name`` can lose against the best choice in hindsight,
    over the two extremes the data decides between (the best and the worst case of each
    candidate): ``auto``'s choice minimizes it (a minimax-regret rule: no prior over the
    data is assumed)."""
    return max(secs[name][i] - min(secs[c][i] for c in pool) for i in (0, 1))


def solve_auto(
    A,
    Y,
    *,
    rcond: float = 1e-10,
    alpha: float = 0.0,
    task: str | None = None,
    memory_limit: float | None = None,
    candidates=None,
    accept_tol: float = 1e-2,
    **options,
) -> LstsqResult:
    """Solve ``min ||A X - Y||_F`` with the solver the cost models in the module doc pick.

    Parameters
    ----------
    A, Y, rcond, alpha
        As in :func:`swimdist.solve`.
    task : {"classification", "regression"}, optional
        The conditioning target; inferred from ``Y`` (class indicators: classification) if
        None.
    memory_limit : float, optional
        Bytes the client may use for dense work (default: ``swimdist.client-memory``, the
        client's share of ``swimdist train --memory-limit``, else the available memory).
    candidates : sequence of str, optional
        Solvers ``auto`` may start with (default: ``direct``, ``normal``, ``sketch-direct``;
        the fallbacks are always available).
    accept_tol : float
        The certificate of ``normal`` and ``sketch-direct`` (their ``accept_tol``): a
        solution is accepted when its residual is within ``1 / sqrt(1 - accept_tol^2)`` of the
        best over the certified subspace.
    **options
        Options of the candidate solvers (:data:`CANDIDATES`: ``seed``, ``gamma``,
        ``tile``...): each candidate receives the ones it takes. An option that none of them
        takes is refused by :func:`swimdist.solve`.

    Returns
    -------
    LstsqResult
        ``method="auto"``; ``info["chosen"]``, ``info["reason"]``, ``info["attempts"]``,
        ``info["predicted_seconds"]``.
    """
    from . import SOLVERS, check_options, solver_options

    check_options("auto", options)
    if task is not None and task not in TASKS:
        raise ValidationError(f"Unknown task {task!r}; valid tasks are: {', '.join(TASKS)}.")
    if candidates is not None:
        bad = [c for c in candidates if c not in CANDIDATES]
        if bad or not len(candidates):
            raise ValidationError(f"candidates must be a non-empty list of "
                                  f"{', '.join(CANDIDATES)}; got {candidates!r}.")
    t0 = time.perf_counter()
    design = as_design(A)
    A = design.array
    if memory_limit is None:
        memory_limit = client_memory()  # the client's share of `swimdist train --memory-limit`
    mem = float(memory_limit) if memory_limit else available_memory()
    classification = (task == "classification") if task else looks_like_classification(Y)
    n_workers, worker_limit, _ = worker_memory() if is_dask(A) else (0, None, None)
    gamma = float(options.get("gamma", 2.0))
    N, n = A.shape
    K = Y.shape[1]
    bandwidth = _bandwidth() if n_workers else None
    common = dict(classification=classification, rcond=rcond, alpha=alpha,
                  in_memory=not is_dask(A), n_workers=n_workers, memory_limit=mem,
                  gamma=gamma, bandwidth=bandwidth)
    name, reason = choose(
        A.shape,
        registered=tuple(SOLVERS),
        store_streaming=design.reader is not None,
        worker_memory=worker_limit,
        n_rhs=K,
        dtype=A.dtype,
        candidates=candidates,
        **common,
    )
    spans = (predict(A.shape, n_rhs=K, dtype=A.dtype, **common)
             if name in ("normal", "sketch-direct", "direct")
             and (N * n * n > CALIBRATION_FLOPS or candidates or rates_known()) else {})
    secs = {c: t[1] for c, t in spans.items()}  # worst cases
    t_choose = time.perf_counter() - t0
    logger.info(
        "auto: %s for A %s, K=%d, %s (%s, %d workers): %s",
        name,
        A.shape,
        K,
        "classification" if classification else "regression",
        "dask" if is_dask(A) else "numpy",
        n_workers,
        reason,
    )
    # Fallbacks: the other certified solvers in order of predicted cost, then the reference
    # (when A fits) or LSRN.
    fits = secs.get("direct", math.inf) < math.inf if secs else (
        8.0 * N * n * (2 if not is_dask(A) else 3) <= mem)
    chain = [name]
    if name in ("normal", "sketch-direct", "direct"):
        if name == "normal" and math.isfinite(secs.get("sketch-direct", math.inf)) and (
                secs["sketch-direct"] <= secs.get("direct", math.inf)):
            chain.append("sketch-direct")
        if name != "direct":
            chain.append("direct" if fits else "lsrn")
    attempts: list[dict] = []
    res = None
    for i, cand in enumerate(chain):
        if cand not in SOLVERS:
            continue
        takes = solver_options(cand)
        opts = {k: v for k, v in options.items() if k in takes}
        Ac = design
        if cand == "direct" and A.dtype != np.float64:
            # float32 storage: gelsd must still work in float64
            Ac = design.with_array(A.astype(np.float64))
        if cand == "normal-tiled":
            opts.setdefault("gram_dtype", "float32" if classification else "float64")
            if classification and decision_rule(Y) is not None:
                opts.setdefault("stop", "accuracy")  # the error settles long before
        if cand == "normal":
            opts.update(accept_tol=accept_tol)
            if alpha == 0:
                opts["verify"] = "resolved" if classification else True
                # verify the unresolved directions only while that costs less than the
                # solver that would take over
                # solver that would take over: half its predicted time for the pass over the
                # unresolved directions, half for the thin refinement passes after it
                later = [secs.get(c, math.inf) for c in chain[i + 1:]]
                fallback = min(later, default=math.inf)
                if secs and math.isfinite(fallback):
                    opts["max_unresolved"] = unresolved_budget(
                        A.shape, n_rhs=K, dtype=A.dtype, fallback_seconds=0.5 * fallback)
                    thin = 2 * machine_rates().product(N, n, K, A.dtype) + TASK_OVERHEAD
                    opts.setdefault("max_refine",
                                    int(min(MAX_REFINE, max(3, 1 + 0.5 * fallback // thin))))
        elif cand == "sketch-direct":
            opts.update(accept_tol=accept_tol)
        res = SOLVERS[cand](Ac, Y, rcond=rcond, alpha=alpha, **opts)
        ok = bool(res.converged)
        attempts.append(
            {
                "solver": cand,
                "converged": ok,
                "info": dict(res.info),
                "seconds": float(sum(v for k, v in res.timings.items() if k != "total")),
            }
        )
        if ok or i == len(chain) - 1:
            break
        nxt = next((c for c in chain[i + 1 :] if c in SOLVERS), None)
        why = res.info.get("reason") or (
            f"the check left a possible residual reduction of "
            f"{res.info.get('refine_gain', math.nan):.2e}"
        )
        logger.info("auto: %s not accepted (%s); falling back to %s", cand, why, nxt)
        reason += f"; {cand} not accepted ({why}), fell back to {nxt}"
    chosen = attempts[-1]["solver"]
    if not attempts[-1]["converged"]:
        import warnings

        warnings.warn(
            f"solver='auto': no solver passed its accuracy check ({reason}); "
            f"returning {chosen}'s result.",
            ConvergenceWarning,
            stacklevel=3,
        )
    timings = {"choose": t_choose}
    for a in attempts[:-1]:
        timings[f"rejected_{a['solver']}"] = a["seconds"]
    timings.update({k: v for k, v in res.timings.items() if k != "total"})
    info = {
        **res.info,
        "chosen": chosen,
        "reason": reason,
        "attempts": attempts,
        "task": "classification" if classification else "regression",
        "predicted_seconds": {k: list(v) for k, v in spans.items() if math.isfinite(v[1])},
    }
    return LstsqResult(
        solution=res.solution,
        method="auto",
        rank=res.rank,
        residual_norm=res.residual_norm,
        relative_residual=res.relative_residual,
        iterations=res.iterations,
        residual_history=res.residual_history,
        timings=timings,
        converged=res.converged,
        info=info,
    )


def _bandwidth() -> float | None:
    """Bytes per second the scheduler measures between workers (distributed's estimate)."""
    from .._dask import current_client

    client = current_client()
    if client is None:
        return None
    try:
        return float(client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.bandwidth))
    except Exception:  # noqa: BLE001 -- an estimate only; the default is distributed's own
        return None
