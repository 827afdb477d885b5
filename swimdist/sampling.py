"""SWIM pair sampling: draw candidate index pairs, gather only those rows, pairs -> (W, b).

Randomness contract: layer ``l`` of a fit with seed ``s`` draws from
``numpy.random.default_rng(s)`` for ``l = 0`` (the reference implementation's stream, so a
one-layer network with the same seed samples the same pairs as ``swimnetworks.Dense``) and
``default_rng([s, l])`` for deeper layers. Nothing depends on chunking or worker count.

Prefix consistency: for ``sampler="swim"`` or ``"uniform"``, the first ``m`` neurons of a
width-``M`` layer are the neurons of a width-``m`` layer with the same seed whenever both
draw from the same candidate pool, i.e. ``ceil(m / N) == ceil(M / N)`` and neither reaches
``max_candidates`` (every ``M <= N``: MNIST up to 60 000 neurons). With replacement this is
numpy's own draw: ``Generator.choice(..., replace=True, p=p)`` maps one uniform per neuron
through the inverse CDF, so the draws come in order (the reference's stream, unchanged).
Without replacement the neurons are the candidates of the smallest keys ``E_k / p_k``
(``E_k`` standard exponential; Efraimidis and Spirakis 2006), in increasing key order: a
draw of successive sampling without replacement whose first ``m`` are the width-``m`` draw.
numpy's ``choice(..., replace=False, p=p)`` redraws in rounds whose sizes depend on the
width, so it is not prefix consistent; ``distinct_stream="numpy"`` keeps it (the stream of
swimdist 0.x for ``replace=False``). ``sampler="random"`` keeps the reference's stream
(weights, then biases), which is not prefix consistent in the biases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from . import progress
from .activations import get_activation
from .exceptions import ValidationError

logger = logging.getLogger("swimdist.sampling")

SAMPLERS = ("swim", "uniform", "random")
#: How distinct pairs (``replace=False``) are drawn: "keys" (prefix consistent), "numpy".
DISTINCT_STREAMS = ("keys", "numpy")

#: Distances below this count as this (the reference's ``dist_min``), for data whose
#: largest pair distance is in [0.5, 1); scaled with the data otherwise
#: (:func:`distance_floor`).
DIST_MIN = 1e-10


@dataclass
class Layer:
    """One hidden layer: ``sigma(Z @ weights + biases)``.

    ``idx_from`` / ``idx_to`` are the data pairs the neurons came from (None for "random").
    """

    weights: np.ndarray  # (d_in, M)
    biases: np.ndarray  # (M,)
    activation: str
    idx_from: np.ndarray | None = None
    idx_to: np.ndarray | None = None
    #: Output multipliers (M,), or None: a merged layer's ``sqrt(multiplicity)`` per neuron
    #: (:func:`merge_duplicates`).
    scale: np.ndarray | None = None

    @property
    def width(self) -> int:
        return self.weights.shape[1]

    def apply(self, Z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``sigma(Z W + b)`` for an in-memory block ``Z``, computed in place in ``out``
        (a new array when None; a view such as a block's first columns works too).

        A float32 ``out`` gets ``Z W + b`` computed in float64 and rounded once, then the
        activation in float32 (about four times faster than in float64 for tanh, and
        within an ulp or two of rounding the float64 result)."""
        if out is not None and out.dtype != np.float64:
            z = np.matmul(Z, self.weights)
            z += self.biases
            np.copyto(out, z, casting="same_kind")
            del z
            h = out
        else:
            h = np.matmul(Z, self.weights, out=out)
            h += self.biases
        h = get_activation(self.activation).fn(h)
        if self.scale is not None:
            h *= self.scale
        return h

    def columns(self, cols) -> Layer:
        """The layer of just the neurons ``cols``."""
        return Layer(self.weights[:, cols], self.biases[cols], self.activation,
                     scale=None if self.scale is None else self.scale[cols])


def layer_rng(seed: int, layer: int) -> np.random.Generator:
    """The generator of layer ``layer`` (see the module's randomness contract)."""
    return np.random.default_rng(seed if layer == 0 else [seed, layer])


