"""SWIM sampling: parity with the reference, the randomness contract, samplers."""

import dask.array as da
import numpy as np
import pytest

from swimdist.exceptions import ValidationError
from swimdist.sampling import (
    draw_candidates,
    pair_probabilities,
    pairs_to_weights,
    sample_layers,
)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("classification", [False, True])
def test_same_pairs_same_weights_as_reference(activation, classification):
    sn = pytest.importorskip("swimnetworks")
    rng = np.random.default_rng(3)
    X = rng.random((400, 5))
    if classification:
        y = (X[:, 0] + X[:, 1] > 1).astype(int)
        yref = y
        ys = y[:, None]
    else:
        y = np.sin(X @ np.arange(1, 6))[:, None]
        yref = ys = y
    dense = sn.Dense(layer_width=250, activation=activation, parameter_sampler=activation,
                     random_seed=11, is_classifier=classification)
    dense.fit(X, yref)
    # Given the reference's pairs, our weights agree to 1e-12 ...
    W, b = pairs_to_weights(X[dense.idx_from], X[dense.idx_to], activation)
    np.testing.assert_allclose(W, dense.weights, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b, dense.biases.ravel(), rtol=0, atol=1e-12)
    # ... and with the same seed we draw the very same pairs.
    layer = sample_layers(X, ys, (250,), activation=activation, seed=11,
                          classification=classification)[0]
    np.testing.assert_array_equal(layer.idx_from, dense.idx_from)
    np.testing.assert_array_equal(layer.idx_to, dense.idx_to)
    np.testing.assert_allclose(layer.weights, dense.weights, rtol=0, atol=1e-12)


def test_tanh_neuron_is_minus_half_and_plus_half_at_its_pair(rng):
    X = rng.random((50, 3))
    W, b = pairs_to_weights(X[:10], X[10:20], "tanh")
    at_from = np.tanh(np.einsum("ij,ji->i", X[:10], W) + b)
    at_to = np.tanh(np.einsum("ij,ji->i", X[10:20], W) + b)
    np.testing.assert_allclose(at_from, -0.5, atol=1e-12)
    np.testing.assert_allclose(at_to, 0.5, atol=1e-12)


def test_candidates_never_pair_a_point_with_itself(rng):
    i, j = draw_candidates(7, 5000, rng)
    assert np.all(i != j)
    assert set(np.unique(j)) == set(range(7))


