"""Cost models of the solvers ``auto`` chooses among: flop and byte counts times rates measured
on this machine.

Every solver's time is modelled from the operations it performs, each with its own rate:

``gelsd(N, n)``
    numpy's dense solver: Householder QR (``2 N n^2 - 2/3 n^3`` flops) and a divide-and-conquer
    SVD of the ``n x n`` factor (``c n^3``). Modelled as ``a(n) N n^2 + b(n) n^3`` with ``a`` and
    ``b`` fitted from two measured shapes (``2n x n`` and ``8n x n``) at two widths, and from
    ``2n x n`` and ``4n x n`` at a third, :data:`WIDE_WIDTHS` (measured the first time a
    problem wider than the two needs it), and interpolated in ``log n``.
``syrk(N, n)``
    A Gram pass ``A^T A`` over the row blocks (upper tiles): ``N n^2`` flops at the measured
    rate of ``a.T @ a``.
``gemm(N, n, k)``
    A thin pass ``A W`` with ``W`` of ``k`` columns and its ``W``-side products
    (``2 N n k + N k^2``).
``eigh(n)``, ``svd(n)``
    ``t n^3`` with ``t`` measured (eigh also at :data:`WIDE_WIDTHS`).

``features(N, dims, activation)``
    Generating feature blocks from ``X``: ``2 N d_in M`` flops per layer at the product rate
    and ``N M`` activations at the activation's measured one-thread rate, spread over the
    worker threads (:func:`swimdist.design.placement_costs` weighs it against writing the
    features to disk once and reading them back every pass, at the rates
    :func:`disk_rates` measures on the store's file system).

A pass over a dask array adds the per-task overhead (about a millisecond a task on
distributed's scheduler) and, for gelsd on a cluster, the gather of ``A`` to the client
(bytes over the scheduler's measured bandwidth).

Rates are measured once per machine (about three seconds on two cores: gelsd, eigh, SVD, a
sparse sketch and matrix products at ``n = 256`` and ``1024``, with BLAS on every core; gelsd
and eigh at ``2048`` too, about six seconds more, the first time a problem of more than 1024
columns is costed) and cached
in ``$XDG_CACHE_HOME/swimdist/rates.json`` (default ``~/.cache``), keyed by the host, the CPU,
its cores and the numpy version (an activation's rate and a file system's read and
write rates are measured the first time a placement decision needs them and added to the
same file); below the sizes
measured the rate of the smallest applies, above them the largest's (BLAS rates flatten out
past a few hundred columns). ``SWIMDIST_RATES`` may name another JSON file of the same form.

What the models leave out is a constant factor of a few percent per operation (memory traffic
that is not a matrix product, Python overhead); the choices they drive are between costs that
differ by more, and where they do not the safer solver (the reference) is preferred.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger("swimdist.lstsq")

#: Widths at which the rates are measured.
CALIBRATION_WIDTHS = (256, 1024)
#: Wider widths at which gelsd's and eigh's rates are measured too. Their time per flop keeps
#: changing past 1024 columns, and not in one direction: on a 2-core machine gelsd ran 1.3 to
#: 2x faster at n = 1300..2000 than the 1024 rates predict, then slower again at n = 3000..4000
#: (numpy 2.4 / OpenBLAS 0.3.31). Those are the widths where ``auto`` weighs gelsd against
#: the normal equations on regression, so a wrong rate there picked the slower solver. The
#: products' rates flatten out past a few hundred columns and are not measured again.
WIDE_WIDTHS = (2048,)
#: Seconds of overhead per dask task on distributed's scheduler (its documentation: "about
#: 1 ms per task"); the threaded scheduler's is lower, this bounds it.
TASK_OVERHEAD = 1e-3

__all__ = ["CALIBRATION_WIDTHS", "WIDE_WIDTHS", "Rates", "activation_rate", "disk_rates",
           "machine_rates", "measure_wide", "rates_known", "solver_passes"]


def _interp(table: dict[str, float], n: float) -> float:
    """Value of a per-width table at width ``n``: linear in ``log n`` between the widths
    measured, the nearest one's outside them."""
    pts = sorted((float(k), v) for k, v in table.items())
    if n <= pts[0][0]:
        return pts[0][1]
    if n >= pts[-1][0]:
        return pts[-1][1]
    for (n0, v0), (n1, v1) in zip(pts, pts[1:], strict=False):
        if n0 <= n <= n1:
            w = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return v0 + w * (v1 - v0)
    return pts[-1][1]  # pragma: no cover


