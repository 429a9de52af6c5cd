import functools

import pytest
import torch

from bench import data, models
from bench.training import TrainConfig, Trainer
from protectors.core.base import PluginContext

torch.set_num_threads(2)

#: what a file's name declares it holds (the suite writes nothing else); ``.enc`` is an AES-GCM blob whose plaintext
#: must itself be one of the safe formats
DECLARED_FORMATS = {".json": "json", ".safetensors": "safetensors", ".onnx": "onnx", ".txt": "text", ".md": "text",
                    ".csv": "text", ".tex": "text", ".key": "text", ".lock": "empty", ".png": "png", ".pdf": "pdf",
                    ".enc": "aes-gcm"}


def is_pickle(data: bytes) -> bool:
    """Whether ``data`` is a pickle of any protocol (0–5: not only those that start with ``\\x80``) or a zip archive
    (``torch.save``'s default format, a zip holding ``data.pkl``). Nothing is unpickled: pickletools only parses."""
    import io
    import pickletools

    if data[:4] == b"PK\x03\x04":
        return True
    try:
        pickletools.dis(data, out=io.StringIO())
    except Exception:  # any parse failure (bad opcode, stack underflow, no STOP) means: not a pickle
        return False
    return True


def parse_as(fmt: str, data: bytes) -> None:
    """Parse ``data`` as ``fmt`` (raise if it does not parse); never calls a loader that can run code."""
    import json

    if fmt == "json":
        json.loads(data)
    elif fmt == "safetensors":
        from safetensors.torch import load

        header = int.from_bytes(data[:8], "little")
        json.loads(data[8:8 + header])  # the header is JSON, then raw tensor bytes
        load(data)
    elif fmt == "onnx":
        import onnx

        assert len(onnx.load_from_string(data).graph.node) > 0
    elif fmt == "text":
        data.decode("utf-8")
    elif fmt == "empty":
        assert data == b"", "a lock file holds nothing"
    elif fmt == "png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    elif fmt == "pdf":
        assert data.startswith(b"%PDF-")
    else:
        raise AssertionError(f"unknown format {fmt!r}")


def sniff_plaintext(data: bytes) -> str:
    """The safe format a decrypted blob parses as (JSON, safetensors or ONNX), or raise AssertionError."""
    for fmt in ("json", "safetensors", "onnx"):
        try:
            parse_as(fmt, data)
            return fmt
        except Exception:
            continue
    raise AssertionError(f"decrypted blob ({len(data)} bytes, starts {data[:16]!r}) is not JSON, safetensors or ONNX")


def assert_safe_files(root, key: bytes | None = None) -> dict[str, str]:
    """Every file under ``root`` (an artifact, a cache, a run directory) parses as the format its name declares,
    and none, nor any decrypted blob, is a pickle or a zip. In an artifact directory every encrypted file is
    decrypted with ``key`` (when given) and its plaintext must parse as JSON, safetensors or ONNX.

    Returns ``{relative path: format}`` (``"aes-gcm/<plaintext format>"`` for decrypted blobs), so a caller can check
    that the scan saw what it should have."""
    from pathlib import Path

    from protectors.core.artifact import META, Artifact
    from protectors.core.crypto import NONCE_BYTES, TAG_BYTES

    root = Path(root)
    seen: dict[str, str] = {}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        rel = str(path.relative_to(root)) if path != root else path.name
        data = path.read_bytes()
        assert not is_pickle(data), f"{rel} is a pickle (or a torch.save zip)"
        fmt = DECLARED_FORMATS.get(path.suffix)
        assert fmt is not None, f"{rel}: no declared format for suffix {path.suffix!r}"
        if fmt == "aes-gcm":
            assert len(data) >= NONCE_BYTES + TAG_BYTES, f"{rel}: too short for an AES-GCM blob"
            seen[rel] = fmt
            if key is not None and (path.parent / META).exists():
                plain = Artifact.load(path.parent).decrypt(path.name, key)
                assert not is_pickle(plain), f"{rel} decrypts to a pickle (or a torch.save zip)"
                seen[rel] = f"aes-gcm/{sniff_plaintext(plain)}"
            continue
        try:
            parse_as(fmt, data)
        except Exception as exc:
            raise AssertionError(f"{rel} does not parse as {fmt}: {exc!r}") from None
        seen[rel] = fmt
    return seen


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def digits():
    return data.load("digits", seed=0)


@pytest.fixture(scope="session")
def lenet_factory(digits):
    i = digits.info
    return models.factory("lenet5", i.in_channels, i.image_size, i.num_classes, seed=0)


@pytest.fixture(scope="session")
def trainer():
    return Trainer(TrainConfig(epochs=40, batch_size=32, lr=0.03), progress=False)


@pytest.fixture(scope="session")
def clean_lenet(digits, lenet_factory, trainer):
    torch.manual_seed(0)
    return trainer.fit(lenet_factory(), data.BatchLoader(digits.train_x, digits.train_y, 32, 0))


def make_context(splits, factory, trainer, epochs=40, seed=0, secret_seed=12345):
    return PluginContext(model_factory=factory, trainer=trainer,
                         train_loader=data.BatchLoader(splits.train_x, splits.train_y, 32, seed + 1),
                         calib_x=splits.train_x[:200], calib_y=splits.train_y[:200],
                         num_classes=splits.info.num_classes, epochs=epochs, lock_sites=factory.card.lock_sites,
                         device=torch.device("cpu"), seed=seed, secret_seed=secret_seed,
                         example_input=splits.train_x[:1])


@pytest.fixture(scope="session")
def ctx(digits, lenet_factory, trainer):
    return make_context(digits, lenet_factory, trainer)


@pytest.fixture(scope="session")
def key():
    return bytes(range(32))


@pytest.fixture(scope="session")
def other_key():
    return bytes(range(1, 33))


@pytest.fixture(scope="session")
def edgepro_artifact(clean_lenet, ctx, key):
    """A real EdgePro lock training on digits (LeNet-5, 40 epochs: about 5 s on 2 cores)."""
    import protectors

    torch.manual_seed(0)
    return protectors.get("edgepro").protect(clean_lenet, ctx, key)


#: fixtures that train a real model: every test that uses one, directly or through another fixture, is slow
TRAINING_FIXTURES = {"clean_lenet"}


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test that trains (uses a training fixture), so the fast loop never trains by accident."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@functools.cache
def _digits_test_set():
    s = data.load("digits", seed=0)
    return s.test_x, s.test_y


def score_on_test(model) -> float:
    """What the harness does with an attacked model (attacks never see the test set): digits test accuracy."""
    x, y = _digits_test_set()
    return Trainer(TrainConfig(), progress=False).evaluate(model, x, y)
