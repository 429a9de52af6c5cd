"""The reproduction check (bench/compare.py) on small run directories built from real records of results/quick."""

import json
from pathlib import Path

import pytest

from bench import compare as cmp
from protectors.core.errors import BenchError

QUICK = Path(__file__).resolve().parents[1] / "results" / "quick" / "records"


def _wanted(rec):
    """A handful of real cells: three seeds each, with and without std, NaN on both sides, latency ratios."""
    c = rec["cell"]
    if c["kind"] == "effectiveness":
        return c["label"] in ("none", "aes")
    if c["kind"] == "attack":
        return ((c["attack_label"], c["param"]) == ("finetune", "f=0.1") and c["label"] in ("none", "aes")
                or (c["label"], c["attack_label"]) == ("none", "guess-random")
                or (c["label"], c["attack_label"], c["param"]) == ("edgepro", "finetune", "f=0.01"))
    return c["target"] == "torch-cpu-1t" and c["protector"] in ("none", "aes", "edgepro")


@pytest.fixture(scope="module")
def real_records():
    recs = {p.name: json.loads(p.read_text()) for p in sorted(QUICK.glob("*.json"))}
    picked = {name: r for name, r in recs.items() if _wanted(r)}
    assert len(picked) == 6 + 12 + 5
    return picked


def _matches(rec, **cell):
    return all(rec["cell"].get(k) == v for k, v in cell.items())


def make_run(root: Path, records: dict, edit=None, drop=None) -> Path:
    """A run directory holding ``records`` (a copy), each passed through ``edit``; ``drop`` ones left out."""
    (root / "records").mkdir(parents=True)
    for name, rec in records.items():
        rec = json.loads(json.dumps(rec))
        if drop and drop(rec):
            continue
        if edit:
            edit(rec)
        (root / "records" / name).write_text(json.dumps(rec, indent=1))
    return root


def shift(field, by, **cell):
    """An edit adding ``by`` to ``result[field]`` of every seed of the matching cell."""
    def edit(rec):
        if _matches(rec, **cell):
            rec["result"][field] += by
    return edit


@pytest.fixture(scope="module")
def ref(real_records, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("ref"), real_records)


def row(result, key, column):
    got = result.rows[(result.rows["key"] == key) & (result.rows["column"] == column)]
    assert len(got) == 1, (key, column)
    return got.iloc[0]


def test_same_directory_is_ok(ref, capsys):
    result = cmp.compare(ref, ref)
    assert result.ok and (result.rows["status"] == "ok").all()
    assert list(result.rows.columns) == ["table", "key", "column", "ref", "new", "diff", "tol", "status"]
    # 2 effectiveness rows x 3, 4 attack rows x 3, 5 overhead ratios
    assert len(result.rows) == 6 + 12 + 5
    assert set(result.rows["table"]) == {"effectiveness", "attacks", "overhead"}
    assert cmp.main(ref, ref) == 0
    out = capsys.readouterr().out
    assert "digits/lenet5/aes/finetune/f=0.1" in out and "lenet5/edgepro/mask/torch-cpu-1t" in out
    assert len([line for line in out.splitlines() if line.endswith(" ok")]) == len(result.rows)
    assert f"{ref} vs {ref}: 23 values within tolerance, 0 drifted, 0 latency flags, 0 missing" in out
    assert out.rstrip().endswith("OK")


def test_tolerance_is_acc_tol_or_twice_the_reference_std(ref):
    result = cmp.compare(ref, ref)
    assert row(result, "digits/lenet5/aes", "stolen_acc")["tol"] == pytest.approx(0.02)  # std 0.005: floor wins
    att = cmp.tables.attacks(cmp.RecordStore(ref).load_all())
    std = float(att[(att["protector"] == "none") & (att["param"] == "f=0.1")]["scratch_acc_std"].iloc[0])
    scratch = row(result, "digits/lenet5/none/finetune/f=0.1", "scratch_acc")
    assert scratch["tol"] == pytest.approx(max(2 * std, 0.02))


