"""Datasets: the embedded ``digits`` default, and MNIST, Fashion-MNIST and CIFAR-10 from a local root.

Every dataset becomes normalized tensors in memory (these datasets are small), split deterministically, and is
served by :class:`BatchLoader`, which shuffles with a seeded generator and does CIFAR's augmentation on whole
batches instead of image by image.

Where data is looked for, in order: ``--data-root`` / ``$EDGEPRO_BENCH_DATA``; for (Fashion-)MNIST also the Debian
package layout (``/usr/share/datasets/<name>/*.gz``, unpacked once into the cache). Nothing is downloaded unless
asked (``download=True``).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from protectors.errors import DataError
from protectors.registry import Registry
from protectors.sampling import stratified_subset
from protectors.seeding import torch_generator

DATA_ENV = "EDGEPRO_BENCH_DATA"
CACHE_ENV = "EDGEPRO_BENCH_CACHE"
DEBIAN_ROOT = Path("/usr/share/datasets")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgepro-bench")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    image_size: int
    num_classes: int


@dataclass
class Splits:
    """Normalized train/test tensors (N, C, H, W) float32 and labels int64."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    augment: bool = False


class BatchLoader:
    """Re-iterable mini-batches of in-memory tensors; each pass reshuffles with a seeded generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True,
                 augment: bool = False):
        self.x, self.y, self.batch_size, self.shuffle, self.augment = x, y, batch_size, shuffle, augment
        self.gen = torch_generator(seed)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            x = self.x[idx]
            if self.augment:
                x = crop_flip(x, self.gen)
            yield x, self.y[idx]


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, for a whole batch at once."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(b, x.shape[1], h, w)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(b, x.shape[1], h, w)
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


datasets: Registry[Callable[..., Splits]] = Registry("dataset")


def _normalize(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel standardization with the training set's statistics."""
    tr = torch.as_tensor(train, dtype=torch.float32)
    te = torch.as_tensor(test, dtype=torch.float32)
    dims = (0, 2, 3)
    mean, std = tr.mean(dims, keepdim=True), tr.std(dims, keepdim=True).clamp_min(1e-6)
    return ((tr - mean) / std).contiguous(), ((te - mean) / std).contiguous()


@datasets.register("digits")
def load_digits(root: str | None = None, seed: int = 0, download: bool = False) -> Splits:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images): 80/20 stratified split by ``seed``."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, random_state=seed, stratify=d.target)
    trx, tex = _normalize(xtr, xte)
    return Splits(DatasetInfo("digits", 1, 8, 10), trx, torch.as_tensor(ytr, dtype=torch.long),
                  tex, torch.as_tensor(yte, dtype=torch.long))


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


