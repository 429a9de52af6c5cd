import json
import subprocess
import sys

import pytest

from bench import config
from bench.cli import main
from protectors.core.errors import ConfigError

TINY = """
name = "tiny"
datasets = ["digits"]
seeds = [0]
[train]
epochs = 2
[[protectors]]
name = "none"
[[protectors]]
name = "edgepro"
sweep = {gamma = [0.1, 0.3]}
"""


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,match", [
    ('datasets = ["digits"]\nseed = [0]', r"c.toml: unknown key 'seed'; did you mean 'seeds'\?"),
    ('datasets = ["digit"]', r"c.toml: datasets\[0\]: unknown dataset 'digit'; did you mean 'digits'\?"),
    ('datasets = ["digits"]\n[train]\nepochs = "ten"', r"c.toml: train: parameter 'epochs' must be int"),
    ('datasets = ["digits"]\n[train]\nepoch = 3', r"c.toml: train: unknown parameter 'epoch'; did you mean 'epochs'"),
    ('datasets = ["digits"]\n[[protectors]]\nname = "edgepro"\ngamma = 2.0',
     r"c.toml: protectors\[0\] \(edgepro\): parameter 'gamma' must be in \(0, 1\]"),
    ('datasets = ["digits"]\n[[protectors]]\nname = "aes2"', r"protectors\[0\].name: unknown protector 'aes2'"),
    ('datasets = [', r"c.toml: not valid TOML"),
    ('datasets = ["digits"]\n[train]\nsweep = {wd = [0.0]}', r"c.toml: train.sweep: unknown parameter 'wd'"),
    ('datasets = ["digits"]\n[train]\nsweep = {epochs = []}', r"c.toml: train.sweep: must map training options"),
    ('datasets = ["digits"]\n[train]\nsweep = {epochs = [0]}', r"c.toml: train.sweep: 'epochs' .* must be >= 1"),
])
def test_config_errors_name_file_and_field(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        config.load(str(write(tmp_path, text)))


def test_sweep_expands_with_labels(tmp_path):
    cfg = config.load(str(write(tmp_path, TINY)))
    assert [p.label for p in cfg.protectors] == ["none", "edgepro[gamma=0.1]", "edgepro[gamma=0.3]"]
    assert cfg.protectors[2].params == {"gamma": 0.3}


def test_train_sweep_expands_training_regimes(tmp_path):
    cfg = config.load(str(write(tmp_path, TINY.replace("epochs = 2", "epochs = 2\nweight_decay = 0.01\n"
                                                       "sweep = {weight_decay = [0.0, 5e-4], epochs = [3, 5]}"))))
    assert [(e.regime, e.train.weight_decay, e.train.epochs) for e in cfg.experiments] == [
        ("weight_decay=0.0,epochs=3", 0.0, 3), ("weight_decay=0.0,epochs=5", 0.0, 5),
        ("weight_decay=0.0005,epochs=3", 5e-4, 3), ("weight_decay=0.0005,epochs=5", 5e-4, 5)]
    assert {e.dataset for e in cfg.experiments} == {"digits"}
    # Without a sweep there is one regime and no label, so other configs' cells keep their hashes.
    assert [e.regime for e in config.load(str(write(tmp_path, TINY))).experiments] == [""]


def test_shipped_configs_validate():
    for name in ("quick", "fashion", "paper", "overhead", "sweep", "regime"):
        assert config.load(name).name == name


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    bad = write(tmp_path, "seed = 1\n")
    r = subprocess.run([sys.executable, "-m", "bench", "run", "--config", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unknown key 'seed'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    r = subprocess.run([sys.executable, "-m", "bench", "run", "--config", "quik"], capture_output=True, text=True)
    assert r.returncode == 2 and "did you mean 'quick'" in r.stderr


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    listed = dict(line.split(": ", 1) for line in out.splitlines())
    # Installed third-party plugins (entry points) are listed too, so check for the built-ins only.
    assert {"aes", "edgepro", "none"} <= set(listed["protectors"].split(", ")) and "digits" in listed["datasets"]


def test_run_writes_records_tables_and_resumes(tmp_path, capsys):
    cfg = write(tmp_path, TINY)
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == 3
    rec = json.loads(records[0].read_text())
    assert {"git_commit", "packages", "seed", "threads", "cpu"} <= set(rec["provenance"])
    table = (out / "tables" / "effectiveness.csv").read_text().splitlines()
    assert table[0].startswith("dataset,model,protector,clean_acc,auth_acc,acc_loss,stolen_acc,secret_bytes,"
                               "artifact_bytes,keyspace_bits")
    assert (out / "tables" / "effectiveness.md").exists() and (out / "REPORT.md").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in records}
    capsys.readouterr()
    assert main(["run", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert "0 of 3 cells ran" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in records} == mtimes
    # The report is rebuilt from records alone.
    (out / "tables" / "effectiveness.csv").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "tables" / "effectiveness.csv").exists()


def test_run_selects_protectors_and_attacks_from_the_config(capsys):
    from bench import config

    cfg = config.select(config.load("quick"), "edgepro,aes", "finetune")
    assert [p.label for p in cfg.protectors] == ["aes", "edgepro"]
    assert [a.name for a in cfg.attacks] == ["finetune"]
    assert main(["run", "--config", "quick", "--attacks", "prune"]) == 2
    assert "--attacks: 'prune' is not in config 'quick'" in capsys.readouterr().err


def test_list_reports_a_plugin_that_fails_to_load(monkeypatch, capsys):
    from protectors import protectors

    monkeypatch.setitem(protectors._items, "broken-demo", "no_such_module_xyz:Thing")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "failed to load protector broken-demo: protector 'broken-demo': cannot load" in out
    assert "broken-demo" not in out.splitlines()[2]


def test_compare_cli_exit_codes(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
