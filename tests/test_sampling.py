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
