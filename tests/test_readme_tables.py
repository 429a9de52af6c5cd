"""``python -m bench readme [--check] README.md``: the README's results tables generated from the records."""

import json

import pytest

from bench import readme, report, tables
from bench.cli import main
from bench.records import RecordStore
from protectors.core.errors import BenchError


def _records():
    out = []
    for protector, stolen in (("none", 0.97), ("lock", 0.2)):
        for seed in range(2):
            out.append({"schema": 2, "secret_kind": "none" if protector == "none" else "neuron-mask",
                        "provenance": {},
                        "cell": {"kind": "effectiveness", "dataset": "digits", "model": "lenet5", "label": protector,
                                 "seed": seed},
                        "result": {"clean_acc": 0.97, "auth_acc": 0.97, "acc_loss": 0.0,
                                   "stolen_acc": 0.97 if protector == "none" else 0.1, "chance": 0.1,
                                   "secret_bytes": 1, "artifact_bytes": 1, "keyspace_bits": 1.0}})
            for param, frac, scratch in (("f=0.01", 0.01, 0.5), ("f=0.1", 0.1, 0.8)):
                out.append({"schema": 2, "secret_kind": "neuron-mask", "provenance": {},
                            "cell": {"kind": "attack", "dataset": "digits", "model": "lenet5", "label": protector,
                                     "attack_label": "finetune", "param": param, "seed": seed, "attack_seed": 0},
                            "result": {"applicable": True, "stolen_acc_after": max(stolen, scratch) + seed / 100,
                                       "auth_acc_after": None, "scratch_acc": scratch,
                                       "gain": max(stolen, scratch) + seed / 100 - scratch, "budget": [frac, 0],
                                       "fraction": frac, "val_acc": stolen, "note": "", "declaration": None}})
    return out