def draw_candidates(n: int, n_candidates: int, rng: np.random.Generator):
    """Candidate pairs ``(i, j)``, ``i`` uniform, ``j = (i + U{1..n-1}) mod n`` (never ``i``)."""
    idx_from = rng.integers(low=0, high=n, size=n_candidates)
    delta = rng.integers(low=1, high=n, size=n_candidates)
    return idx_from, (idx_from + delta) % n


def pair_distances(dz: np.ndarray) -> np.ndarray:
    """``|dz|`` of every row, with no overflow or underflow at any scale: ``np.linalg.norm``,
    and for the rows whose squares may have left the float range the norm of the row scaled
    by a power of two (exact), scaled back; elsewhere the bits of ``np.linalg.norm(dz,
    axis=1)``, the reference's distances."""
    with np.errstate(over="ignore", under="ignore"):
        dist = np.linalg.norm(dz, axis=1)
    # only rows whose squares may have left the float range are computed again, scaled
    redo = ~((dist > 2.0**-480) & (dist < 2.0**480))
    if redo.any():
        sub = dz[redo]
        e = np.frexp(np.max(np.abs(sub), axis=1) if sub.shape[1] else np.zeros(len(sub)))[1]
        dist[redo] = np.ldexp(np.linalg.norm(np.ldexp(sub, -e[:, None]), axis=1), e)
    return dist


def distance_floor(dist: np.ndarray) -> float:
    """The smallest distance a pair counts with: the reference's ``dist_min`` (1e-10) for
    data whose largest candidate distance lies in ``[0.5, 1)``, scaled by the same power of
    two as the data otherwise, so that sampling does not depend on the units of ``X`` (a
    fixed 1e-10 flattened every pair of ``X * 1e-12`` to one distance and zeroed the weights
    of ``X * 1e-20``)."""
    top = float(np.max(dist)) if dist.size else 0.0
    return float(np.ldexp(DIST_MIN, int(np.frexp(top)[1]))) if top > 0 else DIST_MIN


def pairs_to_weights(z_from: np.ndarray, z_to: np.ndarray, activation: str,
                     floor: float = DIST_MIN):
    """Weights and biases of the neurons defined by the rows pairs ``(z_from[k], z_to[k])``.

    ``w = weight_scale * dz / dist**2``, ``b = -<w, z_from> - bias_shift`` with
    ``dist = max(|dz|, floor)`` (:func:`distance_floor`; the reference's 1e-10 by default);
    computed in the reference's operation order.
    """
    act = get_activation(activation)
    dz = z_to - z_from
    dist = np.maximum(pair_distances(dz), floor)[:, None]
    directions = dz / dist
    weights = (act.weight_scale * directions / dist).T
    biases = -np.sum(z_from * weights.T, axis=-1) - act.bias_shift
    return weights, biases


def pair_probabilities(dy: np.ndarray | None, dist: np.ndarray, sampler: str) -> np.ndarray:
    """Probability of each candidate: ``max_k |dy_k| / dist``, uniform if all are 0.

    A pair of coincident points (``dist == 0``) defines no neuron (its weights would be 0)
    and gets probability 0: clipping its distance made it the likeliest pair of all as soon
    as its targets differed (repeated rows of ``X`` with noisy or different targets gave a
    constant network). The ratio is formed from ``dy`` and ``dist`` scaled by powers of two,
    so targets and inputs of any magnitude neither overflow nor underflow it."""
    n = dist.shape[0]
    valid = dist > 0
    n_valid = int(np.count_nonzero(valid))
    if n_valid == 0:
        raise ValidationError(
            f"All {n} candidate pairs join coincident points: the inputs have no two distinct "
            "rows among them, so SWIM cannot place a neuron. Check X for repeated rows.")
    uniform = valid / n_valid
    if sampler == "uniform" or dy is None:
        return uniform
    g = np.max(np.abs(dy), axis=1) if dy.shape[1] else np.zeros(n)
    top_g = float(np.max(g))
    if not np.isfinite(top_g):
        raise ValidationError("The targets are not finite; cannot weigh the candidate pairs.")
    if top_g == 0:
        return uniform
    grad = np.zeros(n)
    d_scaled = np.ldexp(dist[valid], -int(np.frexp(np.max(dist))[1]))
    grad[valid] = np.ldexp(g[valid], -int(np.frexp(top_g)[1])) / d_scaled
    total = grad.sum()
    if not total > 0:  # every valid pair has equal targets
        return uniform
    return grad / total


