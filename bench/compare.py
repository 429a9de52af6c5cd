"""The reproduction check: does a new run reproduce a reference run's tables?

``python -m bench compare REF RUN`` builds the effectiveness, attacks and overhead tables of both run directories
from their records, matches rows by their key columns and compares every accuracy value:

- an accuracy is *within tolerance* when ``|new - ref| <= max(2 × ref std over seeds, acc_tol)`` (a reference
  row from a single run has no std, so the floor ``acc_tol`` alone applies);
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

from . import tables
from .records import RecordStore

#: per table: how its rows are built, the key columns that match rows, the accuracy columns that must reproduce
SPECS = {
    "effectiveness": (tables.effectiveness, ["dataset", "model", "protector"],
                      ["clean_acc", "auth_acc", "stolen_acc"]),
    "attacks": (tables.attacks, ["dataset", "model", "protector", "attack", "param"],
                ["stolen_acc_after", "auth_acc_after", "scratch_acc"]),
    "overhead": (tables.overhead, ["model", "protector", "mode", "target"], []),
}
#: compared as a ratio and only flagged, never failing
LATENCY_COLUMNS = {"overhead": ["overhead"]}

HEADING = "## Comparison with the reference"
COLUMNS = ["table", "key", "column", "ref", "new", "diff", "tol", "status"]
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

    def counts(self) -> dict[str, int]:
        """How many rows have each status (every status present, zero or not)."""
        found = self.rows["status"].value_counts()
        return {s: int(found.get(s, 0)) for s in STATUSES}

    @property
    def ok(self) -> bool:
        """No accuracy drifted beyond its tolerance and no reference row is missing from the run."""
        c = self.counts()
        return c["DRIFT"] == 0 and c["missing"] == 0

    def problems(self) -> pd.DataFrame:
        """The rows that are not ``ok`` (drifted, flagged, missing, extra), in table order."""
        return self.rows[self.rows["status"] != "ok"].reset_index(drop=True)

    def header(self) -> str:
        c = self.counts()
        flags = f"{c['flag']} latency flag" + ("" if c["flag"] == 1 else "s")
        s = (f"compare {self.ref_dir} vs {self.run_dir}: {c['ok']} values within tolerance, {c['DRIFT']} drifted, "
             f"{flags}, {c['missing']} missing")
        return s + (f", {c['extra']} extra" if c["extra"] else "")

    def tolerance(self) -> str:
        """One sentence saying what the tolerance is."""
        return (f"Tolerance: an accuracy may move by max(2 × the reference's std over seeds, {self.acc_tol:g}); "
                f"a latency overhead ratio moving by more than {self.latency_tol:.0%} of the reference is flagged "
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
    return "—" if _nan(v) else f"{v:.4f}"


def _fmt_diff(v) -> str:
    return "—" if _nan(v) else f"{v:+.4f}"


def _formatted(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy().astype({c: object for c in ("ref", "new", "diff", "tol")})
    for c in ("ref", "new", "tol"):
        out[c] = [_fmt(v) for v in df[c]]
    out["diff"] = [_fmt_diff(v) for v in df["diff"]]
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


def _accuracy(table: str, key: str, col: str, ref: pd.Series, new: pd.Series, acc_tol: float) -> dict:
    r, n = _num(ref.get(col)), _num(new.get(col))
    tol = max(2 * _std(ref, col), acc_tol)
    if math.isnan(r) and math.isnan(n):
        status = "ok"
    elif math.isnan(n):
        status = "missing"   # the reference has the value, the run did not produce it
    elif math.isnan(r):
        status = "extra"
    else:
        status = "ok" if abs(n - r) <= tol + _EPS else "DRIFT"
    return dict(table=table, key=key, column=col, ref=r, new=n, diff=n - r, tol=tol, status=status)


def _latency(table: str, key: str, col: str, ref: pd.Series, new: pd.Series, latency_tol: float) -> dict:
    r, n = _num(ref.get(col)), _num(new.get(col))
    tol = latency_tol * abs(r)
    if math.isnan(r) and math.isnan(n):
        status = "ok"
    elif math.isnan(r) or math.isnan(n):
        status = "flag"
    else:
        status = "ok" if abs(n - r) <= tol + _EPS else "flag"
    return dict(table=table, key=key, column=col, ref=r, new=n, diff=n - r, tol=tol, status=status)


def compare(ref_dir: str | Path, run_dir: str | Path, acc_tol: float = 0.02,
            latency_tol: float = 0.10) -> Comparison:
    """Compare the tables of ``run_dir`` against those of ``ref_dir`` (see the module docstring for the rules).

    Raises :class:`BenchError` naming the directory when either is not a run directory with records.
    """
    if not (acc_tol >= 0 and latency_tol >= 0):
        raise BenchError(f"tolerances must be >= 0, got acc_tol={acc_tol}, latency_tol={latency_tol}")
    ref_dir, run_dir = Path(ref_dir), Path(run_dir)
    ref_records, run_records = _load(ref_dir, "reference"), _load(run_dir, "run")
    out = []
    for table, (build, keys, acc_cols) in SPECS.items():
        lat_cols = LATENCY_COLUMNS.get(table, [])
        ref, new = _indexed(build(ref_records), keys), _indexed(build(run_records), keys)
        for k, r in ref.items():
            key = "/".join(k)
            if k not in new:
                out.append(dict(table=table, key=key, column="(row)", ref=np.nan, new=np.nan, diff=np.nan,
                                tol=np.nan, status="missing"))
                continue
            n = new[k]
            out += [_accuracy(table, key, c, r, n, acc_tol) for c in acc_cols]
            out += [_latency(table, key, c, r, n, latency_tol) for c in lat_cols]
        out += [dict(table=table, key="/".join(k), column="(row)", ref=np.nan, new=np.nan, diff=np.nan, tol=np.nan,
                     status="extra") for k in new if k not in ref]
    rows = pd.DataFrame(out, columns=COLUMNS).astype({c: float for c in ("ref", "new", "diff", "tol")})
    return Comparison(ref_dir=ref_dir, run_dir=run_dir, acc_tol=acc_tol, latency_tol=latency_tol, rows=rows)


def main(ref: str | Path, run: str | Path, acc_tol: float = 0.02, latency_tol: float = 0.10) -> int:
    """Print every compared row and the summary; return 1 on accuracy drift or missing rows, else 0.

    Bad input raises :class:`BenchError` (the CLI prints it on one line and exits with 2).
    """
    result = compare(ref, run, acc_tol=acc_tol, latency_tol=latency_tol)
    print(result.table())
    print()
    print(result.text())
    return 0 if result.ok else 1


_SECTION = re.compile(rf"^{re.escape(HEADING)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)


def append_to_report(run_dir: str | Path, ref_dir: str | Path, acc_tol: float = 0.02,
                     latency_tol: float = 0.10) -> Comparison:
    """Add the comparison section to ``run_dir``/REPORT.md, replacing an earlier one; return the comparison.

    The file is written atomically; a missing REPORT.md is created holding only this section.
    """
    result = compare(ref_dir, run_dir, acc_tol=acc_tol, latency_tol=latency_tol)
    path = Path(run_dir) / "REPORT.md"
    old = path.read_text() if path.exists() else ""
    section = result.markdown()
    if _SECTION.search(old):
        new = _SECTION.sub(lambda _: section.rstrip("\n") + "\n\n", old, count=1).rstrip("\n") + "\n"
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + section
    atomic_write_text(path, new)
    return result
