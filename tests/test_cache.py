"""The cache heals itself (a damaged entry is reported once and rebuilt) and is safe to share between processes."""

import multiprocessing as mp
import shutil
import time
import warnings

import pytest
import torch
from conftest import assert_safe_files
from torch import nn

import protectors
from bench.cache import Cache, CacheWarning

KEY = bytes(range(32))


def build():
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def counting_train(log):
    def train(m):
        with open(log, "a") as fh:
            fh.write("x")
        time.sleep(0.3)
        with torch.no_grad():
            m.weight.add_(1.0)
        return m

    return train


def test_damaged_model_entry_warns_once_and_is_rebuilt(tmp_path):
    cache, log = Cache(tmp_path, KEY), tmp_path / "log"
    first = cache.model({"k": 1}, build, counting_train(log))
    path = next((tmp_path / "models").glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a flipped bit in the weights, where the file still parses
    path.write_bytes(bytes(data))
    with pytest.warns(CacheWarning, match=r"damaged cache entry \(tensor checksum mismatch\); rebuilding"):
        again = cache.model({"k": 1}, build, counting_train(log))
    torch.testing.assert_close(again.weight, first.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # healed: no second warning
        cache.model({"k": 1}, build, counting_train(log))
    path.write_bytes(path.read_bytes()[:30])
    with pytest.warns(CacheWarning, match="unreadable"):
        cache.model({"k": 1}, build, counting_train(log))
    assert log.read_text() == "xxx"
    assert set(assert_safe_files(tmp_path / "models").values()) == {"safetensors", "empty"}  # entries and lock files


@pytest.mark.slow
def test_damaged_or_foreign_artifact_entry_is_rebuilt(tmp_path, clean_lenet, ctx):
    cache = Cache(tmp_path, KEY)
    p = protectors.get("aes")
    made = []

    def make(key=KEY):
        made.append(1)
        return p.protect(clean_lenet, ctx, key)

    cache.artifact({"a": 1}, make)
    path = next(d for d in (tmp_path / "artifacts").iterdir() if d.is_dir() and not d.name.startswith("."))
    (path / "model.enc").write_bytes((path / "model.enc").read_bytes()[:-7])
    with pytest.warns(CacheWarning, match=r"model.enc: SHA-256 mismatch"):
        cache.artifact({"a": 1}, make)
    # An entry made under another key is not trusted either.
    with pytest.warns(CacheWarning, match="wrong key"):
        Cache(tmp_path, bytes(range(1, 33))).artifact({"a": 1}, lambda: make(bytes(range(1, 33))))
    assert len(made) == 3


@pytest.mark.slow
def test_a_genuine_artifact_of_another_cell_swapped_in_is_refused(tmp_path, clean_lenet, ctx):
    """Rolling an entry back to another genuine artifact under the same key (an older build, or another cell's) is
    caught: the artifact's authenticated metadata names the cell it was built for."""
    cache = Cache(tmp_path, KEY)
    p = protectors.get("none")
    made = []

    def make():
        made.append(1)
        return p.protect(clean_lenet, ctx, KEY)

    cache.artifact({"cell": "a"}, make)
    cache.artifact({"cell": "b"}, make)
    root = tmp_path / "artifacts"
    a, b = (root / cache._hash({"cell": "a"})), (root / cache._hash({"cell": "b"}))
    shutil.rmtree(a)
    shutil.copytree(b, a)
    with pytest.warns(CacheWarning, match="built for cell"):
        cache.artifact({"cell": "a"}, make)
    assert len(made) == 3


def _worker(root, log):
    Cache(root, KEY).model({"shared": 1}, build, counting_train(log))


def test_two_processes_train_a_shared_entry_once(tmp_path):
    log = tmp_path / "log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(tmp_path, log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert log.read_text() == "x"


def test_a_cached_model_path_that_is_a_directory_is_rebuilt(tmp_path):
    cache = Cache(tmp_path, KEY)
    log = tmp_path / "log"
    path = tmp_path / "models" / f"{cache._hash({'dir': 1})}.safetensors"
    path.mkdir(parents=True)
    (path / "junk").write_text("x")
    with pytest.warns(CacheWarning, match="not a regular file"):
        cache.model({"dir": 1}, build, counting_train(log))
    assert path.is_file() and log.read_text() == "x"
