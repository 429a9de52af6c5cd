"""``python -m bench readme [--check] README.md``: the README's results tables, generated from the records.

A region of the README between two markers::

    <!-- table: results/quick leaderboard -->
    ...
    <!-- /table -->

is rewritten with the Markdown of that table (``leaderboard``) rebuilt from the records of that run directory
(``results/quick``, relative to the README's folder) by the functions ``bench report`` uses
(:func:`bench.report.frames`), so the README shows what ``REPORT.md`` shows. Options after the table's name narrow it:

- ``columns=protector,data_to_break,broken``: these shown columns, in this order (any column of the report's table,
  including the derived ones such as ``unlocked`` or ``broken``);
- ``COLUMN=v1,v2`` (any other column of the table, e.g. ``protector=aes,edgepro`` or ``attack=finetune``): only the
  rows whose value is one of those;
- ``pivot=COLUMN`` with ``value=COLUMN``: one column per value of the first (in the table's order), holding the
  second; the other shown columns are the rows (e.g. ``pivot=target value=overhead_x columns=model,protector,mode``:
  a latency ratio per model, variant and target).

``--check`` rewrites nothing: it exits 1 naming the tables that differ from what would be generated (0 when none
does). Text outside the markers is never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from protectors.core.atomic import atomic_write_text
from protectors.core.errors import BenchError

from . import report, tables
from .records import RecordStore

OPEN = re.compile(r"<!--\s*table:\s*(?P<spec>.*?)\s*-->")
CLOSE = "<!-- /table -->"
REGION = re.compile(r"(?P<open><!--\s*table:\s*(?P<spec>.*?)\s*-->)(?P<body>.*?)(?P<close><!--\s*/table\s*-->)", re.S)


@dataclass
class Region:
    spec: str
    old: str
    new: str
    line: int

    @property
    def changed(self) -> bool:
        return self.old != self.new


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _parse(spec: str, where: str) -> tuple[str, str, dict[str, list[str]]]:
    parts = spec.split()
    if len(parts) < 2:
        raise BenchError(f"{where}: a table marker needs a run directory and a table name "
                         f"(<!-- table: results/quick leaderboard -->), got {spec!r}")
    options: dict[str, list[str]] = {}
    for opt in parts[2:]:
        name, eq, value = opt.partition("=")
        if not eq or not name or not value:
            raise BenchError(f"{where}: option {opt!r} of a table marker must be NAME=v1,v2")
        options[name] = value.split(",")
    return parts[0], parts[1], options


class _Tables:
    """The report's tables of each run directory, built once per directory."""

    def __init__(self, base: Path):
        self.base = base
        self.built: dict[Path, dict] = {}

    def get(self, run_dir: str, where: str) -> dict:
        path = (self.base / run_dir).resolve()
        if path not in self.built:
            if not (path / "records").is_dir():
                raise BenchError(f"{where}: {run_dir}: not a run directory (no records/ folder)")
            records = RecordStore(path).load_all()
            if not records:
                raise BenchError(f"{where}: {run_dir}: no records")
            self.built[path] = report.frames(records)
        return self.built[path]


def render(built: dict, name: str, options: dict[str, list[str]], where: str) -> str:
    """The Markdown of table ``name`` of a run's tables, narrowed by the marker's ``options``."""
    if name not in built:
        raise BenchError(f"{where}: no table {name!r} in that run; it has: {', '.join(built)}")
    df, cols, whole = built[name]
    options = dict(options)
    wanted = options.pop("columns", None)
    pivot, value = options.pop("pivot", [None])[0], options.pop("value", [None])[0]
    if (pivot is None) != (value is None) or (pivot is not None and not wanted):
        raise BenchError(f"{where}: 'pivot' needs 'value' and 'columns' (the rows' columns)")
    for col, values in options.items():
        if col not in df:
            raise BenchError(f"{where}: table {name!r} has no column {col!r} to select rows by")
        df = df[df[col].astype(str).isin(values)]
    if pivot is not None:
        return _pivot(df, wanted, pivot, value, whole, where, name)
    shown = tables.display(df, wanted if wanted else cols, whole)
    if wanted:
        unknown = [c for c in wanted if c not in shown]
        if unknown:
            raise BenchError(f"{where}: table {name!r} has no column {', '.join(map(repr, unknown))} to show")
        shown = shown[wanted]
    return shown.to_markdown(index=False) if len(shown) else "(no rows)"


def _pivot(df, rows: list[str], pivot: str, value: str, whole: set[str], where: str, name: str) -> str:
    if pivot not in df:
        raise BenchError(f"{where}: table {name!r} has no column {pivot!r} to pivot on")
    shown = tables.display(df, rows + [pivot, value], whole)
    missing = [c for c in rows + [pivot, value] if c not in shown]
    if missing:
        raise BenchError(f"{where}: table {name!r} has no column {', '.join(map(repr, missing))} to show")
    if not len(shown):
        return "(no rows)"
    wide = shown.pivot_table(index=rows, columns=pivot, values=value, aggfunc="first", sort=False)
    wide = wide[list(dict.fromkeys(shown[pivot]))].fillna("—").reset_index()
    wide.columns.name = None
    return wide.to_markdown(index=False)


def regions(text: str, base: Path, where: str = "README") -> list[Region]:
    """Every marked region of ``text`` with its current body and the body that would be generated."""
    opens = [m.start() for m in OPEN.finditer(text)]
    found = list(REGION.finditer(text))
    starts = {m.start() for m in found}
    for pos in opens:
        if pos not in starts:
            raise BenchError(f"{where}:{_line(text, pos)}: table marker without its closing {CLOSE}")
    for m in found:
        if OPEN.search(m.group("body")):
            raise BenchError(f"{where}:{_line(text, m.start())}: table marker without its closing {CLOSE}")
    cache = _Tables(base)
    out = []
    for m in found:
        at = f"{where}:{_line(text, m.start())}"
        run_dir, name, options = _parse(m.group("spec"), at)
        body = "\n\n" + render(cache.get(run_dir, at), name, options, at) + "\n\n"
        out.append(Region(m.group("spec"), m.group("body"), body, _line(text, m.start())))
    return out


def generate(text: str, base: Path, where: str = "README") -> str:
    """``text`` with every marked region rewritten from the records."""
    return _apply(text, regions(text, base, where))


def _apply(text: str, found: list[Region]) -> str:
    bodies = iter([r.new for r in found])
    return REGION.sub(lambda m: m.group("open") + next(bodies) + m.group("close"), text)


def main(path: str | Path, check: bool = False) -> int:
    """Rewrite (or, ``check``, verify) the generated tables of the README at ``path``; 1 when ``check`` finds one
    out of date, else 0. Bad input raises :class:`BenchError` (exit 2)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise BenchError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    found = regions(text, path.parent, str(path))
    stale = [r for r in found if r.changed]
    if check:
        if stale:
            print(f"{path}: {len(stale)} of {len(found)} generated tables differ from the records: "
                  + "; ".join(f"line {r.line} ({r.spec})" for r in stale)
                  + f" (python -m bench readme {path} rewrites them)")
            return 1
        print(f"{path}: {len(found)} generated tables match the records")
        return 0
    if stale:
        atomic_write_text(path, _apply(text, found))
    print(f"{path}: {len(found)} generated tables, {len(stale)} rewritten")
    return 0

