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
from ._common import is_dask
from .normal import trusted_rcond
from .result import LstsqResult

logger = logging.getLogger("swimdist.lstsq")

TASKS = ("classification", "regression")

#: The solvers ``auto`` may run; its options are theirs (each gets the ones it takes).
CANDIDATES = ("direct", "normal", "sketch-direct", "lsrn", "normal-tiled", "split")

__all__ = ["CANDIDATES", "TASKS", "choose", "looks_like_classification", "solve_auto"]


def looks_like_classification(Y) -> bool:
    """True when every row of ``Y`` is one-hot (0/1, one 1) or ``Y`` is one column of +-1."""
    Yn = Y.compute() if is_dask(Y) else np.asarray(Y)
    Yn = Yn.reshape(Yn.shape[0], -1)
    if Yn.shape[1] == 1:
        return bool(np.all(np.abs(Yn) == 1))
    return bool(np.all((Yn == 0) | (Yn == 1)) and np.all(Yn.sum(axis=1) == 1))


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


def choose(
    shape: tuple[int, int],
    *,
    classification: bool,
    rcond: float,
    alpha: float,
    in_memory: bool,
    n_workers: int = 0,
    memory_limit: float | None = None,
    small_entries: float = 2e6,
    tall_ratio: float = 8.0,
    direct_fraction: float = 0.25,
    gamma: float = 2.0,
    registered=(),
    store_streaming: bool = False,
    worker_memory: float | None = None,
) -> tuple[str, str]:
    """The solver ``auto`` starts with for a problem of this shape, and why (no data touched).

    Parameters
    ----------
    shape : (N, n)
    classification : bool
        The target is a classification (one-hot / +-1 targets).
    rcond, alpha : float
        As in :func:`swimdist.solve`.
    in_memory : bool
        ``A`` is a numpy array on the client already.
    n_workers : int
        Workers of the distributed cluster in use (0: none).
    memory_limit : float, optional
        Bytes the client may use (default: the available memory).
    small_entries, tall_ratio, direct_fraction, gamma
        Thresholds of the rules in the module doc.
    registered : iterable of str
        Solver names available (for ``split``).
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
    a_bytes = 8.0 * N * n
    small = N * n <= small_entries
    fits = (a_bytes if in_memory else 2 * a_bytes) <= direct_fraction * mem
    # Gathering from several workers is cheap below a few hundred MB (the sine problem's
    # 40 MB A: gelsd in 1 s beats any distributed pass there).
    gather_ok = in_memory or small or n_workers <= 1 or a_bytes <= 2**28
    if (small or N < tall_ratio * n) and fits and gather_ok:
        why = (
            f"A is small ({N} x {n})"
            if small
            else f"A is not tall ({N} x {n}, N/n = {N / n:.1f} < {tall_ratio:g}): a sketch "
            f"saves little"
        )
        return "direct", why + "; gelsd is the reference"
    if classification:
        return "normal", (
            "classification target: the Gram matrix's resolution suffices; "
            "verified by a thin second pass"
        )
    if alpha == 0 and rcond >= trusted_rcond(n):
        return "normal", (
            f"rcond={rcond:g} is within what the Gram matrix resolves "
            f"({trusted_rcond(n):.1e}); verified by a thin second pass"
        )
    return "sketch-direct", (
        f"regression with rcond={rcond:g} below the Gram matrix's "
        f"resolution ({trusted_rcond(n):.1e}): sketch-preconditioned "
        "direct solve"
    )


def solve_auto(
    A,
    Y,
    *,
    rcond: float = 1e-10,
    alpha: float = 0.0,
    task: str | None = None,
    memory_limit: float | None = None,
    small_entries: float = 2e6,
    tall_ratio: float = 8.0,
    direct_fraction: float = 0.25,
    max_unresolved: float = 0.25,
    accept_tol: float = 1e-2,
    **options,
) -> LstsqResult:
    """Solve ``min ||A X - Y||_F`` with the solver the rules in the module doc pick.

    Parameters
    ----------
    A, Y, rcond, alpha
        As in :func:`swimdist.solve`.
    task : {"classification", "regression"}, optional
        The conditioning target; inferred from ``Y`` (one-hot / +-1: classification) if None.
    memory_limit : float, optional
        Bytes the client may use for dense work (default: ``swimdist.client-memory``, the
        client's share of ``swimdist train --memory-limit``, else the available memory).
    small_entries, tall_ratio, direct_fraction
        Thresholds for choosing ``direct`` (module doc).
    max_unresolved : float
        ``normal`` gives way to ``sketch-direct`` when the Gram matrix leaves more than this
        fraction of the columns unresolved.
    accept_tol : float
        The acceptance test of ``normal`` and ``sketch-direct`` (their ``accept_tol``): a
        solution is accepted when its refinement step ``D`` has ``||A D|| <= accept_tol
        ||Y - A X||``.
    **options
        Options of the candidate solvers (:data:`CANDIDATES`: ``seed``, ``gamma``,
        ``tile``...): each candidate receives the ones it takes. An option that none of them
        takes is refused by :func:`swimdist.solve`.

    Returns
    -------
    LstsqResult
        ``method="auto"``; ``info["chosen"]``, ``info["reason"]``, ``info["attempts"]``.
    """
    from . import SOLVERS, check_options, solver_options

    check_options("auto", options)
    if task is not None and task not in TASKS:
        raise ValidationError(f"Unknown task {task!r}; valid tasks are: {', '.join(TASKS)}.")
    t0 = time.perf_counter()
    design = as_design(A)
    A = design.array
    if memory_limit is None:
        memory_limit = client_memory()  # the client's share of `swimdist train --memory-limit`
    classification = (task == "classification") if task else looks_like_classification(Y)
    n_workers, worker_limit, _ = worker_memory() if is_dask(A) else (0, None, None)
    gamma = float(options.get("gamma", 2.0))
    name, reason = choose(
        A.shape,
        classification=classification,
        rcond=rcond,
        alpha=alpha,
        in_memory=not is_dask(A),
        n_workers=n_workers,
        memory_limit=memory_limit,
        small_entries=small_entries,
        tall_ratio=tall_ratio,
        direct_fraction=direct_fraction,
        gamma=gamma,
        registered=tuple(SOLVERS),
        store_streaming=design.reader is not None,
        worker_memory=worker_limit,
    )
    t_choose = time.perf_counter() - t0
    logger.info(
        "auto: %s for A %s, K=%d, %s (%s, %d workers): %s",
        name,
        A.shape,
        Y.shape[1],
        "classification" if classification else "regression",
        "dask" if is_dask(A) else "numpy",
        n_workers,
        reason,
    )
    N, n = A.shape
    fits = 8.0 * N * n * (1 if not is_dask(A) else 2) <= direct_fraction * (
        float(memory_limit) if memory_limit else available_memory()
    )
    chain = [name]
    if name == "normal":
        chain.append("sketch-direct")
    if name in ("normal", "sketch-direct"):
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
        if cand == "normal":
            if alpha == 0:
                opts.update(verify=True, accept_tol=accept_tol, max_unresolved=max_unresolved)
        elif cand == "sketch-direct":
            opts.update(accept_tol=accept_tol)
        res = SOLVERS[cand](Ac, Y, rcond=rcond, alpha=alpha, **opts)
        ok = bool(res.converged)
        if cand == "normal" and alpha > 0:
            # Cholesky with damping: vouched when alpha dominates the Gram matrix's rounding
            ok = ok and res.info.get("alpha_resolved", False)
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