@dataclass
class Rates:
    """Measured rates (seconds per unit of work) of the operations the cost models count.

    Each table maps a width (as a string, for JSON) to its coefficient:
    ``gelsd_a`` (s per ``N n^2``), ``gelsd_b`` (s per ``n^3``), ``syrk`` (s per ``N n^2``),
    ``gemm`` and ``gemm32`` (s per flop, float64 / float32 products), ``eigh`` and ``svd``
    (s per ``n^3``), ``sketch`` (s per ``N n`` of the sparse-sign sketch, ``2n`` rows).
    """

    gelsd_a: dict[str, float] = field(default_factory=dict)
    gelsd_b: dict[str, float] = field(default_factory=dict)
    syrk: dict[str, float] = field(default_factory=dict)
    gemm: dict[str, float] = field(default_factory=dict)
    gemm32: dict[str, float] = field(default_factory=dict)
    eigh: dict[str, float] = field(default_factory=dict)
    svd: dict[str, float] = field(default_factory=dict)
    sketch: dict[str, float] = field(default_factory=dict)
    #: Seconds per element of each activation function, one thread (measured on first use).
    activation: dict[str, float] = field(default_factory=dict)
    #: File system ("device <st_dev>") -> [read, write] bytes per second of its disk
    #: (measured on first use; reads after the written pages are dropped from the cache).
    disk: dict[str, list[float]] = field(default_factory=dict)
    key: str = ""

    # ------------------------------------------------------------------ operations
    def gelsd(self, N: int, n: int) -> float:
        """Seconds of numpy's gelsd on an ``N x n`` matrix (``N >= n``)."""
        N = max(N, n)
        return max(_interp(self.gelsd_a, n), 0.0) * N * n * n + max(
            _interp(self.gelsd_b, n), 0.0) * n**3

    def gram(self, N: int, n: int, dtype="float64") -> float:
        """Seconds of a Gram pass ``A^T A`` (``N n^2`` flops in the upper tiles)."""
        t = _interp(self.syrk, n)
        if np.dtype(dtype) == np.float32:
            t *= _interp(self.gemm32, n) / _interp(self.gemm, n)
        return t * N * n * n

    def product(self, N: int, n: int, k: int, dtype="float64") -> float:
        """Seconds of a thin pass ``A W`` (``W``: ``n x k``) and ``W``-side products
        (``2 N n k + N k^2`` flops)."""
        rate = _interp(self.gemm32 if np.dtype(dtype) == np.float32 else self.gemm, max(k, 1))
        return rate * (2.0 * N * n * k + N * k * k)

    def sparse_sketch(self, N: int, n: int) -> float:
        """Seconds of the sparse-sign sketch ``S A`` (``2n`` rows, 8 nonzeros a column)."""
        return _interp(self.sketch, n) * N * n

    def features(self, N: int, dims, activation: str, threads: int = 1) -> float:
        """Seconds to generate ``N`` rows of features through layers of widths ``dims =
        (d, M1, M2, ...)``: the products ``2 N d_in M`` at the float64 rate of a matrix
        product of ``M`` columns (measured with BLAS on every core) and ``N M`` activations
        at the measured one-thread rate, spread over ``threads`` worker threads."""
        act = self.activation.get(activation) or activation_rate(self, activation)
        t = 0.0
        for d_in, m in zip(dims[:-1], dims[1:], strict=True):
            t += _interp(self.gemm, m) * 2.0 * N * d_in * m + act * N * m / max(1, threads)
        return t

    def eig(self, n: int) -> float:
        return _interp(self.eigh, n) * n**3

    def svd_n(self, n: int) -> float:
        return _interp(self.svd, n) * n**3


