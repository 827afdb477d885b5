"""Activation registry: name -> function and the SWIM scale constants.

A SWIM neuron built from the pair (z1, z2) has ``w = weight_scale * dz / |dz|^2`` and
``b = -<w, z1> - bias_shift``: for tanh (``weight_scale = 2 atanh(1/2)``, ``bias_shift =
atanh(1/2)``) it is -1/2 at z1 and +1/2 at z2; for relu it is 0 at z1 and 1 at z2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .exceptions import ValidationError


@dataclass(frozen=True)
class Activation:
    """An activation function with its SWIM sampling constants."""

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    weight_scale: float
    bias_shift: float


def _relu(x):
    return np.maximum(x, 0, out=x if isinstance(x, np.ndarray) and x.flags.writeable else None)


def _tanh(x):
    return np.tanh(x, out=x if isinstance(x, np.ndarray) and x.flags.writeable else None)


# The reference writes the tanh constant as 0.5 * (log(1 + 1/2) - log(1 - 1/2)); the same
# expression keeps sampled weights bit-identical to it.
_S_TANH = 0.5 * (np.log(1 + 1 / 2) - np.log(1 - 1 / 2))

ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", _tanh, 2 * _S_TANH, _S_TANH),
    "relu": Activation("relu", _relu, 1.0, 0.0),
}


def get_activation(name: str) -> Activation:
    """Return the registered activation ``name``; the error lists the valid names."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValidationError(
            f"Unknown activation {name!r}; valid activations are: {', '.join(ACTIVATIONS)}."
        ) from None