def test_probabilities_follow_gradient_and_fall_back_to_uniform():
    dist = np.array([1.0, 2.0, 1.0])
    p = pair_probabilities(np.array([[1.0], [1.0], [0.0]]), dist, "swim")
    np.testing.assert_allclose(p, [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(pair_probabilities(np.zeros((3, 1)), dist, "swim"), 1 / 3)
    np.testing.assert_allclose(pair_probabilities(np.ones((3, 1)), dist, "uniform"), 1 / 3)


def test_coincident_pairs_get_no_probability():
    """A pair of equal points defines no neuron: probability 0 (not the largest of all, as a
    clipped distance made it when its targets differed), also under the uniform sampler;
    with no distinct pair at all, a clear error."""
    dist = np.array([0.0, 2.0, 1.0])
    np.testing.assert_allclose(pair_probabilities(np.array([[5.0], [1.0], [1.0]]), dist,
                                                  "swim"), [0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(pair_probabilities(None, dist, "uniform"), [0, 0.5, 0.5])
    with pytest.raises(ValidationError, match="coincident"):
        pair_probabilities(np.ones((3, 1)), np.zeros(3), "swim")


def test_repeated_rows_with_noisy_targets_give_a_real_network():
    """Every row of X five times with noisy targets (repeated measurements): the network
    fits the noise-free function about as well as one on the distinct rows (it was a
    constant model: every neuron drawn from a pair of equal points)."""
    from swimdist import SWIMClassifier, SWIMRegressor

    rng = np.random.default_rng(0)
    X0 = rng.normal(size=(100, 3))
    X = np.repeat(X0, 5, axis=0)
    f = np.sin(X[:, 0]) + X[:, 1]
    y = f + 0.1 * rng.normal(size=len(f))
    m = SWIMRegressor(hidden_layer_sizes=(100,), random_state=0).fit(X, y)
    assert np.all(np.linalg.norm(m.layers_[0].weights, axis=0) > 0)
    assert m.score(X, f) > 0.95
    # discrete inputs (many equal rows with different labels)
    Xc = rng.normal(size=(600, 4))
    yc = np.digitize(Xc[:, 0], [-0.5, 0.5])
    clf = SWIMClassifier(hidden_layer_sizes=(50,), random_state=0).fit(Xc > 0, yc)
    assert clf.score(Xc > 0, yc) > 0.6  # the best any model of the sign pattern does: 0.65


@pytest.mark.parametrize("k", [-600, -40, 40, 500])
def test_layers_do_not_depend_on_the_units_of_x(k):
    """X scaled by 2^k (exact) gives the same draws and the same features bit for bit, from
    2^-600 to 2^500 (a fixed distance floor zeroed every weight of X * 1e-20, and |dz|^2
    overflowed from X * 1e155 on)."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 3))
    y = (np.sin(X[:, 0]) + X[:, 1])[:, None]
    ref = sample_layers(X, y, (60,), seed=2)[0]
    Xs = np.ldexp(X, k)
    got = sample_layers(Xs, y, (60,), seed=2)[0]
    np.testing.assert_array_equal(got.idx_from, ref.idx_from)
    np.testing.assert_array_equal(got.idx_to, ref.idx_to)
    np.testing.assert_array_equal(got.apply(Xs), ref.apply(X))
    # and targets of any magnitude weigh the pairs the same
    got_y = sample_layers(X, np.ldexp(y, k), (60,), seed=2)[0]
    np.testing.assert_array_equal(got_y.idx_from, ref.idx_from)


def test_dask_input_gives_the_same_layers_as_numpy(rng):
    X = rng.random((300, 4))
    y = np.cos(X.sum(1))[:, None]
    a = sample_layers(X, y, (40, 30), seed=5)
    b = sample_layers(da.from_array(X, chunks=(70, 2)), y, (40, 30), seed=5)
    for la, lb in zip(a, b, strict=True):
        np.testing.assert_array_equal(la.weights, lb.weights)
        np.testing.assert_array_equal(la.biases, lb.biases)


def test_deep_layers_use_previous_layer_outputs(rng):
    X = rng.random((200, 2))
    y = X[:, :1] ** 2
    l0, l1 = sample_layers(X, y, (20, 15), seed=1)
    Z = l0.apply(X[l1.idx_from])
    Z2 = l0.apply(X[l1.idx_to])
    # layer-1 neurons are -1/2 and +1/2 at the layer-0 features of their pairs
    np.testing.assert_allclose(np.tanh(np.einsum("ij,ji->i", Z, l1.weights) + l1.biases), -0.5,
                               atol=1e-9)
    np.testing.assert_allclose(np.tanh(np.einsum("ij,ji->i", Z2, l1.weights) + l1.biases), 0.5,
                               atol=1e-9)


def test_distinct_pairs_have_no_duplicate_neurons(rng):
    X = rng.random((60, 2))
    y = np.sin(3 * X.sum(1))[:, None]
    rep = sample_layers(X, y, (200,), seed=0)[0]
    dis = sample_layers(X, y, (200,), seed=0, replace=False)[0]
    pairs = set(zip(dis.idx_from.tolist(), dis.idx_to.tolist(), strict=True))
    assert len(pairs) == 200
    assert len(set(zip(rep.idx_from.tolist(), rep.idx_to.tolist(), strict=True))) < 200


def test_random_and_uniform_samplers(rng):
    X = rng.random((100, 3))
    r = sample_layers(X, None, (30,), sampler="random", seed=0)[0]
    assert r.weights.shape == (3, 30) and r.idx_from is None
    assert np.all(np.abs(r.biases) <= np.pi)
    u = sample_layers(X, None, (30,), sampler="uniform", seed=0)[0]
    assert u.weights.shape == (3, 30)


def test_unknown_sampler_lists_valid_names(rng):
    with pytest.raises(ValidationError, match="valid samplers are: swim, uniform, random"):
        sample_layers(rng.random((10, 2)), None, (5,), sampler="gauss")