# --------------------------------------------------------------------------- measurement
def _best(repeat: int, fn, *args, **kw) -> float:
    """Fastest of ``repeat`` timed calls ``fn(*args, **kw)``."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args, **kw)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_rates(widths=CALIBRATION_WIDTHS) -> Rates:
    """Time the operations of the cost models on this machine (a few seconds; the wide
    widths are :func:`measure_wide`'s)."""
    from .sketch import sketch_block

    rng = np.random.default_rng(0)
    r = Rates()
    for n in widths:
        key = str(n)
        a2 = rng.standard_normal((2 * n, n))
        a8 = rng.standard_normal((8 * n, n))
        t2 = _best(1, np.linalg.lstsq, a2, a2[:, :1], rcond=None)
        t8 = _best(1, np.linalg.lstsq, a8, a8[:, :1], rcond=None)
        # t = a N n^2 + b n^3 at N = 2n and 8n
        a = max((t8 - t2) / (6.0 * n**3), 1e-15)
        b = max((t2 - 2.0 * a * n**3) / n**3, 0.0)
        r.gelsd_a[key], r.gelsd_b[key] = a, b
        r.syrk[key] = _best(2, np.matmul, a8.T, a8) / (8.0 * n**3)
        w = rng.standard_normal((n, n))
        r.gemm[key] = _best(2, np.matmul, a8, w) / (2.0 * 8 * n**3)
        r.gemm32[key] = _best(2, np.matmul, a8.astype(np.float32),
                              w.astype(np.float32)) / (2.0 * 8 * n**3)
        r.eigh[key] = _best(1, np.linalg.eigh, a2[:n] @ a2[:n].T) / n**3
        r.svd[key] = _best(1, np.linalg.svd, a2[:n], full_matrices=False) / n**3
        r.sketch[key] = _best(1, sketch_block, a8, 0, s=2 * n, kind="sparse-sign") / (8.0 * n * n)
    return r


def measure_wide(r: Rates, widths=WIDE_WIDTHS) -> Rates:
    """Add gelsd's and eigh's rates at ``widths`` to ``r`` (``2n x n`` and ``4n x n``
    least-squares problems and an ``n x n`` eigendecomposition each)."""
    rng = np.random.default_rng(1)
    for n in widths:
        key = str(n)
        a4 = rng.standard_normal((4 * n, n))
        t2 = _best(1, np.linalg.lstsq, a4[:2 * n], a4[:2 * n, :1], rcond=None)
        t4 = _best(1, np.linalg.lstsq, a4, a4[:, :1], rcond=None)
        # t = a N n^2 + b n^3 at N = 2n and 4n
        a = max((t4 - t2) / (2.0 * n**3), 1e-15)
        b = max((t2 - 2.0 * a * n**3) / n**3, 0.0)
        r.gelsd_a[key], r.gelsd_b[key] = a, b
        r.eigh[key] = _best(1, np.linalg.eigh, a4[:n].T @ a4[:n]) / n**3
    return r


def _time_activation(name: str, elements: int = 1 << 21) -> float:
    """Seconds per element of activation ``name`` on one thread (in place, as the feature
    blocks apply it)."""
    from threadpoolctl import threadpool_limits

    from ..activations import get_activation

    fn = get_activation(name).fn
    x = np.random.default_rng(0).standard_normal(elements)
    with threadpool_limits(1):
        return _best(3, fn, x) / elements


def _time_disk(root: str, nbytes: int = 64 * 2**20) -> list[float]:
    """``[read, write]`` bytes per second of the disk under ``root``: a file of ``nbytes``
    written and fsynced, its pages dropped from the page cache (``posix_fadvise``), read
    back, deleted."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f".swimdist-disk-rate.{os.getpid()}")
    data = np.random.default_rng(0).standard_normal(nbytes // 8)
    try:
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data.data)
            f.flush()
            os.fsync(f.fileno())
        write = nbytes / (time.perf_counter() - t0)
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            buf = bytearray(8 * 2**20)
            t0 = time.perf_counter()
            with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
            read = nbytes / (time.perf_counter() - t0)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
    return [read, write]


def activation_rate(rates: Rates, name: str) -> float:
    """``rates.activation[name]``, measured now (a few milliseconds) and cached if missing."""
    if name not in rates.activation:
        rates.activation[name] = _time_activation(name)
        _save(rates)
    return rates.activation[name]


def disk_rates(root: str, rates: Rates | None = None) -> tuple[float, float]:
    """``(read, write)`` bytes per second of the disk holding ``root`` (a feature store's
    directory), measured once (a 64 MiB file, well under a second on a local disk) and
    cached with the machine's rates. ``SWIMDIST_DISK_RATES="read,write"`` overrides it."""
    if os.environ.get("SWIMDIST_DISK_RATES"):
        r, w = (float(v) for v in os.environ["SWIMDIST_DISK_RATES"].split(","))
        return r, w
    rates = rates or machine_rates()
    root = os.path.abspath(root)
    probe = root
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    key = f"device {os.stat(probe).st_dev}"  # one measurement per file system, not per path
    if key not in rates.disk:
        rates.disk[key] = _time_disk(root)
        logger.info("costs: disk under %s reads %.0f MB/s, writes %.0f MB/s", key,
                    rates.disk[key][0] / 1e6, rates.disk[key][1] / 1e6)
        _save(rates)
    r, w = rates.disk[key]
    return float(r), float(w)


def solver_passes(method: str, options: dict | None = None) -> int | None:
    """How many passes over ``A`` solver ``method`` makes (an upper bound where the data
    decide), or None when it needs ``A`` stored (``normal-tiled`` reads column panels from
    the feature store).

    ``normal``: the Gram pass, plus ``max_refine`` verification passes with ``verify``
    (``verify=True``: two more, the sketch that narrows the unresolved directions and the
    pass that forms all of them when the narrowing falls short);
    ``direct``: one (``A`` gathered); ``sketch-direct``: sketch, product, refinement;
    ``auto``: the Gram pass and its verification (``normal``, the first choice on tall
    problems), the pass forming ``A V_0`` and a thin one; ``lsrn``: the sketch and
    ``max_iter`` LSQR steps; ``split``: builds its column blocks itself (one).
    """
    try:
        return _solver_passes(method, options or {})
    except (TypeError, ValueError):  # an option of the wrong type: the solver itself says so
        return None


def _solver_passes(method: str, options: dict) -> int | None:
    if method == "normal":
        verify = options.get("verify")
        return 1 + ((int(options.get("max_refine", 3)) + 2 * (verify in (True, "rcond")))
                    if verify else 0)
    if method in ("direct", "split"):
        return 1
    if method == "sketch-direct":
        return 3
    if method == "auto":
        return 3
    if method == "lsrn":
        from .. import config

        return 1 + int(options.get("max_iter") or config.get("solver.max-iter"))
    return None


def _save(rates: Rates) -> None:
    """Write ``rates`` to the cache file (atomically; failures are ignored)."""
    path = _cache_path()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(rates), indent=1))
        os.replace(tmp, path)


