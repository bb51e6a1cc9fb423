"""Data modules for the experiments: real data held in memory as tensors.

* ``DigitsDataModule``: scikit-learn's ``load_digits`` (1,797 real 8x8 digits shipped inside the package):
  the default data set, no download.
* ``FashionMNISTDataModule`` / ``MNISTDataModule``: the standard IDX ``.gz`` files, looked up in
  ``data_dir``, then in the Debian package location (``apt-get install dataset-fashion-mnist``), then
  downloaded from the official mirror with MD5 verification when ``download=True``.

Train/validation split comes from the training set with a seed; the test set is kept for final numbers.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array of its declared shape.

    Example:
        >>> import tempfile, os, numpy as np
        >>> p = os.path.join(tempfile.mkdtemp(), "x-idx1-ubyte")
        >>> write_idx(p, np.arange(5, dtype=np.uint8))
        >>> read_idx(p).tolist()
        [0, 1, 2, 3, 4]
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes), file has {body.size}")
    return body.reshape(dims)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in ``.gz``); used by tests."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


class EpochShuffle(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): Lightning calls ``set_epoch``, so a resumed run sees
    the same order as an uninterrupted one.

        >>> s = EpochShuffle(4, seed=0); a = list(s); s.set_epoch(1); b = list(s); s.set_epoch(0)
        >>> a == list(s) and a != b
        True
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # noqa: ANN204
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ArrayDataModule(pl.LightningDataModule):
    """Image classification data in memory; subclasses provide :meth:`load_arrays`.

    Args:
        batch_size: training and evaluation batch size.
        val_size: fraction (< 1) or number of training examples held out for validation.
        seed: seeds the train/val split and the training shuffle.
        flatten: feed ``(N, H*W)`` vectors (MLPs) instead of ``(N, 1, H, W)`` images (CNNs).
        train_subset: use only this many training examples (quick runs); ``None`` for all.
    """

    num_classes = 10

    def __init__(self, batch_size: int = 128, val_size: float = 0.1, seed: int = 0, flatten: bool = True,
                 train_subset: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not 0 < val_size:
            raise ValueError(f"val_size: expected a fraction in (0, 1) or a count >= 1, got {val_size}")
        self.batch_size, self.val_size, self.seed, self.flatten = batch_size, val_size, seed, flatten
        self.train_subset = train_subset
        self._splits: dict[str, TensorDataset] | None = None

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        self.setup()
        assert self._splits is not None
        return tuple(self._splits["train"].tensors[0].shape[1:])

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        xtr, ytr, xte, yte = self.load_arrays()
        scale = float(xtr.max()) or 1.0
        xtr_t = torch.from_numpy(np.asarray(xtr, dtype=np.float32)) / scale
        mean, std = xtr_t.mean(), xtr_t.std()

        def prep(x: np.ndarray) -> torch.Tensor:
            t = (torch.from_numpy(np.asarray(x, dtype=np.float32)) / scale - mean) / std
            return t.reshape(len(t), -1) if self.flatten else t.reshape(len(t), 1, *t.shape[1:])

        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(xtr), generator=gen)
        n_val = int(round(self.val_size * len(xtr))) if self.val_size < 1 else int(self.val_size)
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        x, xt = prep(xtr), prep(xte)
        y, yt = (torch.from_numpy(np.array(a, dtype=np.int64)) for a in (ytr, yte))
        self._splits = {"train": TensorDataset(x[train_idx], y[train_idx]),
                        "val": TensorDataset(x[val_idx], y[val_idx]), "test": TensorDataset(xt, yt)}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        assert self._splits is not None
        data = self._splits[split]
        sampler = EpochShuffle(len(data), self.seed) if shuffle else None
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's 8x8 digits (real, shipped with the package): 20% test split by ``seed``."""

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.images.astype(np.float32), d.target
        perm = np.random.default_rng(1234).permutation(len(x))  # fixed test set, independent of `seed`
        n_test = len(x) // 5
        return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]


class IDXDataModule(ArrayDataModule):
    """A data set shipped as the four standard IDX ``.gz`` files."""

    name = ""
    debian_dir = ""
    mirror = ""
    md5: dict[str, str] = {}

    def __init__(self, data_dir: str | None = None, download: bool = False, batch_size: int = 128,
                 val_size: float = 5000, seed: int = 0, flatten: bool = True,
                 train_subset: int | None = None) -> None:
        super().__init__(batch_size=batch_size, val_size=val_size, seed=seed, flatten=flatten,
                         train_subset=train_subset)
        self.data_dir, self.download = data_dir, download

    def find_files(self) -> Path:
        """The folder holding the four files: ``data_dir``, the Debian location, or a fresh download."""
        candidates = [Path(p) for p in (self.data_dir, self.debian_dir) if p]
        for c in candidates:
            if all((c / f).exists() for f in IDX_FILES):
                return c
        if not self.download:
            where = " or ".join(str(c) for c in candidates)
            raise FileNotFoundError(
                f"{self.name}: the IDX files {IDX_FILES} were not found in {where}. Put them in data_dir, "
                f"install the Debian package (apt-get install dataset-{self.name.lower()}), or pass download=True.")
        if not self.data_dir:
            raise ValueError(f"data_dir: needed as the download target for {self.name} (got None)")
        target = Path(self.data_dir)
        target.mkdir(parents=True, exist_ok=True)
        for f in IDX_FILES:
            if not (target / f).exists():
                with urllib.request.urlopen(self.mirror + f, timeout=60) as r:  # noqa: S310 - fixed https mirror
                    blob = r.read()
                digest = hashlib.md5(blob).hexdigest()  # noqa: S324 - the published checksums are MD5
                if digest != self.md5[f]:
                    raise OSError(f"{self.name}: {f} from {self.mirror} has MD5 {digest}, expected {self.md5[f]}")
                (target / f).write_bytes(blob)
        return target

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        d = self.find_files()
        arrays = [read_idx(d / f) for f in IDX_FILES]
        if len(arrays[0]) != len(arrays[1]) or len(arrays[2]) != len(arrays[3]):
            raise ValueError(f"{self.name}: image and label counts differ in {d}")
        return arrays[0], arrays[1], arrays[2], arrays[3]


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST (60k train / 10k test, 28x28)."""

    name = "Fashion-MNIST"
    debian_dir = "/usr/share/datasets/fashion-mnist"
    mirror = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    md5 = {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
           "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
           "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
           "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}


class MNISTDataModule(IDXDataModule):
    """MNIST (60k train / 10k test, 28x28)."""

    name = "MNIST"
    debian_dir = "/usr/share/datasets/mnist"
    mirror = "https://ossci-datasets.s3.amazonaws.com/mnist/"
    md5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
           "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
           "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
           "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
