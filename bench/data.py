"""Datasets: the embedded ``digits`` default, and MNIST, Fashion-MNIST and CIFAR-10 from a local root.

Every dataset becomes normalized tensors in memory (these datasets are small), split deterministically, and is
served by :class:`BatchLoader`, which shuffles with a seeded generator and does CIFAR's augmentation on whole
batches instead of image by image.

Where data is looked for, in order: ``--data-root`` / ``$EDGEPRO_BENCH_DATA`` (which must exist when given), else
``./data`` and the cache; for (Fashion-)MNIST also the Debian package layout (``/usr/share/datasets/<name>/*.gz``,
read in place). Nothing is downloaded unless asked (``download=True``). Every file is checked as it is read, and a
bad one is a :class:`DataError` naming it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import struct
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from protectors.core.errors import DataError
from protectors.core.hashing import canonical_json
from protectors.core.registry import Registry
from protectors.core.sampling import stratified_subset
from protectors.core.seeding import torch_generator

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

    @functools.cached_property
    def digest(self) -> str:
        """Short SHA-256 of exactly the data loaded (info, tensors, labels), computed once.

        A dataset's name does not say which copy of it was read; keying cached models by this digest means a changed
        or different file retrains instead of reusing a model trained on other data.
        """
        h = hashlib.sha256(canonical_json({**asdict(self.info), "augment": self.augment}))
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            t = t.detach().cpu().contiguous()
            h.update(canonical_json([str(t.dtype), list(t.shape)]))
            h.update(t.numpy())
        return h.hexdigest()[:16]


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


def explicit_root(root: str | None, download: bool = False) -> Path | None:
    """The data root the user named (``root``, else ``$EDGEPRO_BENCH_DATA``), or None when none was named.

    A named root must be a directory (``download`` may create it): a typo must fail, not silently fall back to
    another copy of the data.
    """
    given, what = (root, "--data-root") if root else (os.environ.get(DATA_ENV), f"${DATA_ENV}")
    if not given:
        return None
    path = Path(given)
    if path.exists() and not path.is_dir():
        raise DataError(f"{what} {path}: not a directory")
    if not path.exists() and not download:
        raise DataError(f"{what} {path}: no such directory")
    return path


def _roots(root: str | None, download: bool = False) -> list[Path]:
    given = explicit_root(root, download)
    return [given] if given else [Path("data"), cache_dir() / "data"]


IDX_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (raw or ``.gz``) with ``ndim`` dimensions, as a read-only uint8 array.

    Our own reader, not torchvision's: that one accepts any type code and dimension count and fails with a bare
    ``AssertionError`` that names no file.
    """
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    code, nd = raw[2], raw[3]
    if code != IDX_UBYTE:
        raise DataError(f"{path}: IDX type code 0x{code:02x} is not supported (only 0x08, unsigned byte)")
    if nd != ndim:
        raise DataError(f"{path}: IDX data has {nd} dimensions, expected {ndim}")
    start = 4 + 4 * nd
    if len(raw) < start:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{nd}I", raw[4:start])
    size = int(np.prod(shape))
    if len(raw) - start != size:
        raise DataError(f"{path}: {len(raw) - start} bytes of data for shape {shape}, expected {size}"
                        + (" (truncated)" if len(raw) - start < size else ""))
    return np.frombuffer(raw, np.uint8, size, start).reshape(shape)


def _check_labels(path: Path, labels: np.ndarray, n_images: int, num_classes: int) -> None:
    """Some images, one label each, each a valid class: otherwise training fails later without naming the file."""
    if labels.ndim != 1:
        raise DataError(f"{path}: labels have shape {labels.shape}, expected one per image")
    if len(labels) != n_images:
        raise DataError(f"{path}: {len(labels)} labels for {n_images} images")
    if n_images == 0:
        raise DataError(f"{path}: no images")
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(f"{path}: labels must be in 0..{num_classes - 1}, found {bad}")


#: (images, labels) file names per split, as LeCun published them
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx_path(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


def _read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    paths = []
    for name in _IDX_FILES[split]:
        path = _idx_path(folder, name)
        if path is None:
            raise DataError(f"{folder / name}: missing (looked for {name} and {name}.gz)")
        paths.append(path)
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if images.shape[1] != images.shape[2]:
        raise DataError(f"{paths[0]}: images are {images.shape[1]}x{images.shape[2]}, expected square")
    _check_labels(paths[1], labels, len(images), 10)
    return images, labels


def _mnist_like(cls_name: str, debian_name: str, root: str | None, download: bool) -> Splits:
    roots = _roots(root, download)
    candidates = [r / cls_name / "raw" for r in roots] + [DEBIAN_ROOT / debian_name]
    folder = next((f for f in candidates if _idx_path(f, _IDX_FILES["train"][0])), None)
    if folder is None and download:
        import torchvision.datasets as tvd

        try:  # fetches all four files into <root>/<cls_name>/raw, checking torchvision's MD5s
            getattr(tvd, cls_name)(str(roots[0]), train=True, download=True)
        except (RuntimeError, OSError, ValueError, AssertionError) as exc:
            raise DataError(f"{debian_name}: download into {roots[0]} failed: {exc}") from None
        folder = candidates[0]
    if folder is None:
        debian = ", install the Debian package dataset-fashion-mnist" if debian_name == "fashion-mnist" else ""
        raise DataError(
            f"{debian_name}: no data in {' or '.join(map(str, candidates))}; put the IDX files under "
            f"<root>/{cls_name}/raw/ and pass --data-root (or set ${DATA_ENV}){debian}, "
            "or pass --download when online"
        )
    (xtr, ytr), (xte, yte) = _read_idx_split(folder, "train"), _read_idx_split(folder, "test")
    if xte.shape[1:] != xtr.shape[1:]:
        raise DataError(f"{folder}: test images are {xte.shape[1]}x{xte.shape[2]}, "
                        f"training images {xtr.shape[1]}x{xtr.shape[2]}")
    trx, tex = _normalize(xtr[:, None] / 255.0, xte[:, None] / 255.0)
    info = DatasetInfo(debian_name, 1, int(xtr.shape[-1]), 10)
    return Splits(info, trx, torch.as_tensor(ytr.astype(np.int64)), tex, torch.as_tensor(yte.astype(np.int64)))


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
        data = np.asarray(d["data"])
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError, OverflowError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 batch file ({exc})") from None
    # Any other shape or dtype would reshape or cast silently into wrong images.
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' is {data.dtype} of shape {data.shape}, expected uint8 of shape (N, 3072)")
    _check_labels(path, labels, len(data), 10)
    return data.reshape(-1, 3, 32, 32), labels


@datasets.register("cifar10")
def load_cifar10(root: str | None = None, seed: int = 0, download: bool = False) -> Splits:
    """CIFAR-10 in torchvision's folder layout (``<root>/cifar-10-batches-py``), read without unsafe pickle."""
    from torchvision.datasets import CIFAR10

    roots = _roots(root, download)
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
        splits = replace(splits, train_x=splits.train_x[:train_subset], train_y=splits.train_y[:train_subset])
    return splits


#: kept under its old name: the harness and tests call ``data.subset``
subset = stratified_subset
