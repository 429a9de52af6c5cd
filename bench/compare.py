"""The reproduction check: does a new run reproduce a reference run's tables and verdicts?

``python -m bench compare REF RUN`` builds the effectiveness, attacks, quantized and overhead tables and the
leaderboard of both run directories from their records, matches rows by their key columns and compares them:

- every accuracy column is compared through its *per-training values* (one per record: training seed, or training
  seed × attack seed), not through the means alone: Welch's two-sample t-test (:func:`bench.stats.welch`, why Welch
  is said there) gives a p value per value, and Holm's correction (:func:`bench.stats.holm`) adjusts all of them
  together, so that a run reproducing the reference raises a false alarm somewhere in the hundreds of rows at most
  ``alpha`` (5%) of the time. A value *drifts* when its adjusted p is below ``alpha`` **and** its mean moved by more
  than the floor ``acc_tol`` (a difference too small to matter is never drift, however significant);
- a value with fewer than two trainings on either side has nothing to test with: it drifts when it moved by more
  than ``max(2 × ref std over seeds, acc_tol)`` (a reference row from a single run has no std, so the floor
  ``acc_tol`` alone applies);
- the *verdict* of every protector, its data to break (the leaderboard, :func:`bench.tables.leaderboard`), is
  compared too: a changed verdict drifts when the share of trainings broken at the fraction where the two verdicts
  part differs between the runs by Fisher's exact test (in the same Holm family); a verdict that changed within
  the trainings' noise (a protector on the edge, broken in about half of its trainings) is *flagged*: listed, not
  failing (``strict_verdicts=True``: every changed verdict drifts);
- the latency overhead ratio is only *flagged* when it moved by more than ``latency_tol`` relative to the
  reference: latency depends on the machine, so it never fails the check;
- a reference row the run lacks is *missing* and fails the check (the run did not reproduce it); a row only the
  run has is *extra* and is listed without failing;
- a value that is NaN/None on both sides (an attack not applicable to a protector) is ok.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from protectors.core.atomic import atomic_write_text
from protectors.core.errors import BenchError

from . import stats, tables
from .records import RecordStore, row_key

#: per table: how its rows are built, the key columns that match rows, the accuracy columns that must reproduce
SPECS = {
    "effectiveness": (tables.effectiveness, ["dataset", "model", "protector"],
                      ["clean_acc", "auth_acc", "stolen_acc"]),
    "attacks": (tables.attacks, ["dataset", "model", "protector", "attack", "param"],
                ["stolen_acc_after", "auth_acc_after", "scratch_acc"]),
    "overhead": (tables.overhead, ["model", "protector", "mode", "target"], []),
    "quantized": (tables.quantized, ["dataset", "model", "protector"],
                  ["float_auth_acc", "int8_auth_acc", "float_stolen_acc", "int8_stolen_acc"]),
}
#: compared as a ratio and only flagged, never failing
LATENCY_COLUMNS = {"overhead": ["overhead"]}

HEADING = "## Comparison with the reference"
COLUMNS = ["table", "key", "column", "ref", "new", "diff", "tol", "n_ref", "n_new", "p", "p_adj", "status"]
#: the verdict rows: the leaderboard's data to break per protector
VERDICT = ("leaderboard", ["dataset", "model", "protector"], "data_to_break")
#: the kind of record behind each compared table (its per-training values)
KINDS = {"effectiveness": "effectiveness", "attacks": "attack", "quantized": "quantized"}
STATUSES = ("ok", "DRIFT", "flag", "missing", "extra")
#: float noise, so that a difference of exactly the tolerance counts as within it
_EPS = 1e-9


def _nan(v) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _num(v) -> float:
    return float("nan") if _nan(v) else float(v)


@dataclass
class Comparison:
    """The outcome of comparing ``run_dir`` against ``ref_dir``; ``rows`` holds one line per compared value."""

    ref_dir: Path
    run_dir: Path
    acc_tol: float
    latency_tol: float
    rows: pd.DataFrame = field(repr=False)
    alpha: float = 0.05
    strict_verdicts: bool = False

    def counts(self) -> dict[str, int]:
        """How many rows have each status (every status present, zero or not)."""
        found = self.rows["status"].value_counts()
        return {s: int(found.get(s, 0)) for s in STATUSES}

    @property
    def tests(self) -> int:
        """How many p values the correction adjusted together."""
        return int(self.rows["p"].notna().sum())

    @property
    def ok(self) -> bool:
        """No accuracy or verdict drifted and no reference row is missing from the run."""
        c = self.counts()
        return c["DRIFT"] == 0 and c["missing"] == 0

    def problems(self) -> pd.DataFrame:
        """The rows that are not ``ok`` (drifted, flagged, missing, extra), in table order."""
        return self.rows[self.rows["status"] != "ok"].reset_index(drop=True)

    def header(self) -> str:
        c = self.counts()
        verdicts = int(((self.rows["table"] == VERDICT[0]) & (self.rows["status"] == "flag")).sum())
        latency = c["flag"] - verdicts
        flags = f"{latency} latency flag" + ("" if latency == 1 else "s")
        if verdicts:
            flags += f", {verdicts} verdict" + ("" if verdicts == 1 else "s") + " changed within noise"
        s = (f"compare {self.ref_dir} vs {self.run_dir}: {c['ok']} values within tolerance, {c['DRIFT']} drifted, "
             f"{flags}, {c['missing']} missing")
        return s + (f", {c['extra']} extra" if c["extra"] else "")

    def tolerance(self) -> str:
        """A few sentences saying what drift is."""
        verdicts = ("A changed verdict (data to break) drifts." if self.strict_verdicts else
                    "A changed verdict (data to break) drifts when the trainings broken where the two verdicts part "
                    "differ by Fisher's exact test (same correction), else it is flagged: within the trainings' "
                    "noise, it fails nothing.")
        return (f"Drift: an accuracy whose per-training values differ by Welch's t-test, Holm-corrected over all "
                f"{self.tests} tests (adjusted p < {self.alpha:g}), and whose mean moved by more than "
                f"{self.acc_tol:g}; with a single training on either side, one that moved by more than "
                f"max(2 × the reference's std over seeds, {self.acc_tol:g}). {verdicts} "
                f"A latency overhead ratio moving by more than {self.latency_tol:.0%} of the reference is flagged "
                "but never fails the check.")

    def text(self, max_rows: int | None = None) -> str:
        """A compact terminal summary: counts, the rows that are not ok (at most ``max_rows``), then OK/DRIFT."""
        lines = [self.header()]
        bad = self.problems()
        if len(bad):
            shown = bad if max_rows is None else bad.head(max_rows)
            lines.append(_to_string(shown))
            if len(shown) < len(bad):
                lines.append(f"... and {len(bad) - len(shown)} more")
        lines.append("OK" if self.ok else "DRIFT")
        return "\n".join(lines)

    def table(self) -> str:
        """Every compared row, one aligned line each (the strict form)."""
        return _to_string(self.rows) if len(self.rows) else "(nothing to compare)"

    def markdown(self) -> str:
        """A REPORT.md section: the counts, the rows that are not ok (or a sentence that all are), the tolerance."""
        parts = [HEADING, "", f"`python -m bench compare {self.ref_dir} {self.run_dir}`: "
                 + self.header().split(": ", 1)[1] + f" — **{'OK' if self.ok else 'DRIFT'}**.", ""]
        bad = self.problems()
        if len(bad):
            parts += [_formatted(bad).to_markdown(index=False), ""]
        else:
            parts += ["Every value is within tolerance of the reference.", ""]
        parts += [self.tolerance(), ""]
        return "\n".join(parts)


def _fmt(v) -> str:
    if _nan(v):
        return "—"
    return "holds" if math.isinf(v) else f"{v:.4f}"


def _fmt_diff(v) -> str:
    return "—" if _nan(v) else f"{v:+.4f}"


def _fmt_p(v) -> str:
    return "—" if _nan(v) else f"{v:.2g}"


def _fmt_n(v) -> str:
    return "—" if _nan(v) else f"{int(v)}"


def _formatted(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy().astype({c: object for c in ("ref", "new", "diff", "tol", "n_ref", "n_new", "p", "p_adj")})
    for c in ("ref", "new", "tol"):
        out[c] = [_fmt(v) for v in df[c]]
    out["diff"] = [_fmt_diff(v) for v in df["diff"]]
    for c in ("p", "p_adj"):
        out[c] = [_fmt_p(v) for v in df[c]]
    for c in ("n_ref", "n_new"):
        out[c] = [_fmt_n(v) for v in df[c]]
    return out


def _to_string(df: pd.DataFrame) -> str:
    out = _formatted(df)
    for c in ("table", "key", "column", "status"):   # words read best left-aligned, numbers right-aligned
        width = max([len(c)] + [len(str(v)) for v in out[c]])
        out[c] = [str(v).ljust(width) for v in out[c]]
    return "\n".join(line.rstrip() for line in out.to_string(index=False, justify="left").splitlines())


def _load(run_dir: Path, what: str) -> list[dict]:
    if not run_dir.is_dir():
        raise BenchError(f"{what} {run_dir}: not a directory")
    if not (run_dir / "records").is_dir():
        raise BenchError(f"{what} {run_dir}: not a run directory (no records/ folder)")
    records = RecordStore(run_dir).load_all()
    if not records:
        raise BenchError(f"{what} {run_dir}: no records in {run_dir / 'records'}")
    return records


def _indexed(df: pd.DataFrame, keys: list[str]) -> dict[tuple, pd.Series]:
    return {tuple(str(r[k]) for k in keys): r for _, r in df.iterrows()}


def _std(row: pd.Series, col: str) -> float:
    s = row.get(f"{col}_std")
    return 0.0 if _nan(s) else float(s)


def samples(records: list[dict], kind: str, columns: list[str]) -> dict[tuple, dict[str, list[float]]]:
    """Per table row (its key, as strings) and column: the per-training values (one per record: training seed ×
    attack seed), NaN-free."""
    out: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        c, res = r["cell"], r["result"]
        if c.get("kind") != kind:
            continue
        row = out.setdefault(tuple(str(k) for k in row_key(c)[1:]), {col: [] for col in columns})
        for col in columns:
            v = res.get(col)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                row[col].append(float(v))
    return out


def _accuracy(table: str, key: str, col: str, ref: pd.Series, new: pd.Series, acc_tol: float,
              ref_values: list[float], new_values: list[float]) -> dict:
    """One accuracy compared; a row whose p is set gets its status after the correction (:func:`_decide`)."""
    r, n = _num(ref.get(col)), _num(new.get(col))
    counts = dict(n_ref=float(len(ref_values)), n_new=float(len(new_values)))
    p, tol = math.nan, acc_tol
    if math.isnan(r) and math.isnan(n):
        status = "ok"
    elif math.isnan(n):
        status = "missing"   # the reference has the value, the run did not produce it
    elif math.isnan(r):
        status = "extra"
    elif len(ref_values) >= 2 and len(new_values) >= 2:
        p, status = stats.welch(ref_values, new_values), "test"
    else:
        tol = max(2 * _std(ref, col), acc_tol)
        status = "ok" if abs(n - r) <= tol + _EPS else "DRIFT"
    return dict(table=table, key=key, column=col, ref=r, new=n, diff=n - r, tol=tol, **counts, p=p,
                p_adj=math.nan, status=status)


def _latency(table: str, key: str, col: str, ref: pd.Series, new: pd.Series, latency_tol: float) -> dict:
    r, n = _num(ref.get(col)), _num(new.get(col))
    tol = latency_tol * abs(r)
    if math.isnan(r) and math.isnan(n):
        status = "ok"
    elif math.isnan(r) or math.isnan(n):
        status = "flag"
    else:
        status = "ok" if abs(n - r) <= tol + _EPS else "flag"
    return dict(table=table, key=key, column=col, ref=r, new=n, diff=n - r, tol=tol, n_ref=math.nan,
                n_new=math.nan, p=math.nan, p_adj=math.nan, status=status)


def _row(table: str, key: str, status: str) -> dict:
    return dict(table=table, key=key, column="(row)", ref=np.nan, new=np.nan, diff=np.nan, tol=np.nan, n_ref=np.nan,
                n_new=np.nan, p=np.nan, p_adj=np.nan, status=status)


def _verdicts(ref_records: list[dict], run_records: list[dict]) -> list[dict]:
    """One row per protector: its data to break in both runs (``inf``: holds up to the grid's largest fraction),
    with Fisher's exact test of the share of trainings broken at the fraction where the two verdicts part (where
    they agree, at the verdict itself); a changed verdict's status waits for the correction (:func:`_decide`)."""
    table, keys, col = VERDICT
    (ref_lb, _, ref_tr), (new_lb, _, new_tr) = (tables.leaderboard_detail(ref_records),
                                                tables.leaderboard_detail(run_records))
    ref, new = _indexed(ref_lb, keys), _indexed(new_lb, keys)
    out = []
    for k, r in ref.items():
        key = "/".join(k)
        if k not in new:
            out.append(_row(table, key, "missing"))
            continue
        n = new[k]
        a, b = float(r[col]), float(n[col])
        rt = ref_tr.get(tuple(r[c] for c in keys), np.array([]))
        nt = new_tr.get(tuple(n[c] for c in keys), np.array([]))
        at = min(a, b) if not (math.isinf(a) and math.isinf(b)) else max(_num(r["grid_max"]), _num(n["grid_max"]))
        p = stats.fisher_exact(int((rt <= at).sum()), len(rt), int((nt <= at).sum()), len(nt)) \
            if len(rt) and len(nt) and not math.isnan(at) else math.nan
        same = a == b
        out.append(dict(table=table, key=key, column=col, ref=a, new=b,
                        diff=b - a if not (math.isinf(a) or math.isinf(b)) else math.nan, tol=math.nan,
                        n_ref=float(len(rt)), n_new=float(len(nt)), p=p, p_adj=math.nan,
                        status="ok" if same else "verdict"))
    out += [_row(table, "/".join(k), "extra") for k in new if k not in ref]
    return out


