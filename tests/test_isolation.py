"""Attack code runs in a process of its own, which holds neither the key nor the test set (bench/isolation.py).

The planted attack (tests/planted_attack.py) searches the whole writable memory of the process it runs in for the
device key and for a test image. Run by the harness as every attack is, it finds neither; the same search run in the
harness's process (``isolate=False``, and this test's own process) finds both, so the search itself works.
"""

import json
import os

import planted_attack
import pytest
import torch
from torch import nn

from bench import config, data, isolation, wire
from bench.runner import Runner
from protectors.core import lock
from protectors.core.kinds.neuron_mask import Password
from protectors.core.pruning import Pruned

CFG = """
name = "iso"
datasets = ["digits"]
seeds = [0]
[train]
epochs = 1
[[protectors]]
name = "edgepro"
[[attacks]]
name = "planted-search"
key_probe = "{key_probe}"
key_offset = {key_offset}
key_length = {key_length}
key_digest = "{key_digest}"
test_probe = "{test_probe}"
test_offset = {test_offset}
test_length = {test_length}
test_digest = "{test_digest}"
"""


def _test_image() -> bytes:
    """The bytes of a test image that no training image shares (so a hit is the test set, not the thief's data)."""
    s = data.load("digits", seed=0)
    train = {x.numpy().tobytes() for x in s.train_x}
    for x in s.test_x:
        b = x.contiguous().numpy().tobytes()
        if b not in train:
            return b
    raise AssertionError("every test image is also a training image")


def _run(tmp_path, isolate: bool, key: bytes, image: bytes):
    fk, fi = planted_attack.fingerprint(key), planted_attack.fingerprint(image, probe=16)
    p = tmp_path / "iso.toml"
    p.write_text(CFG.format(**{f"{w}_{k}": v for w, f in (("key", fk), ("test", fi)) for k, v in f.items()}))
    out = tmp_path / f"out-{isolate}"
    runner = Runner(config.load(str(p)), out, key_file=str(tmp_path / "key.hex"), cache_dir=tmp_path / "cache",
                    progress=False, profile=False, isolate=isolate)
    runner.run()
    recs = [json.loads(f.read_text()) for f in (out / "records").glob("*.json")]
    (rec,) = [r["result"] for r in recs if r["cell"]["kind"] == "attack"]
    return runner, rec


def test_planted_attack_finds_neither_key_nor_test_set(tmp_path):
    key = os.urandom(32)
    (tmp_path / "key.hex").write_text(key.hex())
    os.chmod(tmp_path / "key.hex", 0o600)
    image = _test_image()

    runner, isolated = _run(tmp_path, True, key, image)
    extra = isolated["extra"]
    assert extra["pid"] != os.getpid()
    assert extra["key_hits"] == 0 and extra["test_hits"] == 0, extra
    assert extra["harness_modules"] == 0 and extra["key_in_env"] == 0
    # the harness still scored the copy and applied the real password to it
    assert isolated["applicable"] and isolated["auth_acc_after"] is not None

    # Positive controls: the same search finds both where they are.
    _, inline = _run(tmp_path, False, key, image)
    assert inline["extra"]["pid"] == os.getpid()
    assert inline["extra"]["key_hits"] >= 1 and inline["extra"]["test_hits"] >= 1, inline["extra"]
    assert runner.key == key  # this process holds the key it searched for


