import json

import numpy as np
import pytest

from bench import report, tables
from protectors.core.errors import BenchError


def rec(cell, result):
    return {"cell": cell, "result": result, "provenance": {}}


def eff(protector, seed, clean, auth, stolen):
    kind = "none" if protector == "none" else "neuron-mask"  # what the protector declares (the baseline: none)
    return rec({"kind": "effectiveness", "dataset": "digits", "model": "lenet5", "seed": seed, "label": protector},
               {"clean_acc": clean, "auth_acc": auth, "acc_loss": clean - auth, "stolen_acc": stolen,
                "secret_bytes": 10, "artifact_bytes": 100, "keyspace_bits": 8.0,
                "declaration": {"secret_kind": kind, "modes": ["default"]}})


def att(protector, attack, param, seed, stolen, scratch, auth=None, **extra):
    # a record of schema 1 (no declaration): the report asks the registered attack named in the cell for its plot
    return rec({"kind": "attack", "dataset": "digits", "model": "lenet5", "seed": seed, "label": protector,
                "attack_label": attack, "param": param, "attack": {"name": attack, "params": {}}},
               {"applicable": True, "stolen_acc_after": stolen, "auth_acc_after": auth, "scratch_acc": scratch,
                "gain": stolen - scratch, "extra": extra, "note": ""})


RECORDS = [eff("none", 0, 0.9, 0.9, 0.9), eff("edgepro", 0, 0.9, 0.88, 0.1), eff("edgepro", 1, 0.92, 0.9, 0.12),
           att("edgepro", "finetune", "f=0.1", 0, 0.85, 0.5, 0.8), att("edgepro", "finetune", "f=0.1", 1, 0.87, 0.5),
           att("edgepro", "guess-random", "N=3", 0, 0.3, 0.2, guess_accs=[0.1, 0.3, 0.2]),
           att("edgepro", "prune-channel", "r=0.5", 0, 0.2, 0.1),
           att("edgepro", "prune-channel", "r=0.5+ft", 0, 0.4, 0.3),
           rec({"kind": "attack", "dataset": "digits", "model": "lenet5", "seed": 0, "label": "aes",
                "attack_label": "guess-random", "param": "N=3", "attack": {"name": "guess-random", "params": {}}},
               {"applicable": False, "note": "n/a: infeasible"})]


def test_effectiveness_mean_std_and_order():
    df = tables.effectiveness(RECORDS)
    # no record says where its config put it: the baseline (declared secret kind "none") first, then natural order
    assert list(df["protector"]) == ["none", "edgepro"]
    e = df[df["protector"] == "edgepro"].iloc[0]
    assert e["clean_acc"] == pytest.approx(0.91) and e["n"] == 2 and e["acc_loss_std"] == pytest.approx(0.0)
    shown = tables.display(df, tables.EFFECTIVENESS)
    assert shown.loc[1, "clean_acc"] == "0.910 ± 0.014" and shown.loc[1, "secret_bytes"] == "10"


def test_attacks_table_keeps_notes_and_gain():
    df = tables.attacks(RECORDS)
    ft = df[df["attack"] == "finetune"].iloc[0]
    assert ft["gain"] == pytest.approx(0.36) and ft["n"] == 2
    na = df[df["protector"] == "aes"].iloc[0]
    assert "infeasible" in na["note"]