def _decide(rows: pd.DataFrame, acc_tol: float, alpha: float, strict_verdicts: bool) -> pd.DataFrame:
    """Holm over every p value; then the statuses that waited for it: a tested accuracy drifts when its adjusted p is
    below ``alpha`` and it moved by more than ``acc_tol``; a changed verdict drifts when its adjusted p is below
    ``alpha`` (or always, ``strict_verdicts``), else it is flagged."""
    rows = rows.copy()
    rows["p_adj"] = stats.holm(rows["p"].to_numpy(dtype=float))
    significant = rows["p_adj"] < alpha
    test = rows["status"] == "test"
    moved = rows["diff"].abs() > acc_tol + _EPS
    rows.loc[test, "status"] = np.where(significant[test] & moved[test], "DRIFT", "ok")
    verdict = rows["status"] == "verdict"
    rows.loc[verdict, "status"] = np.where(significant[verdict] | strict_verdicts, "DRIFT", "flag")
    return rows


def compare(ref_dir: str | Path, run_dir: str | Path, acc_tol: float = 0.02,
            latency_tol: float = 0.10, alpha: float = 0.05, strict_verdicts: bool = False) -> Comparison:
    """Compare the tables and verdicts of ``run_dir`` against those of ``ref_dir`` (see the module docstring for the
    rules): ``acc_tol`` the least move of a mean that can drift, ``alpha`` the false-alarm rate over all rows.

    Raises :class:`BenchError` naming the directory when either is not a run directory with records.
    """
    if not (acc_tol >= 0 and latency_tol >= 0):
        raise BenchError(f"tolerances must be >= 0, got acc_tol={acc_tol}, latency_tol={latency_tol}")
    if not 0 < alpha < 1:
        raise BenchError(f"alpha must be in (0, 1), got {alpha}")
    ref_dir, run_dir = Path(ref_dir), Path(run_dir)
    ref_records, run_records = _load(ref_dir, "reference"), _load(run_dir, "run")
    out = []
    for table, (build, keys, acc_cols) in SPECS.items():
        lat_cols = LATENCY_COLUMNS.get(table, [])
        ref, new = _indexed(build(ref_records), keys), _indexed(build(run_records), keys)
        if acc_cols:
            ref_s, new_s = (samples(ref_records, KINDS[table], acc_cols),
                            samples(run_records, KINDS[table], acc_cols))
        for k, r in ref.items():
            key = "/".join(k)
            if k not in new:
                out.append(_row(table, key, "missing"))
                continue
            n = new[k]
            out += [_accuracy(table, key, c, r, n, acc_tol, ref_s.get(k, {}).get(c, []), new_s.get(k, {}).get(c, []))
                    for c in acc_cols]
            out += [_latency(table, key, c, r, n, latency_tol) for c in lat_cols]
        out += [_row(table, "/".join(k), "extra") for k in new if k not in ref]
        if table == "attacks":
            out += _verdicts(ref_records, run_records)
    rows = pd.DataFrame(out, columns=COLUMNS).astype({c: float for c in COLUMNS[3:-1]})
    rows = _decide(rows, acc_tol, alpha, strict_verdicts)
    return Comparison(ref_dir=ref_dir, run_dir=run_dir, acc_tol=acc_tol, latency_tol=latency_tol, rows=rows,
                      alpha=alpha, strict_verdicts=strict_verdicts)