def _gather_rows(X, idx: np.ndarray) -> np.ndarray:
    """Rows ``X[idx]`` (``idx`` sorted unique) as float64 numpy; reads only those rows.

    A dask ``X``: one task per row block holding any of them, which reads its block with a
    plain slice and returns just those rows (``X[idx]`` would hand the fancy index to the
    block reader: Zarr's orthogonal indexing, several times slower than reading the block).
    """
    if not isinstance(X, da.Array):
        return np.asarray(X[idx], dtype=np.float64)
    if len(X.chunks[1]) != 1:
        X = X.rechunk({1: -1})
    bounds = np.cumsum((0, *X.chunks[0]))
    cuts = np.searchsorted(idx, bounds)
    take = dask.delayed(_take_rows, pure=True)
    parts = [take(X.blocks[b], idx[cuts[b]:cuts[b + 1]] - bounds[b])
             for b in range(len(X.chunks[0])) if cuts[b + 1] > cuts[b]]
    out = dask.compute(*parts)
    return np.concatenate(out) if out else np.empty((0, X.shape[1]))


def _take_rows(block: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Rows ``local`` of one row block, as float64."""
    return np.asarray(block[local], dtype=np.float64)


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` for integers by one sort (numpy's hash-based unique is slower on a
    million candidates)."""
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if a.size else a


def candidate_bytes() -> int:
    """Most bytes of candidate rows the client holds at once when X is out of core (a dask
    array): the candidate pool is read in slices of this size, the bound on one feature
    block (``swimdist.max-block-bytes``)."""
    from . import config

    return int(dask.utils.parse_bytes(config.get("max-block-bytes")))


def _rows_of(X, layers: list[Layer], li: int, i_from: np.ndarray, i_to: np.ndarray,
             in_memory: bool):
    """``(Z, pos_from, pos_to)``: layer ``li``'s inputs at the rows of the pairs
    ``(i_from, i_to)``, with ``Z[pos_from]`` / ``Z[pos_to]`` the pairs' rows; only those
    rows of ``X`` are read (``in_memory``: ``X`` itself, no copy)."""
    if in_memory:
        return X, i_from, i_to
    rows = _sorted_unique(np.concatenate([i_from, i_to]))
    Z = _gather_rows(X, rows)
    for prev in layers:
        Z = prev.apply(Z)
    return Z, np.searchsorted(rows, i_from), np.searchsorted(rows, i_to)


def sample_layers(X, Y: np.ndarray | None, hidden_layer_sizes, *, activation: str = "tanh",
                  sampler: str = "swim", classification: bool = False, seed: int = 0,
                  replace: bool = True, max_candidates: int = 1_000_000,
                  distinct_stream: str = "keys") -> list[Layer]:
    """Sample every hidden layer of a SWIM network.

    Parameters
    ----------
    X : ndarray or dask array, shape (N, d)
        Inputs; only the rows of drawn candidate pairs are ever read.
    Y : ndarray, shape (N, K)
        Targets (regression) or class indices/one-hot (classification); for classification
        a pair's "gradient" is 1 where its labels differ (pass labels as shape (N, 1)).
    hidden_layer_sizes : sequence of int
    activation, sampler : str
        See :data:`swimdist.activations.ACTIVATIONS` and :data:`SAMPLERS`.
    seed : int
    replace : bool
        True draws pairs with replacement (the reference: wide layers repeat neurons);
        False draws distinct pairs (no duplicate neurons).
    max_candidates : int
        Cap on the candidate pool (``N * max(1, ceil(M / N))`` pairs otherwise).
    distinct_stream : {"keys", "numpy"}
        ``replace=False`` only: "keys" draws the candidates of the smallest exponential keys
        ``E / p`` (prefix consistent, module doc); "numpy" is ``Generator.choice(...,
        replace=False, p=p)``, the stream of earlier releases.
    """
    if distinct_stream not in DISTINCT_STREAMS:
        raise ValidationError(f"Unknown distinct_stream {distinct_stream!r}; valid values are: "
                              f"{', '.join(DISTINCT_STREAMS)}.")
    if sampler not in SAMPLERS:
        raise ValidationError(f"Unknown sampler {sampler!r}; valid samplers are: "
                              f"{', '.join(SAMPLERS)}.")
    get_activation(activation)
    layers: list[Layer] = []
    with progress.stage("sampling", total=len(hidden_layer_sizes), unit="layers") as st:
        for li, width in enumerate(hidden_layer_sizes):
            layers.append(_sample_layer(X, Y, layers, li, width, activation=activation,
                                        sampler=sampler, classification=classification,
                                        seed=seed, replace=replace,
                                        max_candidates=max_candidates,
                                        distinct_stream=distinct_stream))
            st.update(1)
    return layers


def _sample_layer(X, Y, layers: list[Layer], li: int, width: int, *, activation, sampler,
                  classification, seed, replace, max_candidates,
                  distinct_stream="keys") -> Layer:
    """Layer ``li`` of :func:`sample_layers`, given the layers below it."""
    n = X.shape[0]
    rng = layer_rng(seed, li)
    d_in = X.shape[1] if li == 0 else layers[-1].width
    if sampler == "random":
        # The random-feature / ELM baseline, drawn as the reference does.
        W = rng.normal(loc=0, scale=1, size=(width, d_in)).T
        b = rng.uniform(low=-np.pi, high=np.pi, size=(width, 1)).T[0]
        return Layer(W, b, activation)
    n_cand = n * max(1, int(np.ceil(width / n)))
    n_cand = min(n_cand, max(max_candidates, width if not replace else 1))
    i_from, i_to = draw_candidates(n, n_cand, rng)
    if not replace:
        # Distinct pairs: drop repeated candidates before drawing without replacement.
        _, first = np.unique(i_from.astype(np.int64) * n + i_to, return_index=True)
        first.sort()
        i_from, i_to = i_from[first], i_to[first]
    in_memory = li == 0 and isinstance(X, np.ndarray) and X.dtype == np.float64
    # Out of core (X a dask array: Zarr, HDF5, npy files), the candidates' rows are read in
    # slices of candidates whose rows take at most candidate_bytes(), their distances kept
    # and the rows dropped: the client never holds more than one slice of X's rows.
    step = (len(i_from) if in_memory
            else max(1, candidate_bytes() // (16 * max(X.shape[1], d_in))))
    dist = np.empty(len(i_from))
    for s0 in range(0, len(i_from), step):
        f, t = i_from[s0:s0 + step], i_to[s0:s0 + step]
        Z, pos_from, pos_to = _rows_of(X, layers, li, f, t, in_memory)
        whole = (Z, pos_from, pos_to) if step >= len(i_from) else None
        # Distances in slices of candidates: row norms do not depend on the slicing, and
        # no (candidates x d) difference matrix is ever whole.
        for c in range(0, len(pos_from), 8192):
            dz = Z[pos_to[c:c + 8192]] - Z[pos_from[c:c + 8192]]
            dist[s0 + c:s0 + c + len(dz)] = pair_distances(dz)
        del Z, dz
    floor = distance_floor(dist)
    dist = np.where(dist > 0, np.maximum(dist, floor), 0.0)
    dy = None
    if Y is not None:
        if classification:
            dy = (Y[i_to] != Y[i_from]).any(axis=1, keepdims=True).astype(np.float64)
        else:
            dy = Y[i_to] - Y[i_from]
    p = pair_probabilities(dy, dist, sampler)
    if not replace and np.count_nonzero(p) < width:
        raise ValidationError(
            f"Cannot draw {width} distinct neurons: only {np.count_nonzero(p)} candidate "
            "pairs have nonzero probability. Draw with replacement (replace=True; on the "
            "command line --with-replacement) or ask for fewer neurons."
        )
    if replace or distinct_stream == "numpy":
        sel = rng.choice(dist.shape[0], size=width, replace=replace, p=p)
    else:
        sel = smallest_keys(p, width, rng)
    if whole is not None:  # one slice: its rows hold the chosen pairs' rows
        Z, pos_from, pos_to = whole[0], whole[1][sel], whole[2][sel]
    else:  # read just the chosen pairs' rows
        Z, pos_from, pos_to = _rows_of(X, layers, li, i_from[sel], i_to[sel], in_memory)
    W, b = pairs_to_weights(Z[pos_from], Z[pos_to], activation, floor)
    logger.info("layer %d: %d neurons from %d candidate pairs", li, width, n_cand)
    return Layer(W, b, activation, i_from[sel], i_to[sel])


def smallest_keys(p: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` distinct indices drawn with probabilities ``p`` without replacement, in
    order of draw: the indices of the ``size`` smallest keys ``E_k / p_k`` (``E_k`` standard
    exponential), by increasing key (Efraimidis and Spirakis 2006, in the exponential form
    of their ``U^(1/p)`` keys). One key per candidate, drawn in candidate order, so the first
    ``m`` of a draw of ``size`` are the draw of ``m``. Zero-probability candidates are never
    drawn (infinite keys)."""
    keys = rng.standard_exponential(p.shape[0])
    with np.errstate(divide="ignore"):
        keys = np.where(p > 0, keys / p, np.inf)
    if size < keys.shape[0]:
        part = np.argpartition(keys, size - 1)[:size]
    else:
        part = np.arange(keys.shape[0])
    return part[np.lexsort((part, keys[part]))]


# --------------------------------------------------------------------------- duplicates
@dataclass
class Merge:
    """Identical neurons of a layer merged into one (:func:`merge_duplicates`).

    ``inverse[j]`` is the merged neuron of original neuron ``j``; ``counts[u]`` the
    multiplicity of merged neuron ``u``.
    """

    inverse: np.ndarray  # (M,)
    counts: np.ndarray  # (M_distinct,)

    @property
    def merged(self) -> int:
        """How many columns merging removed."""
        return int(self.inverse.shape[0] - self.counts.shape[0])

    def expand(self, coef: np.ndarray) -> np.ndarray:
        """Output weights of the merged neurons -> weights of the original ones, each
        merged weight ``z`` split as ``z / sqrt(m)`` over its ``m`` copies."""
        coef = np.asarray(coef)
        scale = 1.0 / np.sqrt(self.counts.astype(np.float64))
        return coef[self.inverse] * scale[self.inverse].reshape((-1,) + (1,) * (coef.ndim - 1))


def merge_duplicates(layer: Layer) -> tuple[Layer, Merge]:
    """One neuron for each set of identical neurons (same weights and bias), its output
    scaled by ``sqrt(m)`` (``m``: the set's size).

    The feature matrix of the merged layer is ``A E^T`` with ``E`` the (distinct x M)
    matrix of rows ``1/sqrt(m)`` over each set: ``E`` has orthonormal rows, so ``A`` and
    the merged matrix have the same nonzero singular values (an ``rcond`` cutoff keeps the
    same directions), and the minimum-norm least-squares solution over the original
    columns, with or without ridge damping, is ``E^T z`` for the merged one's ``z``
    (:meth:`Merge.expand`): exactly gelsd's model, solved with fewer columns. Neurons keep
    the order of their first occurrence.
    """
    keys = np.concatenate([layer.weights.T, layer.biases[:, None]], axis=1)
    keys = np.ascontiguousarray(keys)
    _, first, inverse, counts = np.unique(keys, axis=0, return_index=True,
                                          return_inverse=True, return_counts=True)
    order = np.argsort(first, kind="stable")  # unique rows in order of first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    inverse = rank[inverse.reshape(-1)]
    counts = counts[order]
    keep = first[order]
    scale = np.sqrt(counts.astype(np.float64))
    if layer.scale is not None:
        scale = scale * layer.scale[keep]
    merged = Layer(layer.weights[:, keep], layer.biases[keep], layer.activation,
                   None if layer.idx_from is None else layer.idx_from[keep],
                   None if layer.idx_to is None else layer.idx_to[keep], scale)
    return merged, Merge(inverse=inverse, counts=counts)
