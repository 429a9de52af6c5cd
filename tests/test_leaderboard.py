"""The leaderboard: one security score per protector, its data to break (bench/tables.py), and its plot."""

import json

import numpy as np
import pytest

from bench import report, tables


def eff(protector, seed, auth=0.95, stolen=0.1, kind="neuron-mask"):
    return {"schema": 2, "secret_kind": "none" if protector == "none" else kind, "provenance": {},
            "cell": {"kind": "effectiveness", "dataset": "digits", "model": "lenet5", "label": protector, "seed": seed},
            "result": {"clean_acc": auth, "auth_acc": auth, "acc_loss": 0.0, "stolen_acc": stolen, "chance": 0.1,
                       "secret_bytes": 1, "artifact_bytes": 1, "keyspace_bits": 1.0}}


def att(protector, attack, param, seed, frac, stolen, scratch, val="absent", attack_seed=0):
    """An attack record; ``val="absent"``: a record written before ``val_acc`` existed (no ``fraction`` either)."""
    result = {"applicable": True, "stolen_acc_after": stolen, "auth_acc_after": None, "scratch_acc": scratch,
              "gain": stolen - scratch, "budget": [frac, 0], "note": "", "declaration": None}
    if val != "absent":
        result.update(val_acc=val, fraction=frac)
    return {"schema": 2, "secret_kind": "neuron-mask", "provenance": {},
            "cell": {"kind": "attack", "dataset": "digits", "model": "lenet5", "label": protector,
                     "attack_label": attack, "param": param, "seed": seed, "attack_seed": attack_seed},
            "result": result}


def board(records):
    lb = tables.leaderboard(records)
    return lb.set_index("protector"), tables.display(lb, tables.LEADERBOARD_SHOWN).set_index(lb["protector"])


def test_the_strongest_attack_is_chosen_on_validation_not_on_the_test_set():
    """At 1%, attack "a" validates best but scores 0.5 on the test set; "b" validates worse and scores 0.95. The
    thief picks "a": the protector holds at 1% and falls at 10%."""
    recs = [eff("p", s) for s in range(3)]
    for s in range(3):
        recs += [att("p", "a", "f=0.01", s, 0.01, 0.5, 0.3, val=0.9), att("p", "b", "f=0.01", s, 0.01, 0.95, 0.3,
                                                                         val=0.8),
                 att("p", "a", "f=0.1", s, 0.1, 0.94, 0.6, val=0.95)]
    lb, shown = board(recs)
    assert lb.loc["p", "data_to_break"] == 0.1 and lb.loc["p", "strongest_attack"] == "a f=0.1"
    assert lb.loc["p", "selected_on"] == "validation" and shown.loc["p", "data_to_break"] == "0.1"
    strong, _ = tables.strongest(recs)
    at1 = strong[strong["fraction"] == 0.01].iloc[0]
    assert at1["strongest_attack"] == "a f=0.01" and not at1["broken"]


def test_old_records_are_selected_on_the_test_set_and_say_so():
    recs = [eff("p", s) for s in range(3)]
    for s in range(3):
        recs += [att("p", "a", "f=0.01", s, 0.01, 0.5, 0.3), att("p", "b", "f=0.01", s, 0.01, 0.95, 0.3)]
    lb, _ = board(recs)
    assert lb.loc["p", "data_to_break"] == 0.01 and lb.loc["p", "strongest_attack"] == "b f=0.01"
    assert lb.loc["p", "selected_on"] == "test (old records)"


def test_holds_up_to_the_largest_fraction_of_the_grid():
    recs = [eff("p", s) for s in range(2)] + [eff("q", s) for s in range(2)]
    for s in range(2):
        recs += [att("p", "ft", "f=0.01", s, 0.01, 0.3, 0.3, val=0.3), att("p", "ft", "f=0.2", s, 0.2, 0.8, 0.8,
                                                                           val=0.8),
                 att("q", "ft", "f=0.01", s, 0.01, 0.3, 0.3, val=0.3)]
    lb, shown = board(recs)
    assert np.isinf(lb.loc["p", "data_to_break"]) and shown.loc["p", "data_to_break"] == "holds up to f = 0.2"
    assert lb.loc["p", "strongest_attack"] == "ft f=0.2" and lb.loc["p", "stolen_acc"] == pytest.approx(0.8)
    assert shown.loc["p", "broken"] == "0/2 [0.00, 0.66]" and shown.loc["p", "per_training"] == "holds"
    # the grid is the run's: q was only attacked at 1%, and holds up to the run's largest fraction all the same
    assert shown.loc["q", "data_to_break"] == "holds up to f = 0.2"