def _machine_key() -> str:
    """CPU, cores and numpy (its BLAS): what the rates depend on."""
    return (f"{platform.node()}|{platform.processor() or platform.machine()}|"
            f"{os.cpu_count()}cpu|numpy{np.__version__}")


def _cache_path() -> Path:
    if os.environ.get("SWIMDIST_RATES"):
        return Path(os.environ["SWIMDIST_RATES"])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "swimdist" / "rates.json"


_RATES: Rates | None = None


def _cached() -> Rates | None:
    global _RATES
    key = _machine_key()
    if _RATES is not None and _RATES.key == key:
        return _RATES
    with contextlib.suppress(OSError, ValueError, TypeError):
        data = json.loads(_cache_path().read_text())
        if data.get("key") == key:
            _RATES = Rates(**data)
            return _RATES
    return None


def rates_known() -> bool:
    """This machine's rates are measured already (in this process or in the cache file)."""
    return _cached() is not None


def machine_rates(width: int | None = None) -> Rates:
    """This machine's rates: from memory, the cache file, or measured now (then cached).

    ``width``: the columns of the problem about to be costed; past the widest of
    :data:`CALIBRATION_WIDTHS`, gelsd's and eigh's rates at :data:`WIDE_WIDTHS` are measured
    now if the cache lacks them (once per machine)."""
    global _RATES
    from threadpoolctl import threadpool_limits

    rates = _cached()
    path = _cache_path()
    if rates is None:
        t0 = time.perf_counter()
        with threadpool_limits(limits=os.cpu_count() or 1, user_api="blas"):
            rates = measure_rates()  # at every core, whatever limit the caller runs under
        rates.key = _machine_key()
        logger.info("auto: measured this machine's BLAS and LAPACK rates in %.1f s (cached in "
                    "%s)", time.perf_counter() - t0, path)
        _save(rates)
        _RATES = rates
    missing = [w for w in WIDE_WIDTHS if str(w) not in rates.gelsd_a or str(w) not in rates.eigh]
    if width is not None and width > max(CALIBRATION_WIDTHS) and missing:
        t0 = time.perf_counter()
        with threadpool_limits(limits=os.cpu_count() or 1, user_api="blas"):
            measure_wide(rates, missing)
        logger.info("auto: measured gelsd and eigh at %s columns in %.1f s (a problem of %d "
                    "columns; cached in %s)", ", ".join(map(str, missing)),
                    time.perf_counter() - t0, width, path)
        _save(rates)
    return rates