README = """# Project

Intro text, kept as it is.

<!-- table: runs/tiny leaderboard columns=protector,data_to_break,broken -->
stale text
<!-- /table -->

Between the tables.

<!-- table: runs/tiny attacks protector=lock -->
<!-- /table -->

The end.
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "runs" / "tiny" / "records").mkdir(parents=True)
    for i, r in enumerate(_records()):
        (tmp_path / "runs" / "tiny" / "records" / f"{i}.json").write_text(json.dumps(r))
    (tmp_path / "README.md").write_text(README)
    return tmp_path


def test_regions_are_rewritten_from_the_records(project, capsys):
    path = project / "README.md"
    assert main(["readme", "--check", str(path)]) == 1
    assert "2 of 2 generated tables differ" in capsys.readouterr().out
    assert path.read_text() == README  # --check writes nothing
    assert main(["readme", str(path)]) == 0
    text = path.read_text()
    assert "stale text" not in text
    assert text.startswith("# Project\n\nIntro text, kept as it is.\n\n<!-- table: runs/tiny leaderboard")
    assert "\n\nBetween the tables.\n\n" in text and text.endswith("<!-- /table -->\n\nThe end.\n")
    # the same Markdown as the report's table (the same functions), narrowed as the markers say
    built = report.frames(RecordStore(project / "runs" / "tiny").load_all())
    lb, _, _ = built["leaderboard"]
    shown = ["protector", "data_to_break", "broken"]
    expected = tables.display(lb, shown)[shown].to_markdown(index=False)
    assert f"columns=protector,data_to_break,broken -->\n\n{expected}\n\n<!-- /table -->" in text
    assert "| none        | 0 (no data)         | 2/2 [0.34, 1.00] |" in text
    assert "| lock        | holds up to f = 0.1 | 0/2 [0.00, 0.66] |" in text
    attacks_md = text.split("<!-- table: runs/tiny attacks protector=lock -->")[1]
    assert "| lock " in attacks_md and "| none " not in attacks_md and "unlocked" in attacks_md
    capsys.readouterr()
    assert main(["readme", "--check", str(path)]) == 0
    assert "2 generated tables match the records" in capsys.readouterr().out
    assert main(["readme", str(path)]) == 0 and path.read_text() == text  # idempotent


def test_check_fails_when_the_records_change(project):
    path = project / "README.md"
    assert main(["readme", str(path)]) == 0
    for rec in (project / "runs" / "tiny" / "records").iterdir():
        data = json.loads(rec.read_text())
        if data["cell"]["label"] == "lock" and data["cell"].get("param") == "f=0.1":
            data["result"]["stolen_acc_after"] = 0.99  # the lock now falls at 10%, in both tables
            rec.write_text(json.dumps(data))
    assert main(["readme", "--check", str(path)]) == 1


def test_the_report_markdown_is_what_the_readme_shows(project):
    """A marker without options shows the table as REPORT.md does."""
    path = project / "README.md"
    path.write_text("<!-- table: runs/tiny effectiveness -->\n<!-- /table -->\n")
    assert readme.main(path) == 0
    report.write(project / "runs" / "tiny")
    section = (project / "runs" / "tiny" / "REPORT.md").read_text().split("## Table: effectiveness\n\n")[1]
    table = path.read_text().split("-->\n\n")[1].split("\n\n<!--")[0]
    assert section.startswith(table + "\n")


@pytest.mark.parametrize("text, message", [
    ("<!-- table: runs/tiny leaderboard -->\nno end\n", "without its closing"),
    ("<!-- table: runs/tiny nosuch -->\n<!-- /table -->\n", "no table 'nosuch'"),
    ("<!-- table: runs/none leaderboard -->\n<!-- /table -->\n", "not a run directory"),
    ("<!-- table: runs/tiny -->\n<!-- /table -->\n", "needs a run directory and a table name"),
    ("<!-- table: runs/tiny leaderboard columns=protector,nosuch -->\n<!-- /table -->\n", "no column 'nosuch'"),
    ("<!-- table: runs/tiny leaderboard bogus=1 -->\n<!-- /table -->\n", "no column 'bogus' to select rows"),
    ("<!-- table: runs/tiny leaderboard columns -->\n<!-- /table -->\n", "NAME=v1,v2"),
    ("<!-- table: runs/tiny attacks pivot=param columns=protector -->\n<!-- /table -->\n", "needs 'value'"),
    ("<!-- table: runs/tiny attacks pivot=nosuch value=gain columns=protector -->\n<!-- /table -->\n",
     "no column 'nosuch' to pivot"),
])
def test_bad_markers_are_one_line_errors(project, capsys, text, message):
    path = project / "README.md"
    path.write_text(text)
    with pytest.raises(BenchError, match=message):
        readme.main(path)
    assert main(["readme", "--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"{path}:1" in err
    assert path.read_text() == text


def test_a_readme_without_markers_is_left_alone(project, capsys):
    path = project / "README.md"
    path.write_text("# Nothing generated here\n")
    assert main(["readme", "--check", str(path)]) == 0 and main(["readme", str(path)]) == 0
    assert path.read_text() == "# Nothing generated here\n"
    assert main(["readme", "--check", str(project / "missing.md")]) == 2


def test_pivot_puts_one_column_per_value(project):
    path = project / "README.md"
    path.write_text("<!-- table: runs/tiny attacks pivot=param value=stolen_acc_after columns=protector -->\n"
                    "<!-- /table -->\n")
    readme.main(path)
    lines = path.read_text().splitlines()
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == ["protector", "f=0.01", "f=0.1"]
    rows = {c[0]: c[1:] for c in ([x.strip() for x in ln.split("|")[1:-1]] for ln in lines[4:6])}
    assert rows["lock"] == ["0.505 ± 0.007", "0.805 ± 0.007"] and rows["none"] == ["0.975 ± 0.007"] * 2


def test_ratio_with_interval_is_shown_as_one_column():
    row = {"overhead": 1.1043, "overhead_ci_low": 1.0961, "overhead_ci_high": 1.1112}
    assert tables.FORMATTED["overhead_x"][1](row) == "×1.104 [1.096, 1.111]"
    assert tables.FORMATTED["overhead_x"][1]({"overhead": float("nan"), "overhead_ci_low": float("nan"),
                                              "overhead_ci_high": float("nan")}) == "n/a"
