import json

import pytest

from bench import report, tables
from protectors.core.errors import BenchError


def rec(cell, result):
    return {"cell": cell, "result": result, "provenance": {}}


def eff(protector, seed, clean, auth, stolen):
    return rec({"kind": "effectiveness", "dataset": "digits", "model": "lenet5", "seed": seed, "label": protector},
               {"clean_acc": clean, "auth_acc": auth, "acc_loss": clean - auth, "stolen_acc": stolen,
                "secret_bytes": 10, "artifact_bytes": 100, "keyspace_bits": 8.0})


def att(protector, attack, param, seed, stolen, scratch, auth=None, **extra):
    return rec({"kind": "attack", "dataset": "digits", "model": "lenet5", "seed": seed, "label": protector,
                "attack_label": attack, "param": param},
               {"applicable": True, "stolen_acc_after": stolen, "auth_acc_after": auth, "scratch_acc": scratch,
                "gain": stolen - scratch, "extra": extra, "note": ""})


RECORDS = [eff("none", 0, 0.9, 0.9, 0.9), eff("edgepro", 0, 0.9, 0.88, 0.1), eff("edgepro", 1, 0.92, 0.9, 0.12),
           att("edgepro", "finetune", "f=0.1", 0, 0.85, 0.5, 0.8), att("edgepro", "finetune", "f=0.1", 1, 0.87, 0.5),
           att("edgepro", "guess-random", "N=3", 0, 0.3, 0.2, test_accs=[0.1, 0.3, 0.2]),
           att("edgepro", "prune-channel", "r=0.5", 0, 0.2, 0.1),
           att("edgepro", "prune-channel", "r=0.5+ft", 0, 0.4, 0.3),
           rec({"kind": "attack", "dataset": "digits", "model": "lenet5", "seed": 0, "label": "aes",
                "attack_label": "guess-random", "param": "N=3"}, {"applicable": False, "note": "n/a: infeasible"})]


def test_effectiveness_mean_std_and_order():
    df = tables.effectiveness(RECORDS)
    assert list(df["protector"]) == ["none", "edgepro"]  # built-ins first, in a fixed order
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