class _Tiny(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU()
        self.dw = nn.Conv2d(width, width, 3, groups=width)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        x = self.dw(self.act(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def _pruned_tiny() -> nn.Module:
    """A _Tiny with channels 1, 4 of its first block removed by hand (as structured pruning leaves it)."""
    m = _Tiny()
    keep = torch.tensor([0, 2, 3, 5])
    with torch.no_grad():
        small = _Tiny(4)
        small.conv.weight.copy_(m.conv.weight[keep])
        small.conv.bias.copy_(m.conv.bias[keep])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(small.bn, name).copy_(getattr(m.bn, name)[keep] + 0.1)
        small.dw.weight.copy_(m.dw.weight[keep])
        small.dw.bias.copy_(m.dw.bias[keep])
        small.fc.weight.copy_(m.fc.weight[:, keep])
        small.fc.bias.copy_(m.fc.bias)
    return small


def test_rebuild_keeps_pruned_shapes_and_lock_masks():
    attacked = _pruned_tiny()
    lock.install_masks(attacked, {"act": torch.tensor([1.0, 0.0, 2.0, 1.0])})
    head, blobs = isolation.model_payload(attacked)
    rebuilt = isolation.rebuild(_Tiny(), head, blobs)  # the harness starts from the full architecture
    assert rebuilt.dw.groups == 4 and rebuilt.dw.in_channels == 4 and rebuilt.bn.num_features == 4
    x = torch.randn(2, 1, 8, 8)
    attacked.eval()
    assert torch.equal(attacked(x), rebuilt.eval()(x))
    assert torch.equal(lock.sites_of(rebuilt)["act"].mask, torch.tensor([1.0, 0.0, 2.0, 1.0]))


def test_a_model_beyond_the_architecture_is_refused():
    attacked = _Tiny()
    attacked.fc.register_forward_hook(lambda m, i, o: o * 2)  # lost on the way: the round trip must say so
    head, blobs = isolation.model_payload(attacked)
    with pytest.raises(isolation.AttackProcessError, match="cannot be rebuilt"):
        isolation._check_roundtrip(attacked, _Tiny, head, blobs, {"in_channels": 1, "image_size": 8})
    extra = _Tiny()
    extra.head = nn.Linear(3, 3)
    head, blobs = isolation.model_payload(extra)
    with pytest.raises(isolation.AttackProcessError, match="not the architecture"):
        isolation.rebuild(_Tiny(), head, blobs)


def test_guess_and_pruning_map_cross_as_data_only():
    guess = Password({"act": [1, 3]}, {"act": 6}, 0.0, 1.0)
    assert isolation.guess_from(json.loads(wire.dumps(isolation.guess_payload(guess)))) == guess
    for forged in ({"type": "os:system", "fields": {}}, {"type": "protectors.core.kinds.neuron_mask:torch",
                                                         "fields": {}}, {"type": 3}):
        with pytest.raises(isolation.AttackProcessError):
            isolation.guess_from(forged)
    with pytest.raises(isolation.AttackProcessError, match="dataclass of protectors.core.kinds"):
        isolation.guess_payload(object())
    pruned = Pruned({"conv": [0, 2]}, torch.ones(1, 1, 8, 8))
    head, blobs = isolation.pruned_payload(pruned)
    back = isolation.pruned_from(json.loads(wire.dumps(head)), blobs)
    assert back.kept == pruned.kept and torch.equal(back.example, pruned.example)
    with pytest.raises(isolation.AttackProcessError, match="malformed"):
        isolation.pruned_from({"kept": {"conv": ["x"]}}, blobs)


def test_wire_refuses_malformed_messages(tmp_path):
    import io

    buf = io.BytesIO()
    wire.send(buf, {"op": "x"}, {"a": b"123"})
    buf.seek(0)
    assert wire.recv(buf) == ({"op": "x"}, {"a": b"123"})
    bad = io.BytesIO(wire._LEN.pack(wire.MAX_HEADER + 1))
    with pytest.raises(wire.WireError, match="header"):
        wire.recv(bad)
    with pytest.raises(wire.WireClosed):
        wire.recv(io.BytesIO(wire._LEN.pack(10) + b"{}"))
    with pytest.raises(wire.WireError, match="not safetensors"):
        wire.unpack(b"\x80\x04pickle", "a model")


def test_attack_process_reports_errors_and_survives_a_dead_child():
    proc = isolation.AttackProcess()
    try:
        with pytest.raises(isolation.AttackProcessError, match="KeyError"):
            proc.run({"op": "attack"}, {}, lambda h, b: ({}, {}))  # a job without its fields: the child says why
        pid = proc.pid
        with pytest.raises(isolation.AttackProcessError, match="KeyError"):  # the same process, ready again
            proc.run({"op": "attack"}, {}, lambda h, b: ({}, {}))
        assert proc.pid == pid
        os.kill(pid, 9)
        proc._proc.wait()
        with pytest.raises(isolation.AttackProcessError, match="KeyError"):  # a fresh process the next time
            proc.run({"op": "attack"}, {}, lambda h, b: ({}, {}))
        assert proc.pid != pid
    finally:
        proc.close()


def test_untrusted_results_are_one_clear_error():
    import numpy as np

    with pytest.raises(isolation.AttackProcessError, match="malformed"):
        isolation.rebuild(_Tiny(), ["not", "a", "dict"], isolation.model_payload(_Tiny())[1])
    bad = _Tiny()
    bad.fc.bias = nn.Parameter(torch.zeros(5))  # a bias of another width than its weight: loads, does not run
    head, blobs = isolation.model_payload(bad)
    rebuilt = isolation.rebuild(_Tiny(), head, blobs)
    with pytest.raises(isolation.AttackProcessError, match="does not run"):
        isolation.check_runs(rebuilt, torch.zeros(2, 1, 8, 8))
    with pytest.raises(isolation.AttackProcessError, match="not a secret kind"):
        isolation.guess_from({"type": "protectors.core.kinds.nosuch:Password", "fields": {}})
    # numpy numbers cross as the record writer stores them (a scalar as a float, an array as a list)
    assert json.loads(wire.dumps({"a": np.int64(3), "b": np.arange(3), "c": torch.tensor(0.5)})) == \
        {"a": 3.0, "b": [0, 1, 2], "c": 0.5}


def test_a_result_that_fails_the_record_schema_is_never_written(tmp_path):
    from bench.records import RecordStore
    from protectors.core.errors import BenchError

    store = RecordStore(tmp_path)
    cell = {"kind": "attack", "dataset": "digits", "model": "lenet5", "seed": 0, "attack_seed": 0, "label": "x",
            "attack_label": "finetune", "param": "f=0.1", "protector": {"name": "none", "params": {}}}
    result = {"applicable": True, "stolen_acc_after": 0.5, "auth_acc_after": None, "scratch_acc": 0.4, "gain": 0.1,
              "budget": [0.1, 3], "extra": {}, "note": "", "val_acc": float("nan")}
    with pytest.raises(BenchError, match="fails the record schema"):
        store.write(cell, result, seed=0)
    assert not list((tmp_path / "records").glob("*.json")) if (tmp_path / "records").exists() else True


def test_two_threads_share_one_attack_process_without_mixing_messages():
    import threading

    proc = isolation.AttackProcess()
    errors = []

    def one():
        for _ in range(3):
            try:
                proc.run({"op": "attack"}, {}, lambda h, b: ({}, {}))
            except isolation.AttackProcessError as exc:
                errors.append("KeyError" in str(exc))

    try:
        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [True] * 6
    finally:
        proc.close()