def test_planted_drift_fails(ref, real_records, tmp_path, capsys):
    run = make_run(tmp_path / "run", real_records, edit=shift("stolen_acc", 0.1, kind="effectiveness", label="aes"))
    result = cmp.compare(ref, run)
    assert not result.ok
    bad = row(result, "digits/lenet5/aes", "stolen_acc")
    assert bad["status"] == "DRIFT" and bad["diff"] == pytest.approx(0.1)
    assert (result.rows.drop(bad.name)["status"] == "ok").all()
    assert cmp.main(ref, run) == 1
    out = capsys.readouterr().out
    assert "1 drifted" in out and out.rstrip().endswith("DRIFT")
    summary = result.text().splitlines()
    assert len(summary) == 4 and "DRIFT" in summary[2] and "digits/lenet5/aes" in summary[2]


def test_one_seed_drifting_moves_the_mean_beyond_tolerance(ref, real_records, tmp_path):
    one = next(r["cell"] for r in real_records.values() if _matches(r, kind="effectiveness", label="aes"))

    def edit(rec):
        if rec["cell"] == one:
            rec["result"]["stolen_acc"] += 0.1
    run = make_run(tmp_path / "run", real_records, edit=edit)
    assert row(cmp.compare(ref, run), "digits/lenet5/aes", "stolen_acc")["status"] == "DRIFT"  # mean +0.033


def test_small_change_is_within_tolerance(ref, real_records, tmp_path):
    run = make_run(tmp_path / "run", real_records, edit=shift("stolen_acc", 0.01, kind="effectiveness", label="aes"))
    result = cmp.compare(ref, run)
    assert result.ok and row(result, "digits/lenet5/aes", "stolen_acc")["diff"] == pytest.approx(0.01)
    assert cmp.main(ref, run) == 0


@pytest.mark.parametrize("by, status", [(0.05, "ok"), (0.15, "DRIFT")])
def test_noisy_reference_value_gets_a_wider_tolerance(ref, real_records, tmp_path, by, status):
    run = make_run(tmp_path / "run", real_records,
                   edit=shift("scratch_acc", by, kind="attack", label="none", attack_label="finetune", param="f=0.1"))
    result = cmp.compare(ref, run)
    assert row(result, "digits/lenet5/none/finetune/f=0.1", "scratch_acc")["status"] == status
    assert result.ok == (status == "ok")


def test_latency_change_is_flagged_but_does_not_fail(ref, real_records, tmp_path, capsys):
    def slower(rec):
        if _matches(rec, kind="profile", protector="edgepro", mode="mask"):
            rec["result"]["overhead"] *= 1.2
    run = make_run(tmp_path / "run", real_records, edit=slower)
    result = cmp.compare(ref, run)
    flagged = row(result, "lenet5/edgepro/mask/torch-cpu-1t", "overhead")
    assert flagged["status"] == "flag" and flagged["diff"] == pytest.approx(0.2 * flagged["ref"])
    assert result.ok and cmp.main(ref, run) == 0
    out = capsys.readouterr().out
    assert "1 latency flag," in out and out.rstrip().endswith("OK")
    assert cmp.compare(ref, run, latency_tol=0.25).counts()["flag"] == 0


def test_missing_record_fails(ref, real_records, tmp_path, capsys):
    run = make_run(tmp_path / "run", real_records,
                   drop=lambda r: _matches(r, kind="attack", label="edgepro", attack_label="finetune"))
    result = cmp.compare(ref, run)
    gone = row(result, "digits/lenet5/edgepro/finetune/f=0.01", "(row)")
    assert gone["status"] == "missing" and gone["table"] == "attacks"
    assert not result.ok and result.counts()["missing"] == 1
    assert cmp.main(ref, run) == 1
    out = capsys.readouterr().out
    assert "1 missing" in out and out.rstrip().endswith("DRIFT")


def test_extra_rows_are_listed_without_failing(ref, real_records, tmp_path):
    short = make_run(tmp_path / "short", real_records, drop=lambda r: _matches(r, kind="profile", mode="fold"))
    result = cmp.compare(short, ref)
    assert row(result, "lenet5/edgepro/fold/torch-cpu-1t", "(row)")["status"] == "extra"
    assert result.ok and "1 extra" in result.text()