def test_breaking_needs_90_percent_of_authorized_and_5_points_over_scratch():
    recs = [eff(p, 0, auth=0.9) for p in ("close", "under", "over")]
    recs += [att("close", "ft", "f=0.1", 0, 0.1, 0.85, 0.82, val=0.8),   # 94% of authorized, but only +0.03
             att("under", "ft", "f=0.1", 0, 0.1, 0.80, 0.10, val=0.8),   # +0.7, but 89% of authorized
             att("over", "ft", "f=0.1", 0, 0.1, 0.81, 0.76, val=0.8)]    # exactly 90% and +0.05
    lb, _ = board(recs)
    assert np.isinf(lb.loc["close", "data_to_break"]) and np.isinf(lb.loc["under", "data_to_break"])
    assert lb.loc["over", "data_to_break"] == 0.1


def test_data_free_attacks_are_the_smallest_budget():
    recs = [eff("p", s) for s in range(2)]
    for s in range(2):
        recs += [att("p", "reset", "z=4", s, 0.0, 0.93, 0.1, val=None), att("p", "ft", "f=0.01", s, 0.01, 0.94, 0.5,
                                                                            val=0.9)]
    lb, shown = board(recs)
    assert lb.loc["p", "data_to_break"] == 0 and shown.loc["p", "data_to_break"] == "0 (no data)"
    assert lb.loc["p", "strongest_attack"] == "reset z=4"
    assert lb.loc["p", "selected_on"] == "test (no thief validation)"  # no data, nothing to validate on


def test_the_copied_artifact_counts_as_an_attack_with_no_data():
    recs = [eff("none", s, auth=0.97, stolen=0.97) for s in range(2)]
    recs += [att("none", "ft", "f=0.1", s, 0.1, 0.96, 0.8, val=0.95) for s in range(2)]
    lb, shown = board(recs)
    assert lb.loc["none", "data_to_break"] == 0 and lb.loc["none", "strongest_attack"] == tables.COPIED
    assert lb.loc["none", "note"].startswith("baseline (no secret)")


def test_interval_over_trainings():
    """Training 0 falls at 1%, training 1 at 10%, training 2 at 10% with one attack seed and never with the other:
    the mean falls at 10%, in 3 of the 4 trainings (training seed x attack seed)."""
    recs = [eff("p", s) for s in range(3)]
    table = {(0, 0): (0.94, 0.94), (1, 0): (0.3, 0.95), (2, 0): (0.3, 0.95), (2, 1): (0.3, 0.6)}
    for (s, a), (at1, at10) in table.items():
        recs += [att("p", "ft", "f=0.01", s, 0.01, at1, 0.2, val=at1, attack_seed=a),
                 att("p", "ft", "f=0.1", s, 0.1, at10, 0.5, val=at10, attack_seed=a)]
    lb, shown = board(recs)
    p = lb.loc["p"]
    # means over training seeds (attack seeds averaged first): 1%: 0.513 < 0.855 = 90% of 0.95, 10%: 0.888
    assert p["data_to_break"] == 0.1 and p["stolen_acc"] == pytest.approx((0.94 + 0.95 + (0.95 + 0.6) / 2) / 3)
    assert p["data_to_break_lo"] == 0.01 and np.isinf(p["data_to_break_hi"])
    assert (p["broken_k"], p["broken_n"]) == (3, 4)  # trainings (training seed x attack seed) broken at <= 10%
    assert shown.loc["p", "broken"] == "3/4 [0.30, 0.95]" and shown.loc["p", "per_training"] == "0.01 – holds"


def test_report_writes_the_leaderboard_table_and_plot(tmp_path):
    recs = [eff("none", s, auth=0.97, stolen=0.97, kind="none") for s in range(2)]
    recs += [eff(p, s) for p in ("weak", "strong") for s in range(2)]
    for s in range(2):
        for p, stolen in (("none", 0.97), ("weak", 0.93), ("strong", 0.2)):
            recs += [att(p, "ft", "f=0.01", s, 0.01, stolen, 0.5, val=stolen),
                     att(p, "ft", "f=0.1", s, 0.1, max(stolen, 0.8), 0.8, val=stolen),
                     att(p, "reset", "z=4", s, 0.0, 0.1, 0.1, val=None)]
    (tmp_path / "records").mkdir()
    for i, r in enumerate(recs):
        (tmp_path / "records" / f"{i}.json").write_text(json.dumps(r))
    text = report.write(tmp_path).read_text()
    for ext in ("csv", "md", "tex"):
        assert (tmp_path / "tables" / f"leaderboard.{ext}").exists()
    for ext in ("png", "pdf"):
        assert (tmp_path / "plots" / f"leaderboard.{ext}").stat().st_size > 1000
    csv = (tmp_path / "tables" / "leaderboard.csv").read_text().splitlines()
    assert csv[0].startswith("dataset,model,protector,data_to_break,") and len(csv) == 4
    assert set(tables.LEADERBOARD) <= set(csv[0].split(","))
    md = (tmp_path / "tables" / "leaderboard.md").read_text()
    assert "holds up to f = 0.1" in md and "2/2 [0.34, 1.00]" in md
    assert "## Data to break" in text and "**weak** on digits/lenet5: data to break f = 0.01" in text
    assert "## Table: leaderboard" in text and "plots/leaderboard.png" in text
