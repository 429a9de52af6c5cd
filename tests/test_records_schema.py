"""The record schema (bench/records.py): one type check for every field the report reads, version 1 records still
read, one setting per table row, and the directory errors of ``bench report`` / ``bench compare`` (one line, exit 2).
"""

import json
from pathlib import Path

import pytest

from bench import records as rs
from bench import report
from bench.cli import main
from protectors.core.errors import BenchError

QUICK = Path(__file__).resolve().parents[1] / "results" / "quick" / "records"
#: a record of the former schema (version 1: no ``schema`` field), as the former results/fashion committed it
VERSION_1 = Path(__file__).resolve().parent / "data" / "records_v1"

CELL = {"kind": "effectiveness", "dataset": "digits", "model": "lenet5", "seed": 0, "label": "none",
        "protector": {"name": "none", "params": {}}}
ATTACK_CELL = {"kind": "attack", "dataset": "digits", "model": "lenet5", "seed": 0, "attack_seed": 0,
               "label": "edgepro", "protector": {"name": "edgepro", "params": {}}, "attack_label": "finetune",
               "attack": {"name": "finetune", "params": {"epochs": 10}}, "param": "f=0.1"}
GOOD_EFF = {"clean_acc": 0.9, "auth_acc": 0.9, "acc_loss": 0.0, "stolen_acc": 0.9, "secret_bytes": 0}
GOOD_ATTACK = {"applicable": True, "stolen_acc_after": 0.5, "auth_acc_after": None, "scratch_acc": 0.4, "gain": 0.1,
               "budget": [0.1, 10], "extra": {}, "note": ""}


def rec(cell=CELL, result=None, **top):
    return {"cell": cell, "result": GOOD_EFF if result is None else result, "provenance": {"seed": 0}, **top}


def write(tmp_path, *recs, names=None):
    d = tmp_path / "records"
    d.mkdir(exist_ok=True)
    for i, r in enumerate(recs):
        text = r if isinstance(r, str) else json.dumps(r)
        (d / f"{(names or {}).get(i, f'r{i}')}.json").write_text(text)
    return d


def assert_one_line(err, *fragments):
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


@pytest.mark.parametrize("record,field,what", [
    (rec(result={**GOOD_EFF, "clean_acc": "0.9"}), "result.clean_acc", "a finite number in [0, 1], got '0.9'"),
    (rec(result={**GOOD_EFF, "auth_acc": [0.9]}), "result.auth_acc", "got [0.9]"),
    (rec(result={**GOOD_EFF, "stolen_acc": True}), "result.stolen_acc", "got True"),
    (rec(result={**GOOD_EFF, "stolen_acc": 1.5}), "result.stolen_acc", "got 1.5"),
    (rec(result={**GOOD_EFF, "stolen_acc": None}), "result.stolen_acc", "got None"),
    (rec(result={**GOOD_EFF, "secret_bytes": 1.5}), "result.secret_bytes", "a whole number >= 0"),
    (rec(result={**GOOD_EFF, "auth_acc_by_mode": {"mask": 2}}), "result.auth_acc_by_mode", "[0, 1]"),
    (rec(cell={**CELL, "seed": 1.0}), "cell.seed", "an integer, got 1.0"),
    (rec(cell={**CELL, "seed": False}), "cell.seed", "an integer, got False"),
    (rec(cell=ATTACK_CELL, result={**GOOD_ATTACK, "scratch_acc": "x"}), "result.scratch_acc", "got 'x'"),
    (rec(cell=ATTACK_CELL, result={**GOOD_ATTACK, "auth_acc_after": -0.1}), "result.auth_acc_after",
     "a finite number in [0, 1] or null"),
    (rec(cell=ATTACK_CELL, result={**GOOD_ATTACK, "gain": 2}), "result.gain", "[-1, 1]"),
    (rec(cell={**ATTACK_CELL, "attack_seed": "0"}), "cell.attack_seed", "an integer"),
    (rec(cell=ATTACK_CELL, result={**GOOD_ATTACK, "applicable": "yes"}), "result.applicable", "true or false"),
    ({**rec(), "provenance": {"seed": "0"}}, "provenance.seed", "an integer or null"),
    (rec(schema=3), "schema 3 is newer", "update it"),
    (rec(schema="2"), "schema must be a version number", "'2'"),
    (rec(order={"protector": "first"}), "order must map", "integer positions"),
])
def test_a_wrong_type_names_the_file_and_the_field(tmp_path, capsys, record, field, what):
    write(tmp_path, rec(), record)
    assert main(["report", str(tmp_path)]) == 2
    assert_one_line(capsys.readouterr().err, f"{tmp_path / 'records' / 'r1.json'}: malformed record (", field, what)
    assert not (tmp_path / "REPORT.md").exists()


