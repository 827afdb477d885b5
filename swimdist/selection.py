"""Model selection in one pass: every width and every alpha from one Gram matrix.

``SWIMClassifierCV`` / ``SWIMRegressorCV`` (scikit-learn's ``RidgeCV`` idiom) sample one
network of the largest width ``M`` and read every narrower network off it: sampling is
prefix consistent (:mod:`swimdist.sampling`), so the first ``m`` neurons of the width-``M``
layer are the width-``m`` layer of the same seed, and its Gram matrix is a leading block of
the width-``M`` one.

Algorithm
---------
1. Sample the layers at width ``M``; merge identical neurons of the last layer
   (:func:`swimdist.sampling.merge_duplicates`: distinct neurons in order of first
   occurrence, so the distinct neurons of every prefix are a prefix of them).
2. One pass over the feature blocks ``[H_u, 1]`` of the ``n_u`` distinct neurons (unscaled)
   on the workers accumulates one Gram matrix ``[A Y]^T [A Y]`` per row group: the
   validation rows (``validation_fraction``) or each of the ``cv`` folds, and the rest.
   Training Gram of a split = total - its group's; the final one = the total.
3. The path over a Gram matrix ``G`` (:class:`GramPath`):

   - ``alpha > 0``: ridge ``(A^T A + alpha I) x = A^T Y`` over *all* ``m`` neurons and the
     bias. Its Gram matrix, with duplicate neurons as separate columns and the bias first,
     is the leading ``(1 + m)`` block of the expanded ``(1 + M)`` one, and so is its
     Cholesky factor: one factorization per alpha, two triangular solves per width.
     Ridge over duplicated columns equals ridge over the merged column scaled by
     ``sqrt(multiplicity)`` (copies get equal weights), which is what a separate fit
     solves: the same solution.
   - ``alpha = 0``: the minimum-norm least-squares solution over the directions with
     ``sigma > max(rcond, trusted_rcond(n)) sigma_max`` of the *merged* width-``m`` matrix
     (``n``: its columns), the definition of ``solver="normal"`` (and of the subspace
     ``auto`` certifies for classification). The merged Gram matrix of width ``m`` is
     ``D_m G_u D_m`` on the leading distinct block (``D_m = sqrt(counts within m)``), whose
     Cholesky factor is ``R_u D_m`` with ``R_u`` the leading block of the factor of the
     distinct Gram matrix ``G_u``: one factorization serves every width, and one more, of
     ``G_u - tau I``, proves for each width it reaches that the cutoff keeps every direction
     (:meth:`GramPath._zero_cholesky`), so that the cutoff solution is the plain
     least-squares one; a width where the proof fails gets its own eigendecomposition, as a
     separate fit does (``sum_m 9 m^3`` flops in the worst case: 1.6x one at ``M`` for four
     widths, 5.5x for twenty).

4. One pass over the validation rows scores every (width, alpha) of every split; the
   best (highest score: the mean accuracy over the splits, or the R^2 of all held-out
   predictions together; ties: the narrower, then the more damped) is solved again
   from the total Gram matrix: ``best_estimator_``, a plain :class:`SWIMClassifier` /
   :class:`SWIMRegressor`. No second pass over the features.

Where it differs from a separate fit: the sampled pairs use every training row (validation
rows included), as a fit on all rows would; the candidate pool (``N ceil(M / N)`` pairs) is
the same for ``m`` and ``M`` only when ``ceil(m / N) == ceil(M / N)``, so path models equal
separate fits when ``M <= N`` (``path_is_exact_``). A separate fit with
``solver="normal-tiled"`` at ``alpha = 0`` solves a soft-ridge problem, not this one.

Memory: the client holds one ``(n_u + 1 + K)^2`` Gram matrix per row group plus the total,
the expanded ``(1 + M)^2`` factor of one alpha at a time, and the path's coefficients;
every worker thread holds one row block and one partial sum per group.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
import warnings

import numpy as np
import scipy.linalg as sla

from . import progress
from .design import build_design, reduce_blocks
from .estimators import SWIMClassifier, SWIMRegressor, _SWIMBase
from .exceptions import NotFittedError, ValidationError
from .lstsq.kernels import gram_upper
from .lstsq.normal import TILE, symmetrize, trusted_rcond
from .lstsq.tiled import blocked_cholesky
from .sampling import SAMPLERS, Layer, merge_duplicates, sample_layers
from .validation import (
    check_hidden_layer_sizes,
    check_nonnegative,
    check_positive_int,
    check_X,
    feature_names,
)

logger = logging.getLogger("swimdist.selection")
_EPS = float(np.finfo(np.float64).eps)

__all__ = ["GramPath", "SWIMClassifierCV", "SWIMRegressorCV", "parse_grid", "plot_selection",
           "selection_report"]


# --------------------------------------------------------------------------- kernels
def group_gram(a: np.ndarray, yg: np.ndarray, tile: int, n_groups: int) -> np.ndarray:
    """Upper tiles of ``[a y]^T [a y]`` over each row group of one block, flattened and
    stacked (``yg = [y, group]``: the last column holds each row's group index)."""
    groups = yg[:, -1].astype(np.intp)
    y = yg[:, :-1]
    m = a.shape[1] + y.shape[1]
    out = np.zeros((n_groups, m * m))
    for g in range(n_groups):
        rows = np.flatnonzero(groups == g)
        if rows.size == a.shape[0]:
            out[g] = gram_upper(a, y, tile)
        elif rows.size:
            out[g] = gram_upper(a[rows], y[rows], tile)
    return out.ravel()


def group_scores(a: np.ndarray, yg: np.ndarray, coefs: np.ndarray, validated: np.ndarray,
                 classification: bool) -> np.ndarray:
    """Per validated group and path point: correct predictions (classification) or the
    squared error per output (regression) of one block's rows of that group.

    ``coefs``: ``(len(validated), n, P, K)`` coefficients over ``a``'s columns.
    """
    groups = yg[:, -1].astype(np.intp)
    y = yg[:, :-1]
    G, n, P, K = coefs.shape
    out = np.zeros((G, P, 1 if classification else K))
    for i, g in enumerate(validated):
        rows = np.flatnonzero(groups == g)
        if not rows.size:
            continue
        ab = np.asarray(a[rows], dtype=np.float64)
        pred = (ab @ coefs[i].reshape(n, P * K)).reshape(-1, P, K)
        yr = y[rows]
        if classification:
            if K == 1:
                hit = (pred[:, :, 0] > 0) == (yr[:, :1] > 0)
            else:
                hit = pred.argmax(axis=2) == yr.argmax(axis=1)[:, None]
            out[i, :, 0] = hit.sum(axis=0)
        else:
            out[i] = ((pred - yr[:, None, :]) ** 2).sum(axis=0)
    return out.ravel()


# --------------------------------------------------------------------------- the path
class GramPath:
    """Solutions at every (width, alpha) from the Gram matrix of the distinct neurons.

    Parameters
    ----------
    G : ndarray (n_u + 1, n_u + 1)
        Gram matrix of ``[H_u, 1]`` (distinct neurons unscaled, bias last), symmetric.
    B : ndarray (n_u + 1, K)
        ``[H_u, 1]^T Y``.
    inverse : ndarray (M,)
        Distinct neuron of each of the ``M`` neurons (:class:`swimdist.sampling.Merge`).
    rcond : float
        Cutoff of ``alpha = 0`` (module doc).
    """

    def __init__(self, G: np.ndarray, B: np.ndarray, inverse: np.ndarray, rcond: float):
        self.G, self.B, self.inverse, self.rcond = G, B, np.asarray(inverse), float(rcond)
        self.n_u = G.shape[0] - 1
        first = np.full(self.n_u, self.inverse.size)
        np.minimum.at(first, self.inverse, np.arange(self.inverse.size))
        self.first = first  # increasing: distinct neurons are in order of first occurrence
        self._factor: tuple[float, np.ndarray, np.ndarray] | None = None
        self._zero: tuple | None = None
        self.info: dict = {}

    @property
    def width(self) -> int:
        return int(self.inverse.size)

    def distinct_in(self, m: int) -> int:
        """How many distinct neurons the first ``m`` neurons hold."""
        return int(np.searchsorted(self.first, m))

    def _ridge_factor(self, alpha: float):
        """Upper Cholesky factor of the expanded ``[1, H]`` Gram matrix plus ``alpha I``."""
        if self._factor is not None and self._factor[0] == alpha:
            return self._factor[1], self._factor[2]
        self._factor = self._zero = None  # one factor at a time: (1 + M)^2 numbers
        idx = np.concatenate([[self.n_u], self.inverse])
        Gx = self.G[np.ix_(idx, idx)]
        Gx[np.diag_indices_from(Gx)] += alpha
        try:
            R = blocked_cholesky(Gx)  # the solves read its upper triangle only
        except np.linalg.LinAlgError:
            raise ValidationError(f"A^T A + alpha I is not positive definite (alpha={alpha!r})"
                                  "; use a larger alpha.") from None
        self._factor = (alpha, R, self.B[idx])
        return R, self.B[idx]

    def solve(self, m: int, alpha: float) -> tuple[np.ndarray, np.ndarray, dict]:
        """``(coef (m, K), intercept (K,), info)`` of width ``m`` and damping ``alpha``."""
        if alpha > 0:
            R, bx = self._ridge_factor(alpha)
            Rm = R[: m + 1, : m + 1]
            t = sla.solve_triangular(Rm, bx[: m + 1], trans="T", check_finite=False)
            x = sla.solve_triangular(Rm, t, check_finite=False)
            return x[1:], x[0], {"rank": m + 1}
        d = self.distinct_in(m)
        counts = np.bincount(self.inverse[:m], minlength=self.n_u)[:d].astype(np.float64)
        cut = max(self.rcond, trusted_rcond(d + 1))
        fast = self._zero_cholesky(m, d, counts, cut)
        if fast is not None:
            return fast
        D = np.concatenate([np.sqrt(counts), [1.0]])
        sel = np.concatenate([np.arange(d), [self.n_u]])
        Gm = self.G[np.ix_(sel, sel)] * D[:, None] * D[None, :]
        bm = self.B[sel] * D[:, None]
        lam, V = np.linalg.eigh(Gm)
        lam_max = max(float(lam[-1]), 0.0)
        keep = np.sqrt(np.maximum(lam, 0.0)) > cut * math.sqrt(lam_max) if lam_max > 0 \
            else np.zeros(d + 1, bool)
        Vk = V[:, keep]
        z = Vk @ ((Vk.T @ bm) / lam[keep][:, None])
        # merged weight z of a column sqrt(c) h: each of its c copies gets z / sqrt(c)
        per_distinct = z[:d] / D[:d, None]
        self.info["eigh_widths"] = self.info.get("eigh_widths", 0) + 1
        return per_distinct[self.inverse[:m]], z[d], {"rank": int(keep.sum()), "cutoff": cut,
                                                      "factor": "eigh"}

    def _zero_cholesky(self, m: int, d: int, counts: np.ndarray, cut: float):
        """The ``alpha = 0`` solution of width ``m`` from the nested Cholesky factor of the
        distinct neurons' Gram matrix, when the cutoff provably keeps every direction; else
        None (the caller decomposes).

        The merged Gram matrix of width ``m`` is ``D G' D`` (``G'``: the leading block of the
        unscaled distinct Gram matrix, bias first; ``D = diag(1, sqrt(counts))``), whose
        Cholesky factor is ``R' D`` with ``R'`` the leading block of ``G``'s factor, so one
        factorization serves every width. The proof: a Cholesky factorization of ``G - tau I``
        that succeeds for its leading ``k`` columns shows ``lambda_min(G'_k) > tau - e``
        (``e = 4 n eps lambda``: its rounding at the level :func:`.lstsq.normal.trusted_rcond`
        assumes, not a worst-case bound), and ``lambda_min(D G' D) >= lambda_min(G')``
        as ``D >= 1``; the largest eigenvalue is at most ``min(trace, ||D G' D||_inf)``. When
        ``tau - e > cut^2`` times that, no direction is cut and the cutoff solution is the
        plain least-squares one, ``(D G' D)^-1 D b``.
        """
        fac = self._zero_factor()
        if fac is None:
            return None
        R, bz, certified, tau = fac
        k = d + 1
        if k > certified:
            return None
        if not tau > cut * cut * self._lam_up(d, counts):
            return None
        Rk = R[:k, :k]
        t = sla.solve_triangular(Rk, bz[:k], trans="T", check_finite=False)
        w = sla.solve_triangular(Rk, t, check_finite=False)  # G' w = b': per distinct neuron
        # merged weight z = w sqrt(c); each of its c copies gets z / sqrt(c) = w / c
        per_distinct = w[1:] / counts[:, None]
        self.info["cholesky_widths"] = self.info.get("cholesky_widths", 0) + 1
        return per_distinct[self.inverse[:m]], w[0], {"rank": k, "cutoff": cut,
                                                      "factor": "cholesky"}

    def _lam_up(self, d: int, counts: np.ndarray) -> float:
        """An upper bound of ``lambda_max(D G' D)`` (the merged Gram matrix of the first
        ``d`` distinct neurons with multiplicities ``counts``): ``min(trace, ||.||_inf)``."""
        Dsq = np.concatenate([[1.0], np.sqrt(counts[:d])])
        sel = np.concatenate([[self.n_u], np.arange(d)])
        trace = float(Dsq**2 @ np.diagonal(self.G)[sel])
        inf = 0.0
        for r0 in range(0, d + 1, 4096):  # a slab of rows at a time
            rows = sel[r0:r0 + 4096]
            inf = max(inf, float((Dsq[r0:r0 + 4096] *
                                  (np.abs(self.G[np.ix_(rows, sel)]) @ Dsq)).max()))
        return min(trace, inf)

    def _zero_factor(self):
        """``(R, b, certified, tau)`` for the unscaled distinct Gram matrix with the bias
        first, computed once: ``R`` its Cholesky factor (its largest leading block that
        factors), ``certified`` the order of the leading blocks whose smallest eigenvalue is
        proven above ``tau`` (see :meth:`_zero_cholesky`); None when nothing factors."""
        if self._zero is not None:
            return None if self._zero[0] is None else self._zero
        self._factor = None  # one factor at a time
        n = self.n_u + 1
        idx = np.concatenate([[self.n_u], np.arange(self.n_u)])
        counts = np.bincount(self.inverse, minlength=self.n_u).astype(np.float64)
        # tau: twice the width-M requirement cut^2 * lambda_max (bounded above)
        cut = max(self.rcond, trusted_rcond(n))
        lam_up = self._lam_up(self.n_u, counts)
        rounding = 4 * n * _EPS * lam_up
        tau = 2 * cut * cut * lam_up
        S = self.G[np.ix_(idx, idx)]
        S[np.diag_indices(n)] -= tau + rounding
        try:
            blocked_cholesky(S)
            certified = n
        except np.linalg.LinAlgError as exc:
            certified = int(getattr(exc, "leading_order", 0))
        del S
        Gz = self.G[np.ix_(idx, idx)]
        try:
            R = blocked_cholesky(Gz)  # the solves read its upper triangle only
        except np.linalg.LinAlgError as exc:
            k = int(getattr(exc, "leading_order", 0))
            R = Gz[:k, :k]
            certified = min(certified, k)
        self._zero = (R, self.B[idx], certified, tau) if R.shape[0] else (None,)
        return None if self._zero[0] is None else self._zero

    def distinct_coef(self, m: int, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
        """Coefficients over the columns ``[H_u, 1]`` that give the same outputs."""
        t = np.zeros((self.n_u + 1, coef.shape[1]))
        np.add.at(t, self.inverse[:m], coef)
        t[-1] = intercept
        return t


def _unpack(flat: np.ndarray, n: int, K: int):
    """``(G, B, yty)`` of one flattened upper-tiled ``[A Y]`` Gram matrix."""
    M = flat.reshape(n + K, n + K)
    symmetrize(M)
    return M[:n, :n], M[:n, n:], np.diagonal(M[n:, n:]).copy()


# --------------------------------------------------------------------------- grids
def parse_grid(text: str, *, integer: bool = False) -> list:
    """``"1000:20000:1000"`` (start:stop:step, stop included) or ``"0,1e-6,1e-4"``."""
    text = str(text).strip()
    conv = int if integer else float
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0:
                raise ValueError
            start, stop, step = parts
            k = int(math.floor((stop - start) / step + 1e-9)) + 1
            vals = [start + i * step for i in range(max(k, 0))]
        else:
            vals = [float(p) for p in text.split(",") if p.strip()]
        if integer and any(v != round(v) for v in vals):
            raise ValueError
        vals = [conv(round(v)) if integer else conv(v) for v in vals]
    except ValueError:
        raise ValidationError(f"Cannot read the grid {text!r}: use start:stop:step (stop "
                              f"included) or comma-separated {'integers' if integer else 'numbers'}"
                              ".") from None
    if not vals:
        raise ValidationError(f"The grid {text!r} is empty.")
    return vals


# --------------------------------------------------------------------------- estimators
def _r2(sse: np.ndarray, y: np.ndarray) -> np.ndarray:
    """R^2 per point, averaged over outputs, from the squared errors ``sse`` (points x
    outputs) on the rows ``y``; where ``y`` is constant, 1 for an exact fit and 0 otherwise."""
    ss_tot = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1 - sse / ss_tot, np.where(sse == 0, 1.0, 0.0))
    return r2.mean(axis=1)


class _SWIMCVBase(_SWIMBase):
    """Shared fit of :class:`SWIMClassifierCV` and :class:`SWIMRegressorCV`."""

    _plain: type

    def __init__(self, *, hidden_layer_sizes=(100,), widths=None, alphas=(0.0, 1e-6, 1e-4, 1e-2),
                 validation_fraction=0.1, cv=None, activation="tanh", sampler="swim",
                 rcond=1e-10, random_state=None, chunk_rows=None, store=None,
                 feature_dtype="float64", replace=True, verbose=0, progress_callback=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.widths = widths
        self.alphas = alphas
        self.validation_fraction = validation_fraction
        self.cv = cv
        self.activation = activation
        self.sampler = sampler
        self.rcond = rcond
        self.random_state = random_state
        self.chunk_rows = chunk_rows
        self.store = store
        self.feature_dtype = feature_dtype
        self.replace = replace
        self.verbose = verbose
        self.progress_callback = progress_callback

    # ------------------------------------------------------------------ checks
    def _check_cv_params(self, n: int) -> dict:
        plain = self._plain(hidden_layer_sizes=self.hidden_layer_sizes,
                            activation=self.activation, sampler=self.sampler, solver="normal",
                            rcond=self.rcond, random_state=self.random_state,
                            chunk_rows=self.chunk_rows, store=self.store,
                            feature_dtype=self.feature_dtype, replace=self.replace,
                            verbose=self.verbose, progress_callback=self.progress_callback)
        p = _SWIMBase._check_params(plain)
        if self.sampler not in SAMPLERS:  # pragma: no cover - checked above
            raise ValidationError(f"Unknown sampler {self.sampler!r}.")
        M = p["sizes"][-1]
        widths = [M] if self.widths is None else self.widths
        if isinstance(widths, str):
            widths = parse_grid(widths, integer=True)
        try:
            widths = sorted({int(check_positive_int(w, "widths")) for w in widths})
        except TypeError:
            raise ValidationError(f"widths must be a list of positive integers; got "
                                  f"{self.widths!r}.") from None
        if not widths:
            raise ValidationError("widths is empty; give at least one width (or None for the "
                                  "last hidden layer's).")
        if widths[-1] > M:
            raise ValidationError(f"widths must be at most the last hidden layer's width "
                                  f"({M}); got {widths[-1]}.")
        alphas = self.alphas
        if isinstance(alphas, str):
            alphas = parse_grid(alphas)
        if isinstance(alphas, numbers.Number):
            alphas = [alphas]
        try:
            alphas = sorted({check_nonnegative(a, "alphas") for a in alphas})
        except TypeError:
            raise ValidationError(f"alphas must be a list of numbers >= 0; got "
                                  f"{self.alphas!r}.") from None
        if not alphas:
            raise ValidationError("alphas is empty; give at least one alpha.")
        if self.cv is not None:
            if isinstance(self.cv, bool) or not isinstance(self.cv, numbers.Integral) \
                    or self.cv < 2:
                raise ValidationError(f"cv must be None or an integer >= 2 (folds); got "
                                      f"{self.cv!r}.")
            if self.cv > n:
                raise ValidationError(f"cv={self.cv} folds need at least {self.cv} samples; "
                                      f"got {n}.")
        else:
            f = self.validation_fraction
            if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f < 1:
                raise ValidationError(f"validation_fraction must be a number in (0, 1); got "
                                      f"{f!r}.")
        return p | {"widths": widths, "alphas": alphas, "M": M, "plain": plain}

    def _groups(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Group index of every row and the groups that are validated."""
        perm = np.random.default_rng([seed, 1_000_003]).permutation(n)
        groups = np.zeros(n, dtype=np.intp)
        if self.cv is None:
            n_val = min(n - 1, max(1, int(round(self.validation_fraction * n))))
            groups[perm[:n_val]] = 1
            return groups, np.array([1])
        groups[perm] = np.arange(n) % int(self.cv)
        return groups, np.arange(int(self.cv))

    # ------------------------------------------------------------------ fit
    def fit(self, X, y):
        """Sample the widest network, accumulate the Gram matrices in one pass over its
        features, score every (width, alpha) on the validation rows, and keep the best.

        Returns
        -------
        self
        """
        names = feature_names(X)
        X = check_X(X, min_samples=2)
        p = self._check_cv_params(X.shape[0])
        if names is not None:
            self.feature_names_in_ = names
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        with self._progress():
            return self._fit_path(X, y, p)

    def _fit_path(self, X, y, p):
        t0 = time.perf_counter()
        clf = self._task == "classification"
        Y, Ysample = self._plain._targets(self, y, X.shape[0])
        N, K = Y.shape
        self.n_features_in_ = X.shape[1]
        self.seed_ = seed = p["seed"]
        layers = sample_layers(X, Ysample, p["sizes"], activation=self.activation,
                               sampler=self.sampler, classification=clf, seed=seed,
                               replace=self.replace)
        last = layers[-1]
        merged, merge = merge_duplicates(last)
        distinct = Layer(merged.weights, merged.biases, merged.activation)
        n_u = distinct.width
        groups, validated = self._groups(N, seed)
        n_groups = int(groups.max()) + 1
        Yg = np.concatenate([Y, groups[:, None].astype(np.float64)], axis=1)
        t1 = time.perf_counter()
        n = n_u + 1
        widths, alphas = p["widths"], p["alphas"]
        points = [(m, a) for m in widths for a in alphas]
        P = len(points)
        with build_design(X, [*layers[:-1], distinct], store=self.store,
                          dtype=self.feature_dtype, chunk_rows=self.chunk_rows) as A:
            t2 = time.perf_counter()
            flat = reduce_blocks(group_gram, A, (Yg,), (TILE, n_groups),
                                 length=n_groups * (n + K) ** 2, label="gram")
            flat = flat.reshape(n_groups, (n + K) ** 2)
            G = B = None
            parts = {}
            for g in range(n_groups):
                Gg, Bg, _ = _unpack(flat[g], n, K)
                G = Gg.copy() if G is None else G.__iadd__(Gg)
                B = Bg.copy() if B is None else B + Bg
                if g in validated:  # the others are only needed in the total
                    parts[g] = (Gg.copy(), Bg.copy())
            del flat, Gg
            t3 = time.perf_counter()
            # the selection path of each validated group: trained on every other row
            coefs = np.zeros((len(validated), n, P, K))
            ranks = np.zeros((len(validated), P), dtype=np.intp)
            factors = {"cholesky_widths": 0, "eigh_widths": 0}
            with progress.stage("path", total=len(validated) * P, unit="models") as st:
                for i, g in enumerate(validated):
                    path = GramPath(G - parts[g][0], B - parts[g][1], merge.inverse,
                                    p["rcond"])
                    for a_i, a in enumerate(alphas):  # alpha-major: one factor at a time
                        for w_i, m in enumerate(widths):
                            k = w_i * len(alphas) + a_i
                            c, b0, info = path.solve(m, a)
                            coefs[i, :, k] = path.distinct_coef(m, c, b0)
                            ranks[i, k] = info["rank"]
                            st.update(1)
                    for key in factors:
                        factors[key] += path.info.get(key, 0)
                    del path
            t4 = time.perf_counter()
            stats = reduce_blocks(group_scores, A, (Yg,), (coefs, validated, clf),
                                  length=coefs.shape[0] * P * (1 if clf else K),
                                  label="validation")
            t5 = time.perf_counter()
        stats = stats.reshape(len(validated), P, -1)
        scores = np.empty((len(validated), P))
        for i, g in enumerate(validated):
            rows = groups == g
            if clf:
                scores[i] = stats[i, :, 0] / rows.sum()
            else:  # R^2 of the group; undefined (NaN) for a group of one row
                scores[i] = _r2(stats[i], Y[rows]) if rows.sum() > 1 else np.nan
        if clf:
            mean = scores.mean(axis=0)
        else:
            # R^2 of all held-out predictions together (RidgeCV's leave-one-out idiom): the
            # same as the group's R^2 for one held-out share, and defined for folds of any
            # size (the mean of per-fold R^2 was 0 at every point for one-row folds, and
            # the tie-break then chose)
            mean = _r2(stats.sum(axis=0), Y[np.isin(groups, validated)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN splits: NaN
            spread = np.nanstd(scores, axis=0)
        res = {"width": np.array([m for m, _ in points]),
               "alpha": np.array([a for _, a in points], dtype=np.float64),
               "validation_score": mean, "std_validation_score": spread,
               "rank": ranks.min(axis=0)}
        if clf:
            res["validation_error"] = 1.0 - mean
        else:
            res["validation_mse"] = (stats.sum(axis=0) / np.isin(groups, validated).sum()
                                     ).mean(axis=1)
        if len(validated) > 1:
            for i in range(len(validated)):
                res[f"split{i}_validation_score"] = scores[i]
        # best: highest score; ties to the narrower width, then the larger alpha
        order = sorted(range(P), key=lambda k: (-mean[k], points[k][0], -points[k][1]))
        best = order[0]
        self.cv_results_ = res
        self.best_index_ = int(best)
        self.best_width_, self.best_alpha_ = int(points[best][0]), float(points[best][1])
        self.best_score_ = float(mean[best])
        self.widths_, self.alphas_ = list(widths), list(alphas)
        self.layers_ = layers
        self.path_ = GramPath(G, B, merge.inverse, p["rcond"])
        self.path_is_exact_ = bool(self.sampler != "random" and
                                   all(math.ceil(m / N) == math.ceil(p["M"] / N)
                                       for m in widths))
        self.best_estimator_ = self._path_model(self.best_width_, self.best_alpha_)
        t6 = time.perf_counter()
        self.timings_ = {"sample": t1 - t0, "features": t2 - t1, "gram": t3 - t2,
                         "path": t4 - t3, "validation": t5 - t4, "refit": t6 - t5,
                         "total": t6 - t0}
        self.fit_info_ = {"width": p["M"], "distinct": n_u, "merged_columns": merge.merged,
                          "points": P, "groups": n_groups, "placement": A.placement,
                          "best_width": self.best_width_, "best_alpha": self.best_alpha_,
                          "alpha0_cholesky_widths": factors["cholesky_widths"],
                          "alpha0_eigh_widths": factors["eigh_widths"]}
        logger.info("path %s: %d widths x %d alphas, best width %d alpha %g (score %.4f), "
                    "%.2fs", type(self).__name__, len(widths), len(alphas), self.best_width_,
                    self.best_alpha_, self.best_score_, t6 - t0)
        return self

    # ------------------------------------------------------------------ the path's models
    def _check_point(self, width, alpha) -> tuple[int, float]:
        self._check_fitted()
        M = self.layers_[-1].width
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) \
                or not 1 <= width <= M:
            raise ValidationError(f"width must be an integer in [1, {M}]; got {width!r}.")
        return int(width), check_nonnegative(alpha, "alpha")

    def _path_model(self, width: int, alpha: float):
        """The plain estimator of the path at ``(width, alpha)``, fitted on all rows."""
        coef, intercept, info = self.path_.solve(width, alpha)
        last = self.layers_[-1]
        prefix = Layer(last.weights[:, :width].copy(), last.biases[:width].copy(),
                       last.activation,
                       None if last.idx_from is None else last.idx_from[:width].copy(),
                       None if last.idx_to is None else last.idx_to[:width].copy())
        sizes = (*check_hidden_layer_sizes(self.hidden_layer_sizes)[:-1], width)
        params = {k: v for k, v in self.get_params().items()
                  if k in self._plain._get_param_names()}
        est = self._plain(**{**params, "hidden_layer_sizes": sizes, "alpha": alpha,
                             "solver": "normal", "random_state": self.seed_,
                             "progress_callback": None})
        est.layers_ = [*self.layers_[:-1], prefix]
        est.n_features_in_ = self.n_features_in_
        if hasattr(self, "feature_names_in_"):
            est.feature_names_in_ = self.feature_names_in_
        est.seed_ = self.seed_
        est._y_ndim = getattr(self, "_y_ndim", 1)
        if hasattr(self, "classes_"):
            est.classes_ = self.classes_
        est.coef_ = np.asarray(coef)
        est.intercept_ = np.asarray(intercept)
        est.fit_info_ = {"solver": "normal", "selected_by": type(self).__name__,
                         "rank": int(info["rank"]), "width": int(width), "alpha": float(alpha)}
        return est

    def _at(self, X, width, alpha):
        width, alpha = self._check_point(width, alpha)
        if (width, alpha) == (self.best_width_, self.best_alpha_):
            return self.best_estimator_
        return self._path_model(width, alpha)

    # ------------------------------------------------------------------ delegation
    def _check_fitted(self):
        if not hasattr(self, "best_estimator_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call "
                                 "'fit' with appropriate arguments before using this "
                                 "estimator.")

    def predict(self, X):
        """Prediction of ``best_estimator_``."""
        self._check_fitted()
        return self.best_estimator_.predict(X)

    def score(self, X, y) -> float:
        """Score of ``best_estimator_`` (accuracy, or R^2)."""
        self._check_fitted()
        return self.best_estimator_.score(X, y)

    def save(self, path: str) -> str:
        """Save ``best_estimator_`` (a plain model; :func:`swimdist.load_model` reads it)."""
        self._check_fitted()
        return self.best_estimator_.save(path)


class SWIMClassifierCV(_SWIMCVBase):
    """A SWIM classifier whose width and ridge damping are chosen on held-out rows, every
    candidate read off one Gram matrix (module doc).

    Parameters
    ----------
    hidden_layer_sizes : tuple of int
        The widest network; ``widths`` are prefixes of its last hidden layer.
    widths : list of int, str or None
        Widths of the last hidden layer to try (None: the full width only; a string:
        ``"start:stop:step"``, stop included, or comma separated).
    alphas : list of float or str
        Tikhonov dampings to try; 0 is the rank-cutoff least-squares solution (``rcond``).
    validation_fraction : float
        Share of the rows held out to choose (``cv=None``).
    cv : int or None
        Folds of k-fold cross-validation instead of one held-out share.
    activation, sampler, rcond, random_state, chunk_rows, store, feature_dtype, replace, \
verbose, progress_callback
        As for :class:`~swimdist.SWIMClassifier`.

    Attributes
    ----------
    cv_results_ : dict of arrays
        One entry per (width, alpha), widths major: ``width``, ``alpha``,
        ``validation_score`` (accuracy; the mean over folds), ``validation_error``,
        ``std_validation_score``, ``rank``, ``split<k>_validation_score`` (``cv``).
    best_width_, best_alpha_, best_score_, best_index_
    best_estimator_ : SWIMClassifier
        Fitted on all rows at the chosen point, from the same Gram matrix.
    path_is_exact_ : bool
        Whether every path model is also what a separate fit of its width samples (the
        same candidate pool: ``ceil(m / N) == ceil(M / N)``; not ``sampler="random"``).
    """

    _task = "classification"
    _plain = SWIMClassifier

    def decision_function(self, X):
        """Class scores of ``best_estimator_``."""
        self._check_fitted()
        return self.best_estimator_.decision_function(X)

    def decision_function_at(self, X, *, width: int, alpha: float):
        """Class scores of the path's model at ``(width, alpha)``, fitted on all rows
        (``width`` any prefix width, ``alpha`` any damping; no pass over the data)."""
        return self._at(X, width, alpha).decision_function(X)

    def model_at(self, *, width: int, alpha: float) -> SWIMClassifier:
        """The path's plain model at ``(width, alpha)``."""
        return self._at(None, width, alpha)


class SWIMRegressorCV(_SWIMCVBase):
    """A SWIM regressor whose width and ridge damping are chosen on held-out rows
    (R^2, averaged over outputs), every candidate read off one Gram matrix.

    Parameters and attributes as :class:`SWIMClassifierCV` (``validation_mse`` in place
    of ``validation_error``); ``best_estimator_`` is a :class:`SWIMRegressor`.
    ``validation_score`` is the R^2 of all held-out predictions together (with ``cv``,
    every row's prediction by the fit on the other folds, as ``RidgeCV`` scores its
    leave-one-out predictions), so folds of any size, one row included, are scored;
    ``split<k>_validation_score`` is each fold's own R^2 (NaN for a fold of one row).
    """

    _task = "regression"
    _plain = SWIMRegressor

    def predict_at(self, X, *, width: int, alpha: float):
        """Prediction of the path's model at ``(width, alpha)``, fitted on all rows."""
        return self._at(X, width, alpha).predict(X)

    def model_at(self, *, width: int, alpha: float) -> SWIMRegressor:
        """The path's plain model at ``(width, alpha)``."""
        return self._at(None, width, alpha)


# --------------------------------------------------------------------------- reports
#: What a run without matplotlib logs instead of drawing the figure.
PLOT_SKIPPED = "matplotlib not installed (pip install 'swimdist[plot]'): {path} skipped"


def selection_report(est) -> dict:
    """The JSON-ready summary of a fitted CV estimator: grid, scores, best point, timings."""
    res = {k: np.asarray(v).tolist() for k, v in est.cv_results_.items()}
    return {"estimator": type(est).__name__, "best_width": est.best_width_,
            "best_alpha": est.best_alpha_, "best_score": est.best_score_,
            "widths": est.widths_, "alphas": est.alphas_, "path_is_exact": est.path_is_exact_,
            "cv_results": res, "timings": est.timings_, "fit_info": est.fit_info_}


def plot_selection(report: dict, path: str) -> str | None:
    """A PNG of validation error (classification) or ``1 - R^2`` against width, one line per
    alpha, written atomically to ``path`` (local or URL); None without matplotlib (logged)."""
    try:
        import matplotlib
    except ImportError:
        logger.warning(PLOT_SKIPPED.format(path=path))
        return None
    import io

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from ._io import write_bytes_atomic

    res = report["cv_results"]
    width, alpha = np.asarray(res["width"]), np.asarray(res["alpha"])
    clf = "validation_error" in res
    err = np.asarray(res["validation_error"]) if clf else 1 - np.asarray(res["validation_score"])
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for a in report["alphas"]:
        on = alpha == a
        ax.plot(width[on], (100 * err if clf else err)[on], marker="o", label=f"alpha={a:g}")
    ax.plot([report["best_width"]], [100 * (1 - report["best_score"]) if clf
                                     else 1 - report["best_score"]],
            marker="*", markersize=14, color="k", linestyle="none", label="chosen")
    ax.set_xlabel("width (neurons of the last hidden layer)")
    ax.set_ylabel("validation error (%)" if clf else "validation 1 - R^2")
    if not clf and np.all(err > 0):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())
    return path