def test_value_the_run_no_longer_produces_is_missing(ref, real_records, tmp_path):
    def lost(rec):
        if _matches(rec, kind="attack", label="aes", attack_label="finetune"):
            del rec["result"]["stolen_acc_after"]  # (null is no accuracy: the record schema refuses it)
    run = make_run(tmp_path / "run", real_records, edit=lost)
    result = cmp.compare(ref, run)
    assert row(result, "digits/lenet5/aes/finetune/f=0.1", "stolen_acc_after")["status"] == "missing"
    assert not result.ok


def test_nan_on_both_sides_is_ok(ref):
    result = cmp.compare(ref, ref)
    na = row(result, "digits/lenet5/none/guess-random/N=100", "stolen_acc_after")
    assert na["status"] == "ok" and na["ref"] != na["ref"] and na["new"] != na["new"]


def test_text_max_rows(ref, real_records, tmp_path):
    run = make_run(tmp_path / "run", real_records, edit=shift("clean_acc", -0.2, kind="effectiveness"))
    result = cmp.compare(ref, run)
    assert result.counts()["DRIFT"] == 2
    short = result.text(max_rows=1)
    assert "... and 1 more" in short and short.endswith("DRIFT")
    assert "more" not in result.text()


def test_bad_input_names_the_directory(ref, tmp_path):
    with pytest.raises(BenchError, match="not a directory") as e:
        cmp.compare(ref, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(BenchError, match=r"plain: not a run directory"):
        cmp.compare(tmp_path / "plain", ref)
    (tmp_path / "empty" / "records").mkdir(parents=True)
    with pytest.raises(BenchError, match=r"empty: no records"):
        cmp.main(ref, tmp_path / "empty")


def test_markdown_section(ref, real_records, tmp_path):
    md = cmp.compare(ref, ref).markdown()
    assert md.startswith("## Comparison with the reference\n")
    assert "23 values within tolerance" in md and "Every value is within tolerance" in md and "Tolerance:" in md
    run = make_run(tmp_path / "run", real_records, edit=shift("stolen_acc", 0.1, kind="effectiveness", label="aes"))
    md = cmp.compare(ref, run).markdown()
    assert "| effectiveness | digits/lenet5/aes | stolen_acc" in md and "**DRIFT**" in md
    assert "Every value" not in md


def test_append_to_report_replaces_its_own_section(ref, real_records, tmp_path):
    run = make_run(tmp_path / "run", real_records)
    report = run / "REPORT.md"
    report.write_text("# Report: run\n\nintro\n\n## Table: effectiveness\n\n| a |\n|---|\n| 1 |\n")
    assert cmp.append_to_report(run, ref).ok
    first = report.read_text()
    assert first.startswith("# Report: run\n\nintro\n\n## Table: effectiveness\n")
    assert first.count("## Comparison with the reference") == 1 and "Every value is within tolerance" in first
    assert cmp.append_to_report(run, ref).ok
    assert report.read_text() == first  # idempotent
    # the section in the middle of the file is replaced in place; what follows it stays
    report.write_text(first + "\n## Later section\n\nkept\n")
    rec = next(p for p in (run / "records").iterdir() if _matches(json.loads(p.read_text()), kind="effectiveness"))
    data = json.loads(rec.read_text())
    data["result"]["clean_acc"] -= 0.3
    rec.write_text(json.dumps(data))
    assert not cmp.append_to_report(run, ref).ok
    text = report.read_text()
    assert text.count("## Comparison with the reference") == 1 and "**DRIFT**" in text
    assert "Every value is within tolerance" not in text and text.endswith("## Later section\n\nkept\n")
    assert text.startswith("# Report: run\n\nintro\n\n## Table: effectiveness\n")


def test_append_to_report_creates_a_missing_report(ref, real_records, tmp_path):
    run = make_run(tmp_path / "run", real_records)
    cmp.append_to_report(run, ref)
    assert (run / "REPORT.md").read_text().startswith("## Comparison with the reference\n")