def test_an_accuracy_of_ten_to_the_400_is_one_line(tmp_path, capsys):
    text = json.dumps(rec()).replace('"stolen_acc": 0.9', '"stolen_acc": 1' + "0" * 400)
    write(tmp_path, text)
    assert main(["report", str(tmp_path)]) == 2
    assert_one_line(capsys.readouterr().err, "r0.json: malformed record (result.stolen_acc must be a finite number")


@pytest.mark.parametrize("text,fragment", [
    (json.dumps(rec(result={**GOOD_EFF, "seconds": 10 ** 400})), "result.seconds"),
    (json.dumps(rec(cell=ATTACK_CELL, result={**GOOD_ATTACK, "extra": {"x": 10 ** 400}})),
     "result.extra.x: number too large"),
    (json.dumps(rec()).replace('"stolen_acc": 0.9', '"stolen_acc": NaN'), "result.stolen_acc"),
    (json.dumps(rec()).replace('"stolen_acc": 0.9', '"stolen_acc": Infinity'), "result.stolen_acc"),
])
def test_numbers_a_float_cannot_hold_are_refused(tmp_path, capsys, text, fragment):
    write(tmp_path, text)
    assert main(["report", str(tmp_path)]) == 2
    assert_one_line(capsys.readouterr().err, "r0.json: malformed record (", fragment)


@pytest.mark.parametrize("depth,why", [(40, "result.extra.deep.a.a"), (100_000, "nested too deeply")])
def test_deeply_nested_json_is_one_line(tmp_path, capsys, depth, why):
    deep = '{"a": ' * depth + "0" + "}" * depth
    text = json.dumps(rec(cell=ATTACK_CELL, result={**GOOD_ATTACK, "extra": {"deep": "X"}})).replace('"X"', deep)
    write(tmp_path, text)
    assert main(["report", str(tmp_path)]) == 2
    assert_one_line(capsys.readouterr().err, "r0.json: malformed record (", why, "nested")


def test_curve_an_attack_declares_holds_accuracies(tmp_path, capsys):
    import attacks

    decl = attacks.get("guess-random", guesses=2).declaration("N=2")
    cell = {**ATTACK_CELL, "attack_label": "guess-random", "param": "N=2",
            "attack": {"name": "guess-random", "params": {"guesses": 2}}}
    write(tmp_path, rec(cell=cell, result={**GOOD_ATTACK, "extra": {"guess_accs": [0.5, 7.0]}, "declaration": decl},
                        schema=2))
    assert main(["report", str(tmp_path)]) == 2
    assert_one_line(capsys.readouterr().err, "result.extra.guess_accs must be a list of finite numbers in [0, 1]")


def test_empty_records_directory_is_one_line_for_report_and_compare(tmp_path, capsys):
    (tmp_path / "run" / "records").mkdir(parents=True)
    assert main(["report", str(tmp_path / "run")]) == 2
    assert_one_line(capsys.readouterr().err, f"{tmp_path / 'run' / 'records'}: no records")
    (tmp_path / "ref").mkdir()
    write(tmp_path / "ref", rec())
    assert main(["compare", str(tmp_path / "ref"), str(tmp_path / "run")]) == 2
    assert_one_line(capsys.readouterr().err, "no records")
    with pytest.raises(BenchError, match="no records"):
        report.write(tmp_path / "run")


def test_a_version_1_record_reads_with_what_the_plugins_declare(tmp_path):
    """A committed record (no ``schema``): its protector's secret kind and its attack's declaration come from the
    registered plugins, so the report needs no names."""
    path = next(p for p in sorted(VERSION_1.glob("*.json"))
                if (lambda c: c["kind"] == "attack" and c["attack_label"] == "prune-channel"
                    and c["label"] == "none")(json.loads(p.read_text())["cell"]))
    raw = json.loads(path.read_text())
    assert "schema" not in raw and "declaration" not in raw["result"]
    d = write(tmp_path, raw.copy())
    (r,) = rs.RecordStore(tmp_path).load_all()
    assert r["secret_kind"] == "none" and rs.baselines([r]) == {"none"}
    plot = r["result"]["declaration"]["plot"]
    ratio = float(r["cell"]["param"].removeprefix("r=").removesuffix("+ft"))
    assert plot["figure"] == "pruning" and plot["style"] == "sweep" and plot["x"] == ratio
    assert json.loads((d / "r0.json").read_text()) == raw  # reading never rewrites a record


def test_a_new_record_carries_schema_cell_order_and_secret_kind(tmp_path):
    store = rs.RecordStore(tmp_path)
    store.order = lambda cell: {"protector": 4}
    path = store.write(ATTACK_CELL, {**GOOD_ATTACK, "declaration": None}, seed=0)
    saved = json.loads(path.read_text())
    assert saved["schema"] == rs.SCHEMA == 2 and saved["cell"] == ATTACK_CELL
    assert saved["order"] == {"protector": 4} and saved["secret_kind"] == "neuron-mask"
    assert path.stem == store.key(ATTACK_CELL)  # the order is not part of the cell: names do not move
    (loaded,) = store.load_all()
    assert loaded["secret_kind"] == "neuron-mask"