def main(ref: str | Path, run: str | Path, acc_tol: float = 0.02, latency_tol: float = 0.10, alpha: float = 0.05,
         strict_verdicts: bool = False) -> int:
    """Print every compared row and the summary; return 1 on drift (an accuracy or a verdict) or missing rows, else
    0.

    Bad input raises :class:`BenchError` (the CLI prints it on one line and exits with 2).
    """
    result = compare(ref, run, acc_tol=acc_tol, latency_tol=latency_tol, alpha=alpha, strict_verdicts=strict_verdicts)
    print(result.table())
    print()
    print(result.text())
    return 0 if result.ok else 1


_SECTION = re.compile(rf"^{re.escape(HEADING)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)


def append_to_report(run_dir: str | Path, ref_dir: str | Path, acc_tol: float = 0.02,
                     latency_tol: float = 0.10, alpha: float = 0.05, strict_verdicts: bool = False) -> Comparison:
    """Add the comparison section to ``run_dir``/REPORT.md, replacing an earlier one; return the comparison.

    The file is written atomically; a missing REPORT.md is created holding only this section.
    """
    result = compare(ref_dir, run_dir, acc_tol=acc_tol, latency_tol=latency_tol, alpha=alpha,
                     strict_verdicts=strict_verdicts)
    path = Path(run_dir) / "REPORT.md"
    old = path.read_text() if path.exists() else ""
    section = result.markdown()
    if _SECTION.search(old):
        new = _SECTION.sub(lambda _: section.rstrip("\n") + "\n\n", old, count=1).rstrip("\n") + "\n"
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + section
    atomic_write_text(path, new)
    return result