def _debian_unpack(debian_name: str, tv_folder: str) -> Path | None:
    """Unpack the Debian package's ``.gz`` IDX files once into the cache, in torchvision's layout."""
    src = DEBIAN_ROOT / debian_name
    if not all((src / f"{f}.gz").exists() for f in _IDX_FILES):
        return None
    root = cache_dir() / "data"
    raw = root / tv_folder / "raw"
    if not all((raw / f).exists() for f in _IDX_FILES):
        raw.mkdir(parents=True, exist_ok=True)
        for f in _IDX_FILES:
            tmp = raw / f".{f}.tmp"
            with gzip.open(src / f"{f}.gz", "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(tmp, raw / f)
    return root


def _roots(root: str | None) -> list[Path]:
    given = root or os.environ.get(DATA_ENV)
    return [Path(given)] if given else [Path("data"), cache_dir() / "data"]


def _mnist_like(cls_name: str, debian_name: str, root: str | None, download: bool) -> Splits:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    tried = []
    candidates = _roots(root)
    for r in candidates:
        tried.append(str(r / cls_name / "raw"))
        if (r / cls_name / "raw" / _IDX_FILES[0]).exists() or download:
            break
    else:
        deb = _debian_unpack(debian_name, cls_name)
        tried.append(str(DEBIAN_ROOT / debian_name))
        if deb is None:
            debian = ", install the Debian package dataset-fashion-mnist" if debian_name == "fashion-mnist" else ""
            raise DataError(
                f"{debian_name}: no data in {' or '.join(tried)}; put the IDX files under "
                f"<root>/{cls_name}/raw/ and pass --data-root (or set ${DATA_ENV}){debian}, "
                "or pass --download when online"
            )
        r = deb
    try:
        train = cls(str(r), train=True, download=download)
        test = cls(str(r), train=False, download=download)
    except (RuntimeError, OSError, ValueError, AssertionError) as exc:
        raise DataError(f"{debian_name}: cannot read {r / cls_name / 'raw'}: {exc}") from None
    trx, tex = _normalize(train.data[:, None].numpy() / 255.0, test.data[:, None].numpy() / 255.0)
    info = DatasetInfo(debian_name, 1, int(train.data.shape[-1]), 10)
    return Splits(info, trx, train.targets.long(), tex, test.targets.long())


@datasets.register("mnist")
def load_mnist(root: str | None = None, seed: int = 0, download: bool = False) -> Splits:
    return _mnist_like("MNIST", "mnist", root, download)


@datasets.register("fashion-mnist")
def load_fashion(root: str | None = None, seed: int = 0, download: bool = False) -> Splits:
    return _mnist_like("FashionMNIST", "fashion-mnist", root, download)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's batch files while refusing every global except NumPy's array reconstruction.

    The CIFAR python batches are pickles; a plain ``pickle.load`` (what torchvision does) would run arbitrary
    code from a tampered file.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file → (N, 3, 32, 32) uint8 images and int64 labels."""
    try:
        d = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 batch file ({exc})") from None
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


@datasets.register("cifar10")
def load_cifar10(root: str | None = None, seed: int = 0, download: bool = False) -> Splits:
    """CIFAR-10 in torchvision's folder layout (``<root>/cifar-10-batches-py``), read without unsafe pickle."""
    from torchvision.datasets import CIFAR10

    roots = _roots(root)
    folder = next((r / CIFAR10.base_folder for r in roots if (r / CIFAR10.base_folder).is_dir()), None)
    if folder is None and download:
        from torchvision.datasets.utils import download_and_extract_archive

        # Download and check the archive's MD5 only; torchvision's CIFAR10() would also unpickle it.
        download_and_extract_archive(CIFAR10.url, str(roots[0]), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        folder = roots[0] / CIFAR10.base_folder
    if folder is None:
        raise DataError(f"cifar10: no data in {' or '.join(str(r / CIFAR10.base_folder) for r in roots)}; "
                        f"pass --data-root (or set ${DATA_ENV}) or --download when online")
    parts = {}
    for split, files in (("train", CIFAR10.train_list), ("test", CIFAR10.test_list)):
        missing = [f for f, _ in files if not (folder / f).exists()]
        if missing:
            raise DataError(f"cifar10: {folder / missing[0]} is missing")
        xs, ys = zip(*(read_cifar_batch(folder / f) for f, _ in files))
        parts[split] = (np.concatenate(xs), np.concatenate(ys))
    trx, tex = _normalize(parts["train"][0] / 255.0, parts["test"][0] / 255.0)
    return Splits(DatasetInfo("cifar10", 3, 32, 10), trx, torch.as_tensor(parts["train"][1]), tex,
                  torch.as_tensor(parts["test"][1]), augment=True)


def load(name: str, root: str | None = None, seed: int = 0, download: bool = False,
         train_subset: int | None = None) -> Splits:
    """Load dataset ``name``; ``train_subset`` keeps the first N training images (as the paper does for MNIST)."""
    splits = datasets.get(name)(root=root, seed=seed, download=download)
    if train_subset:
        splits.train_x, splits.train_y = splits.train_x[:train_subset], splits.train_y[:train_subset]
    return splits


#: kept under its old name: the harness and tests call ``data.subset``
subset = stratified_subset
