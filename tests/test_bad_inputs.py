"""Bad input gets one clear line naming the file or field, exit status 2, and nothing trained or half-written.

Every test here is fast: tiny files in the real formats, written by the test, and no training.
"""

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
from test_data import write_cifar, write_idx

from bench import config, data, report
from bench.cli import main
from protectors.core.errors import BenchError, DataError

NONE = 'protectors = [{name = "none"}]\n'
BASE = 'datasets = ["digits"]\n' + NONE


@pytest.fixture
def no_runner(monkeypatch):
    """Any test using this fails if the CLI gets as far as building a Runner (that is, could train)."""
    import bench.runner

    def refuse(*args, **kwargs):
        raise AssertionError("the Runner was built: the bad input was not caught up front")

    monkeypatch.setattr(bench.runner, "Runner", refuse)


def run_cli(tmp_path, capsys, text, *extra):
    """``bench run`` on a config holding ``text``; returns (exit status, stderr)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    args = ["run", "--config", str(cfg), "--no-progress", "--no-profile"]
    if "--out" not in extra:
        args += ["--out", str(tmp_path / "out")]
    if "--cache-dir" not in extra:
        args += ["--cache-dir", str(tmp_path / "cache")]
    rc = main(args + list(extra))
    return rc, capsys.readouterr().err


def assert_one_line(err, *fragments):
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


# -- 1, 2, 3: config values --------------------------------------------------------------------------------------
@pytest.mark.parametrize("train,message", [
    ("momentum = -0.1", "'momentum' must be in [0, 1), got -0.1"),
    ("momentum = 1.0", "'momentum' must be in [0, 1), got 1.0"),
    ("weight_decay = -0.001", "'weight_decay' must be >= 0"),
    ("cosine_t_max = 0", "'cosine_t_max' must be >= 1 when given, got 0"),
])
def test_train_hyperparameters_out_of_range(tmp_path, capsys, no_runner, train, message):
    rc, err = run_cli(tmp_path, capsys, BASE + f"[train]\n{train}\n")
    assert rc == 2
    assert_one_line(err, "c.toml: train:", message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line,field,bad", [
    ("seeds = [0, -1]", "seeds", "-1"),
    ("seeds = [4294967296]", "seeds", "4294967296"),
    ("attack_seeds = [-5]", "attack_seeds", "-5"),
    ("attack_seeds = [0, 4294967296]", "attack_seeds", "4294967296"),
])
def test_seeds_out_of_range(tmp_path, capsys, no_runner, line, field, bad):
    rc, err = run_cli(tmp_path, capsys, BASE + line + "\n")
    assert rc == 2
    assert_one_line(err, f"c.toml: {field}: seeds must be in [0, 2**32), got {bad}")


def test_largest_seed_is_accepted(tmp_path):
    (tmp_path / "c.toml").write_text(BASE + "seeds = [0, 4294967295]\n")
    assert config.load(str(tmp_path / "c.toml")).seeds == [0, 2**32 - 1]


def test_empty_protectors_is_an_error_but_empty_attacks_is_fine(tmp_path, capsys, no_runner):
    rc, err = run_cli(tmp_path, capsys, 'datasets = ["digits"]\nprotectors = []\n')
    assert rc == 2
    assert_one_line(err, "c.toml: protectors: must not be empty", "python -m bench list")
    (tmp_path / "ok.toml").write_text(BASE + "attacks = []\n")
    cfg = config.load(str(tmp_path / "ok.toml"))
    assert cfg.attacks == [] and [p.name for p in cfg.protectors] == ["none"]


# -- 4: output and cache paths -----------------------------------------------------------------------------------
def test_out_that_is_a_file(tmp_path, capsys, no_runner):
    (tmp_path / "taken").write_text("x")
    rc, err = run_cli(tmp_path, capsys, BASE, "--out", str(tmp_path / "taken"))
    assert rc == 2
    assert_one_line(err, f"--out {tmp_path / 'taken'}: ", "is a file, not a directory")
    rc, err = run_cli(tmp_path, capsys, BASE, "--out", str(tmp_path / "taken" / "sub"))
    assert rc == 2
    assert_one_line(err, f"--out {tmp_path / 'taken' / 'sub'}: {tmp_path / 'taken'} is a file")


def test_cache_dir_that_is_a_file_leaves_out_untouched(tmp_path, capsys, no_runner):
    (tmp_path / "cachefile").write_text("x")
    rc, err = run_cli(tmp_path, capsys, BASE, "--cache-dir", str(tmp_path / "cachefile"))
    assert rc == 2
    assert_one_line(err, f"--cache-dir {tmp_path / 'cachefile'}: ", "is a file")
    assert not (tmp_path / "out").exists()  # the probe of --out removed what it created


def test_unwritable_out(tmp_path, capsys, no_runner, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Simulated: these tests may run as root, for whom no mode bit makes a directory unwritable.
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    rc, err = run_cli(tmp_path, capsys, BASE, "--out", str(tmp_path / "ro" / "run"))
    assert rc == 2
    assert_one_line(err, f"--out {tmp_path / 'ro' / 'run'}: not writable (Permission denied)")
    assert not (tmp_path / "ro").exists()


def test_unwritable_out_by_mode(tmp_path, capsys, no_runner):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes in read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        rc, err = run_cli(tmp_path, capsys, BASE, "--out", str(ro))
    finally:
        ro.chmod(0o700)
    assert rc == 2
    assert_one_line(err, f"--out {ro}: not writable")


# -- 5: an explicit data root ------------------------------------------------------------------------------------
def test_missing_data_root_is_an_error_not_a_fallback(tmp_path, capsys, no_runner, monkeypatch):
    missing = tmp_path / "nowhere"
    rc, err = run_cli(tmp_path, capsys, BASE, "--data-root", str(missing))
    assert rc == 2
    assert_one_line(err, f"--data-root {missing}: no such directory")
    # Even where a fallback location has the data, a named root that is not there is not silently replaced.
    write_idx(tmp_path / "data" / "MNIST" / "raw")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="--data-root .*nowhere: no such directory"):
        data.load("mnist", root=str(missing))
    monkeypatch.setenv(data.DATA_ENV, str(missing))
    with pytest.raises(DataError, match=r"\$EDGEPRO_BENCH_DATA .*nowhere: no such directory"):
        data.load("mnist")
    monkeypatch.delenv(data.DATA_ENV)
    assert len(data.load("mnist").train_y) == 20  # no root named: ./data is still looked in


# -- 6: IDX files ------------------------------------------------------------------------------------------------
def idx(code: int, dims: tuple, payload: bytes) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


@pytest.mark.parametrize("name,content,message", [
    ("train-images-idx3-ubyte", idx(0x0D, (20, 28, 28), bytes(20 * 28 * 28 * 4)),
     "IDX type code 0x0d is not supported (only 0x08, unsigned byte)"),
    ("train-images-idx3-ubyte", idx(0x08, (20, 784), bytes(20 * 784)), "IDX data has 2 dimensions, expected 3"),
    ("train-labels-idx1-ubyte", idx(0x08, (20, 1), bytes(20)), "IDX data has 2 dimensions, expected 1"),
    ("train-images-idx3-ubyte", idx(0x08, (20, 28, 28), bytes(100)), "(truncated)"),
    ("t10k-images-idx3-ubyte", idx(0x08, (10, 28, 28), bytes(10 * 28 * 28 + 3)), "expected 7840"),
    ("train-labels-idx1-ubyte", idx(0x08, (20,), bytes(range(20))), "labels must be in 0..9, found 10"),
    ("t10k-labels-idx1-ubyte", idx(0x08, (9,), bytes(9)), "9 labels for 10 images"),
    ("train-images-idx3-ubyte", b"PK\x03\x04", "not an IDX file"),
])
def test_bad_idx_file_is_named(tmp_path, capsys, name, content, message):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw)
    (raw / name).write_bytes(content)
    rc, err = run_cli(tmp_path, capsys, 'datasets = ["mnist"]\n' + NONE, "--data-root", str(tmp_path))
    assert rc == 2
    assert_one_line(err, f"{raw / name}: ", message)
    assert not list((tmp_path / "out").glob("records/*.json"))


def test_gz_idx_files_are_read_and_checked(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw, gz=True)
    assert data.load("mnist", root=str(tmp_path)).train_x.shape == (20, 1, 28, 28)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(0x08, (10,), bytes([11] * 10))))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: labels must be in 0..9, found 11"):
        data.load("mnist", root=str(tmp_path))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(0x08, (10,), bytes(10)))[:-12])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: cannot read"):
        data.load("mnist", root=str(tmp_path))
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: missing"):
        data.load("mnist", root=str(tmp_path))


# -- 7: CIFAR-10 batches -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,message", [
    ({"data": np.zeros((8, 3072), np.uint8), "labels": [0] * 7 + [10]}, "labels must be in 0..9, found 10"),
    ({"data": np.zeros((8, 3072), np.uint8), "labels": [-1] * 8}, "labels must be in 0..9, found -1"),
    ({"data": np.zeros((8, 3072), np.uint8), "labels": [0] * 7}, "7 labels for 8 images"),
    ({"data": np.zeros((16, 1536), np.uint8), "labels": [0] * 8},
     "uint8 of shape (16, 1536), expected uint8 of shape (N, 3072)"),
    ({"data": np.zeros((8, 3072), np.int64), "labels": [0] * 8}, "'data' is int64"),
])
def test_bad_cifar_batch_is_named(tmp_path, capsys, batch, message):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    rc, err = run_cli(tmp_path, capsys, 'datasets = ["cifar10"]\n' + NONE, "--data-root", str(tmp_path))
    assert rc == 2
    assert_one_line(err, f"{folder / 'data_batch_3'}: ", message)


# -- 8: records --------------------------------------------------------------------------------------------------
GOOD_CELL = {"kind": "effectiveness", "dataset": "digits", "model": "lenet5", "seed": 0, "label": "none",
             "protector": {"name": "none", "params": {}}}


@pytest.mark.parametrize("record,message", [
    ({"cell": {k: v for k, v in GOOD_CELL.items() if k != "dataset"}, "result": {}},
     "cell of kind 'effectiveness' needs string fields dataset, model, label; missing or not a string: dataset"),
    ({"cell": {k: v for k, v in GOOD_CELL.items() if k != "label"}, "result": {}}, "missing or not a string: label"),
    ({"cell": {"kind": "attack", "dataset": "digits", "model": "lenet5", "label": "none", "attack_label": "x"},
      "result": {}}, "missing or not a string: param"),
    ({"cell": {"kind": "profile", "model": "lenet5", "protector": "none", "mode": "default", "target": 3},
      "result": {}}, "missing or not a string: target"),
    ({"cell": GOOD_CELL, "result": [0.9]}, "'result' must be an object, got list"),
    ({"cell": {k: v for k, v in GOOD_CELL.items() if k != "kind"}, "result": {}},
     "cell.kind: missing; allowed: effectiveness, attack, profile"),
    ({"cell": {**GOOD_CELL, "kind": "effectivness"}, "result": {}}, "cell.kind: 'effectivness'"),
    ({"cell": {**GOOD_CELL, "kind": "attack", "attack_label": "g", "param": "N=3"}, "result": {"extra": [1]}},
     "result.extra must be an object"),
    ({"cell": {**GOOD_CELL, "kind": "attack", "attack_label": "g", "param": "N=3"},
      "result": {"extra": {"test_accs": ["a"]}}}, "result.extra.test_accs must be a list of numbers"),
])
def test_report_on_bad_record_names_the_file(tmp_path, capsys, record, message):
    records = tmp_path / "records"
    records.mkdir()
    (records / "good.json").write_text(json.dumps({"cell": GOOD_CELL, "result": {"clean_acc": 0.9}}))
    (records / "bad.json").write_text(json.dumps(record))
    assert main(["report", str(tmp_path)]) == 2
    assert_one_line(capsys.readouterr().err, f"{records / 'bad.json'}: malformed record (", message)
    assert not (tmp_path / "REPORT.md").exists() and not (tmp_path / "tables").exists()
    with pytest.raises(BenchError):
        report.write(tmp_path)


# -- 10: the data digest -----------------------------------------------------------------------------------------
def test_digest_follows_the_data(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw")
    a, b = data.load("mnist", root=str(tmp_path)), data.load("mnist", root=str(tmp_path))
    assert a.digest == b.digest and len(a.digest) == 16 and int(a.digest, 16) >= 0
    c = data.Splits(a.info, a.train_x.clone(), a.train_y, a.test_x, a.test_y)
    c.train_x[3, 0, 5, 7] += 1e-3  # one pixel
    assert c.digest != a.digest
    d = data.Splits(a.info, a.train_x, a.train_y.flip(0), a.test_x, a.test_y)  # the labels alone
    assert d.digest != a.digest
    assert data.load("mnist", root=str(tmp_path), train_subset=10).digest != a.digest
    assert data.Splits(a.info, a.train_x, a.train_y, a.test_x, a.test_y).digest == a.digest