def test_report_writes_tables_plots_and_summary(tmp_path):
    (tmp_path / "records").mkdir()
    for i, r in enumerate(RECORDS):
        (tmp_path / "records" / f"{i}.json").write_text(json.dumps(r))
    path = report.write(tmp_path)
    text = path.read_text()
    assert "## Summary" in text and "scored on the test set: finetune f=0.1) reaches 0.860" in text
    for name in ("security_vs_cost", "finetune", "pruning", "guessing"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
        assert (tmp_path / "plots" / f"{name}.pdf").exists()
        assert f"plots/{name}.png" in text
    for ext in ("csv", "md", "tex"):
        assert (tmp_path / "tables" / f"attacks.{ext}").exists()


def test_report_on_malformed_record_names_the_file(tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "bad.json").write_text("{")
    with pytest.raises(BenchError, match=r"bad.json: malformed record"):
        report.write(tmp_path)
    with pytest.raises(BenchError, match="no records directory"):
        report.write(tmp_path / "nothing")


def test_attacks_declare_the_guessing_table_and_its_counts(tmp_path):
    """The guessing table holds the rows of the attacks that declare it (not rows picked by a field's name), and
    the counts they declare (derived by the attack from its own guesses) show as whole numbers."""
    recs = [r for r in RECORDS if (r["cell"]["label"], r["cell"].get("attack_label")) != ("edgepro", "guess-random")]
    recs += [att("edgepro", "guess-random", "N=3", 0, 0.3, 0.2, guess_accs=[0.1, 0.3, 0.2], n_pass50=1),
             att("edgepro", "guess-random", "N=3", 1, 0.5, 0.2, guess_accs=[0.5, 0.4, 0.2], n_pass50=2)]
    (tmp_path / "records").mkdir()
    for i, r in enumerate(recs):
        (tmp_path / "records" / f"{i}.json").write_text(json.dumps(r))
    text = report.write(tmp_path).read_text()
    guessing = (tmp_path / "tables" / "guessing.csv").read_text().splitlines()
    assert len(guessing) == 2 and guessing[1].startswith("digits,lenet5,edgepro,guess-random,N=3,")
    (df, cols, whole), = tables.declared_tables(recs, tables.attacks(recs)).values()
    assert whole == {"n_pass50", "n_pass80"} and cols[-5:] == ["best_guess_acc", "median_guess_acc", "n_pass50",
                                                                 "n_pass80", "overlap_mean"]
    assert tables.display(df, cols, whole).loc[0, "n_pass50"] == "2"  # the mean over seeds, 1.5, shown as a count
    assert "Provenance: none of the 10 records comes from a dirty tree; 10 name no commit." in text


def test_attacks_table_counts_the_trainings_an_attack_unlocked(tmp_path):
    """Unlocked: the stolen copy reaches 90% of that training's authorized accuracy (from the effectiveness record of
    its protector and training seed); k of n trainings with the Wilson 95% interval, beside the mean."""
    df = tables.attacks(RECORDS)
    assert list(df.columns[:9]) == tables.ATTACKS  # the contract's columns first, unchanged
    ft = df[df["attack"] == "finetune"].iloc[0]  # 0.85 >= 0.9 x 0.88 and 0.87 >= 0.9 x 0.90
    assert (ft["unlocked_k"], ft["unlocked_n"]) == (2, 2)
    assert (ft["unlocked_lo"], ft["unlocked_hi"]) == pytest.approx((0.342, 1.0), abs=1e-3)
    pruned = df[df["param"] == "r=0.5"].iloc[0]
    assert (pruned["unlocked_k"], pruned["unlocked_n"]) == (0, 1)
    na = df[df["protector"] == "aes"].iloc[0]
    assert np.isnan(na["unlocked_n"])  # did not apply: nothing counted
    shown = tables.display(df, tables.ATTACKS_SHOWN)
    assert list(shown.columns[5:7]) == ["stolen_acc_after", "unlocked"]
    assert shown.loc[ft.name, "unlocked"] == "2/2 [0.34, 1.00]" and shown.loc[na.name, "unlocked"] == "—"
    (tmp_path / "records").mkdir()
    for i, r in enumerate(RECORDS):
        (tmp_path / "records" / f"{i}.json").write_text(json.dumps(r))
    report.write(tmp_path)
    md = (tmp_path / "tables" / "attacks.md").read_text()
    assert "| stolen_acc_after   | unlocked " in md and "2/2 [0.34, 1.00]" in md
    header = (tmp_path / "tables" / "attacks.csv").read_text().splitlines()[0].split(",")
    assert header[:9] == tables.ATTACKS and {"unlocked_k", "unlocked_n", "unlocked_lo", "unlocked_hi"} <= set(header)


def test_unlocked_needs_the_training_authorized_accuracy():
    """An attack record whose training has no effectiveness record counts nowhere (no authorized accuracy)."""
    df = tables.attacks([r for r in RECORDS if r["cell"]["kind"] == "attack"])
    assert df["unlocked_n"].isna().all()


def test_thief_measurements_of_newer_records_are_columns():
    recs = [att("edgepro", "finetune", "f=0.1", s, 0.85, 0.5) for s in range(2)]
    for s, r in enumerate(recs):
        r["result"].update(val_acc=0.8 + s / 10, fraction=0.1, queries=100)
    df = tables.attacks(recs)
    assert df.loc[0, "val_acc"] == pytest.approx(0.85) and df.loc[0, "fraction"] == 0.1 and df.loc[0, "queries"] == 100