# -- one setting per table row -------------------------------------------------------------------------------------
def _setting(epochs, seed=0, aseed=0):
    cell = {**ATTACK_CELL, "seed": seed, "attack_seed": aseed,
            "attack": {"name": "finetune", "params": {"epochs": epochs}}}
    return rec(cell=cell, result=GOOD_ATTACK)


def test_seeds_are_the_only_repeats_of_a_row(tmp_path, capsys):
    write(tmp_path, _setting(10, 0, 0), _setting(10, 0, 1), _setting(10, 1, 0))
    assert len(rs.RecordStore(tmp_path).load_all()) == 3
    write(tmp_path, _setting(10, 0, 0), _setting(10, 0, 1), _setting(5, 1, 0))  # epochs changed, same directory
    assert main(["report", str(tmp_path)]) == 2
    assert_one_line(capsys.readouterr().err, "r0.json and r2.json are two different settings of one table row",
                    "attack digits/lenet5/edgepro/finetune/f=0.1", "differ in attack.params.epochs",
                    f"'python -m bench run --config CONFIG --out {tmp_path}'", f"records/{rs.SUPERSEDED}/")
    (tmp_path / "ref").mkdir()
    write(tmp_path / "ref", _setting(10))
    assert main(["compare", str(tmp_path / "ref"), str(tmp_path)]) == 2
    assert_one_line(capsys.readouterr().err, "two different settings of one table row")


def test_changed_training_is_another_setting(tmp_path):
    a = rec(cell={**CELL, "train": {"epochs": 40}})
    b = rec(cell={**CELL, "seed": 1, "train": {"epochs": 20}})
    write(tmp_path, a, b)
    with pytest.raises(BenchError, match=r"differ in train\.epochs"):
        rs.RecordStore(tmp_path).load_all()


def test_a_profile_setting_added_a_target_is_another_setting(tmp_path):
    cell = {"kind": "profile", "model": "lenet5", "protector": "aes", "mode": "load", "target": "torch-cpu-1t",
            "plugin": {"name": "aes", "params": {}}, "profile": {"targets": ["torch-cpu-1t"]}}
    old = rec(cell=cell, result={"p50_ms": 1.0, "overhead": 1.1, "note": ""})
    new = rec(cell={**cell, "profile": {"targets": ["torch-cpu-1t", "cuda"]}}, result={"p50_ms": 1.0, "note": ""})
    write(tmp_path, old, new)
    with pytest.raises(BenchError, match=r"profile lenet5/aes/load/torch-cpu-1t; they differ in profile\.targets"):
        rs.RecordStore(tmp_path).load_all()
    # what `bench run` does with the new config's cells: the old setting goes to records/superseded/
    store = rs.RecordStore(tmp_path)
    assert store.retire_superseded([new["cell"]]) == 1
    assert (tmp_path / "records" / rs.SUPERSEDED / "r0.json").exists()
    assert len(store.load_all()) == 1


def test_retire_superseded_keeps_other_seeds_and_other_rows(tmp_path):
    recs = [_setting(10, 0), _setting(10, 1), _setting(5, 0),
            rec(cell={**ATTACK_CELL, "label": "retired-setting"}, result=GOOD_ATTACK)]
    write(tmp_path, *recs)
    store = rs.RecordStore(tmp_path)
    current = [_setting(5, 0)["cell"], _setting(5, 1)["cell"]]
    (tmp_path / "records" / f"{store.key(current[0])}.json").write_text(json.dumps(recs[2]))
    (tmp_path / "records" / "r2.json").unlink()
    assert store.retire_superseded(current) == 2  # both seeds of the old epochs: the row keeps one setting
    left = sorted(p.name for p in (tmp_path / "records").glob("*.json"))
    assert left == sorted([f"{store.key(current[0])}.json", "r3.json"])
    assert len(store.load_all()) == 2


RESULTS = Path(__file__).resolve().parents[1] / "results"
COMMITTED = sorted(p.name for p in RESULTS.iterdir() if (p / "records").is_dir())


def test_the_reference_runs_are_committed():
    assert {"quick", "sweep", "regime", "overhead"} <= set(COMMITTED)


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_results_hold_one_setting_per_row(name):
    """Every committed run directory loads: its records pass the schema and no row mixes settings."""
    src = RESULTS / name / "records"
    paths = sorted(src.glob("*.json"))
    recs = [rs.RecordStore(src.parent).load(p) for p in paths]
    rs.RecordStore(src.parent).check_one_setting_per_row(paths, recs)
    assert len(recs) == len(paths) > 0


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_records_come_from_a_clean_commit(name):
    """Every committed record names the commit that made it, and that tree was clean."""
    commits = {json.loads(p.read_text())["provenance"].get("git_commit", "")
               for p in (RESULTS / name / "records").glob("*.json")}
    bad = sorted(c or "(none)" for c in commits if len(c) != 40 or not all(ch in "0123456789abcdef" for ch in c))
    assert not bad, f"results/{name}: records from {bad[:3]}"
