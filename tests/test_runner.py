import json

import pytest
from conftest import assert_safe_files

from bench import config
from bench.runner import Runner

pytestmark = pytest.mark.slow  # trains (seconds each)

CFG = """
name = "t"
datasets = ["digits"]
seeds = [0]
[train]
epochs = 3
[[protectors]]
name = "aes"
[[protectors]]
name = "edgepro"
[[attacks]]
name = "finetune"
fractions = [0.05, 0.1]
[[attacks]]
name = "guess-random"
guesses = 3
[thief]
max_epochs = 3
patience = 2
"""


@pytest.fixture()
def cfg(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text(CFG)
    return config.load(str(p))


def results(out):
    return [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]


def test_finetuning_aes_stolen_copy_equals_scratch(cfg, tmp_path):
    out = tmp_path / "run"
    runner = Runner(cfg, out, cache_dir=tmp_path / "cache", progress=False, profile=False)
    runner.run()
    # Nothing the run wrote is a pickle: records, tables, plots, the cache's models and artifacts (decrypted too).
    written = {**assert_safe_files(out), **assert_safe_files(tmp_path / "cache", runner.key)}
    assert {"json", "safetensors", "aes-gcm/safetensors", "aes-gcm/json"} <= set(written.values()), written
    recs = [r for r in results(out) if r["cell"]["kind"] == "attack" and r["cell"]["label"] == "aes"]
    ft = [r["result"] for r in recs if r["cell"]["attack"]["name"] == "finetune"]
    assert len(ft) == 2
    for r in ft:
        assert r["stolen_acc_after"] == r["scratch_acc"] and r["gain"] == 0.0
        assert r["auth_acc_after"] is None
    guess = next(r["result"] for r in recs if r["cell"]["attack"]["name"] == "guess-random")
    assert not guess["applicable"] and "needs a secret of kind neuron-mask" in guess["note"]
    table = (out / "tables" / "attacks.csv").read_text().splitlines()[0]
    assert table.startswith("dataset,model,protector,attack,param,stolen_acc_after,auth_acc_after,scratch_acc,gain")


def test_killed_run_resumes_without_redoing_finished_cells(cfg, tmp_path, monkeypatch):
    out, cache = tmp_path / "run", tmp_path / "cache"
    calls = []
    real = Runner.attack

    def dying(self, *a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(a)
        return real(self, *a, **k)

    monkeypatch.setattr(Runner, "attack", dying)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg, out, cache_dir=cache, progress=False, profile=False).run()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")}
    assert 0 < len(done) < 8
    monkeypatch.setattr(Runner, "attack", real)
    summary = Runner(cfg, out, cache_dir=cache, progress=False, profile=False).run()
    assert summary["ran"] == summary["cells"] - len(done) == 8 - len(done)
    for name, mtime in done.items():
        assert (out / "records" / name).stat().st_mtime_ns == mtime
    assert not list((out / "records").glob(".*.tmp"))  # no half-written record


def test_an_attack_asking_for_less_still_faces_the_full_recipe_scratch(tmp_path):
    """A fine-tuning attack with one lr and fewer epochs of its own is compared with the same fair scratch as the
    recipe's fine-tuning: scratch is always the thief's full recipe on the same data."""
    p = tmp_path / "lr.toml"
    p.write_text(CFG.replace('name = "guess-random"\nguesses = 3', 'name = "finetune"\nlabel = "ft-lr"\n'
                                                                   'fractions = [0.05]\nepochs = 1\nlr = 0.01'))
    out = tmp_path / "run"
    Runner(config.load(str(p)), out, cache_dir=tmp_path / "cache", progress=False, profile=False).run()
    recs = {r["cell"]["attack_label"]: r["result"] for r in results(out) if r["cell"]["kind"] == "attack"
            and r["cell"]["label"] == "aes" and r["cell"]["param"] == "f=0.05"}
    assert set(recs) == {"finetune", "ft-lr"}
    assert recs["finetune"]["scratch_acc"] == recs["ft-lr"]["scratch_acc"]
    # AES's stolen copy is the thief's own random init: the recipe's fine-tuning of it *is* scratch training.
    assert recs["finetune"]["stolen_acc_after"] == recs["finetune"]["scratch_acc"]
    assert recs["ft-lr"]["extra"]["lr"] == 0.01 and recs["ft-lr"]["budget"][1] <= 1


def test_training_regimes_are_rows_of_their_own(tmp_path):
    """A [train] sweep trains one model per regime and labels the model column, so regimes never average together."""
    from bench import tables

    p = tmp_path / "regime.toml"
    p.write_text('name = "r"\ndatasets = ["digits"]\nseeds = [0]\n[train]\nepochs = 1\n'
                 'sweep = {weight_decay = [0.0, 0.05]}\n[[protectors]]\nname = "none"\n')
    out = tmp_path / "run"
    Runner(config.load(str(p)), out, cache_dir=tmp_path / "cache", progress=False, profile=False).run()
    recs = results(out)
    assert sorted(r["cell"]["regime"] for r in recs) == ["weight_decay=0.0", "weight_decay=0.05"]
    eff = tables.effectiveness(recs)
    assert list(eff["model"]) == ["lenet5[weight_decay=0.0]", "lenet5[weight_decay=0.05]"]
    assert list(eff["n"]) == [1, 1]
    assert eff["clean_acc"].iloc[0] != eff["clean_acc"].iloc[1]  # two trainings, not one cached model


def test_records_of_older_plugin_code_are_recomputed_and_counted_once(cfg, tmp_path):
    """Editing a plugin changes its code digest: a resumed run recomputes its cells and moves the old records to
    records/superseded/, so the tables count every cell once; records of cells outside the config stay."""
    from protectors.core.hashing import config_hash

    out, cache = tmp_path / "run", tmp_path / "cache"
    Runner(cfg, out, cache_dir=cache, progress=False, profile=False).run()
    recs = {p: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    path, old = next((p, r) for p, r in recs.items()
                     if r["cell"]["kind"] == "attack" and r["cell"]["label"] == "edgepro"
                     and r["cell"]["attack_label"] == "finetune")
    path.unlink()  # as if the record had been made by an older edgepro:
    old["cell"]["protector"]["plugin"]["code"] = "0" * 16
    old["result"]["stolen_acc_after"] = 0.5
    stale = out / "records" / f"{config_hash(old['cell'])}.json"
    stale.write_text(json.dumps(old))
    other = json.loads(json.dumps(old))
    other["cell"]["label"] = other["cell"]["protector"]["name"] = "retired-setting"
    kept = out / "records" / f"{config_hash(other['cell'])}.json"
    kept.write_text(json.dumps(other))
    summary = Runner(cfg, out, cache_dir=cache, progress=False, profile=False).run()
    assert summary["ran"] == 1 and summary["superseded"] == 1
    assert not stale.exists() and (out / "records" / "superseded" / stale.name).exists()
    assert path.exists() and kept.exists()
    rows = [line for line in (out / "tables" / "attacks.csv").read_text().splitlines()
            if line.startswith("digits,lenet5,edgepro,finetune,")]
    assert len(rows) == 2 and all(line.split(",")[5] != "0.5" for line in rows)
