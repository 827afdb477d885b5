"""Datasets: sine, the MNIST IDX loader (on the standard files), broken IDX files."""

import gzip
import os
import shutil

import numpy as np
import pytest

from swimdist.datasets import load_mnist, read_idx, sine
from swimdist.exceptions import ValidationError


def test_sine_matches_its_formula():
    X, y = sine(100, alpha=5.0, seed=3)
    assert X.shape == (100, 2) and X.min() >= 0 and X.max() <= 1
    np.testing.assert_allclose(y, np.sin(5.0 * (X[:, 0] + X[:, 1])))
    np.testing.assert_array_equal(sine(10, seed=1)[0], sine(10, seed=1)[0])


def test_mnist_loader_on_the_standard_files(mnist_path):
    X, y, Xt, yt = load_mnist(mnist_path)
    assert X.shape == (60000, 784) and Xt.shape == (10000, 784)
    assert 0.0 <= X.min() and X.max() == 1.0
    # label counts published with the data set
    np.testing.assert_array_equal(np.bincount(y), [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                   6265, 5851, 5949])


def test_mnist_uncompressed_files_and_env_dir(mnist_path, tmp_path, monkeypatch):
    for name in os.listdir(mnist_path):
        if name.startswith("t10k") or name.startswith("train-labels"):
            with gzip.open(os.path.join(mnist_path, name)) as src, \
                    open(tmp_path / name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        elif name.endswith(".gz"):
            shutil.copy(os.path.join(mnist_path, name), tmp_path / name)
    monkeypatch.setenv("SWIMDIST_DATA_DIR", str(tmp_path))
    X, y, Xt, yt = load_mnist(scale=False)
    assert X.dtype == np.uint8 and yt.shape == (10000,)


def test_missing_mnist_names_the_files(tmp_path):
    with pytest.raises(ValidationError, match="MNIST files not found .*train-images"):
        load_mnist(str(tmp_path))


def _idx(shape, data: bytes, code=0x08):
    head = bytes([0, 0, code, len(shape)]) + b"".join(s.to_bytes(4, "big") for s in shape)
    return head + data


@pytest.mark.parametrize("content, msg", [
    (_idx((2, 3), bytes(6)), None),  # valid
    (_idx((2, 3), bytes(5)), "truncated or padded"),  # one byte short
    (b"\x00\x00\x08", "not an IDX file"),  # header cut
    (b"\x01\x02\x03\x04" + bytes(8), "not an IDX file"),  # bad magic
    (bytes([0, 0, 8, 2, 0, 0]), "truncated header"),
])
def test_read_idx_validates(tmp_path, content, msg):
    p = tmp_path / "x.idx"
    p.write_bytes(content)
    if msg is None:
        assert read_idx(str(p)).shape == (2, 3)
    else:
        with pytest.raises(ValidationError, match=msg):
            read_idx(str(p))


def test_read_idx_corrupt_gzip(tmp_path):
    p = tmp_path / "x.idx.gz"
    p.write_bytes(gzip.compress(_idx((4,), bytes(4)))[:-6])
    with pytest.raises(ValidationError, match="corrupt or truncated"):
        read_idx(str(p))
