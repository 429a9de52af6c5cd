import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import data
from protectors.core.errors import DataError


def write_idx(raw: Path, n_train=20, n_test=10, side=28, gz=False):
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def put(name, payload):
        path = raw / (name + (".gz" if gz else ""))
        (gzip.open if gz else open)(path, "wb").write(payload)

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        put(f"{prefix}-images-idx3-ubyte", struct.pack(">IIII", 2051, n, side, side) + imgs.tobytes())
        put(f"{prefix}-labels-idx1-ubyte", struct.pack(">II", 2049, n) + labels.tobytes())


def test_digits_split_is_deterministic_and_stratified():
    a, b = data.load("digits", seed=3), data.load("digits", seed=3)
    assert torch.equal(a.train_y, b.train_y) and a.train_x.shape[1:] == (1, 8, 8)
    assert len(a.train_x) + len(a.test_x) == 1797
    assert not torch.equal(a.train_y, data.load("digits", seed=4).train_y)
    assert torch.bincount(a.test_y).min() >= 35


def test_fashion_from_idx_files_in_torchvision_layout(tmp_path):
    write_idx(tmp_path / "FashionMNIST" / "raw")
    s = data.load("fashion-mnist", root=str(tmp_path))
    assert s.train_x.shape == (20, 1, 28, 28) and s.test_x.shape == (10, 1, 28, 28)
    assert s.train_y.tolist()[:3] == [0, 1, 2]
    assert abs(float(s.train_x.mean())) < 1e-4  # standardized


def test_fashion_from_debian_layout_read_in_place(tmp_path, monkeypatch):
    deb = tmp_path / "deb"
    write_idx(deb / "fashion-mnist", gz=True)
    monkeypatch.setattr(data, "DEBIAN_ROOT", deb)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    s = data.load("fashion-mnist")
    assert s.train_x.shape[0] == 20 and s.test_y.tolist()[:3] == [0, 1, 2]
    assert not (tmp_path / "cache").exists()  # the .gz files are read as they are, not unpacked into the cache


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_ROOT", tmp_path / "nothing")
    with pytest.raises(DataError, match=r"mnist: no data in .*MNIST/raw.*--data-root.*--download"):
        data.load("mnist", root=str(tmp_path))
    with pytest.raises(DataError, match=r"fashion-mnist: no data .*dataset-fashion-mnist"):
        data.load("fashion-mnist", root=str(tmp_path))


def write_cifar(folder: Path, n=8):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "labels": [int(i) % 10 for i in range(n)],
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar_batches_read_safely(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    s = data.load("cifar10", root=str(tmp_path))
    assert s.train_x.shape == (40, 3, 32, 32) and s.test_x.shape == (8, 3, 32, 32) and s.augment


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/edgepro-bench-pwned"),))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps({"data": _Evil(), "labels": []}))
    with pytest.raises(DataError, match=r"data_batch_2: not a CIFAR-10 batch file .*not allowed"):
        data.load("cifar10", root=str(tmp_path))
    assert not Path("/tmp/edgepro-bench-pwned").exists()


def test_batch_loader_reshuffles_deterministically_and_augments():
    x, y = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous(), torch.arange(10)
    a, b = data.BatchLoader(x, y, 4, seed=1), data.BatchLoader(x, y, 4, seed=1)
    first = [yy.tolist() for _, yy in a]
    assert first == [yy.tolist() for _, yy in b]
    assert first != [yy.tolist() for _, yy in a]  # next epoch, new order
    assert sorted(sum(first, [])) == list(range(10))
    out = data.crop_flip(torch.ones(6, 3, 8, 8), torch.Generator().manual_seed(0), pad=2)
    assert out.shape == (6, 3, 8, 8) and out.min() == 0  # some zero padding came in


def test_subset_is_stratified():
    y = torch.arange(1000) % 10
    xs, ys = data.subset(torch.zeros(1000, 1), y, 0.05, seed=0)
    assert len(ys) == 50 and torch.bincount(ys).tolist() == [5] * 10


FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.realdata
@pytest.mark.skipif(not FASHION.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package():
    s = data.load("fashion-mnist", root=None)
    assert s.train_x.shape == (60000, 1, 28, 28) and s.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(s.train_y).tolist() == [6000] * 10
