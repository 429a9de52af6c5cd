"""``python -m bench report DIR``: tables (and REPORT.md) rebuilt from DIR/records alone."""

from __future__ import annotations

from pathlib import Path

from protectors.atomic import atomic_write_text

from . import tables
from .records import RecordStore


def write(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    records = RecordStore(run_dir).load_all()
    frames = {"effectiveness": (tables.effectiveness(records), tables.EFFECTIVENESS),
              "attacks": (tables.attacks(records), tables.ATTACKS),
              "overhead": (tables.overhead(records), tables.OVERHEAD)}
    parts = [f"# Report: {run_dir.name}\n", f"Built from {len(records)} records in `records/`.\n"]
    for name, (df, cols) in frames.items():
        if len(df) == 0:
            continue
        tables.write(df, cols, run_dir / "tables" / name)
        parts.append(f"## {name.capitalize()}\n\n{tables.display(df, cols).to_markdown(index=False)}\n")
    path = run_dir / "REPORT.md"
    atomic_write_text(path, "\n".join(parts))
    return path
