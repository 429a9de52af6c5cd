"""The record store: one JSON file per result cell, named by the cell's config hash (RobustBench style).

Records are written atomically as soon as a cell finishes, so a killed run loses at most the cell in flight, and
a restarted run skips every cell whose record exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from protectors.core.atomic import atomic_write_text
from protectors.core.errors import BenchError
from protectors.core.hashing import config_hash

from .provenance import provenance

#: the cell fields the tables and plots read, per kind of cell (each a string)
CELL_FIELDS = {"effectiveness": ("dataset", "model", "label"),
               "attack": ("dataset", "model", "label", "attack_label", "param"),
               "profile": ("model", "protector", "mode", "target")}


#: where :meth:`RecordStore.retire_superseded` moves records of older plugin code (the report does not read it)
SUPERSEDED = "superseded"


def _without_code(cell: Any) -> Any:
    """A cell without its plugins' identities and the harness's code digest: what it computes, not with what."""
    if isinstance(cell, dict):
        return {k: _without_code(v) for k, v in cell.items() if k not in ("plugin", "code")}
    return cell


def model_label(cell: dict[str, Any]) -> str:
    """The model column of the tables: the model, and its training regime when the config sweeps ``[train]``."""
    return cell["model"] + (f"[{cell['regime']}]" if cell.get("regime") else "")


def check_record(rec: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``rec`` the report could not use.

    Checked when records are loaded, so a damaged or hand-edited file is named instead of failing deep in pandas.
    """
    if not isinstance(rec, dict) or not isinstance(rec.get("cell"), dict) or "result" not in rec:
        raise ValueError("missing 'cell' or 'result'")
    cell, result = rec["cell"], rec["result"]
    kind = cell.get("kind")
    if kind not in CELL_FIELDS:
        raise ValueError(f"cell.kind: {'missing' if kind is None else repr(kind)}; "
                         f"allowed: {', '.join(CELL_FIELDS)}")
    missing = [f for f in CELL_FIELDS[kind] if not isinstance(cell.get(f), str)]
    if missing:
        raise ValueError(f"cell of kind {kind!r} needs string fields {', '.join(CELL_FIELDS[kind])}; "
                         f"missing or not a string: {', '.join(missing)}")
    if not isinstance(cell.get("regime", ""), str):
        raise ValueError("cell.regime must be a string")
    if not isinstance(result, dict):
        raise ValueError(f"'result' must be an object, got {type(result).__name__}")
    extra = result.get("extra")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"result.extra must be an object, got {type(extra).__name__}")
    accs = (extra or {}).get("test_accs")
    if accs is not None and not (isinstance(accs, list)
                                 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in accs)):
        raise ValueError("result.extra.test_accs must be a list of numbers")


class RecordStore:
    """The ``records/`` directory of one run."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "records"

    def key(self, cell: dict[str, Any]) -> str:
        return config_hash(cell)

    def path(self, cell: dict[str, Any]) -> Path:
        return self.dir / f"{self.key(cell)}.json"

    def has(self, cell: dict[str, Any]) -> bool:
        return self.path(cell).exists()

    def write(self, cell: dict[str, Any], result: dict[str, Any], seed: int | None = None) -> Path:
        record = {"cell": cell, "result": result, "provenance": provenance(seed)}
        path = self.path(cell)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=float) + "\n")
        return path

    def retire_superseded(self, cells: list[dict[str, Any]]) -> int:
        """Move aside the records that ``cells`` recompute: the same cell (protector, attack, parameters, seeds) made
        by another version of a plugin's code, so the tables count each cell once. They go to ``records/superseded/``
        (kept, not deleted; the report does not read them). Returns how many were moved."""
        if not self.dir.is_dir():
            return 0
        current = {self.key(c) for c in cells}
        same = {config_hash(_without_code(c)) for c in cells}
        moved = 0
        for path in sorted(self.dir.glob("*.json")):
            if path.stem in current:
                continue
            try:
                cell = json.loads(path.read_text()).get("cell")
            except (ValueError, UnicodeDecodeError, OSError, AttributeError):
                continue  # a damaged record is left where the report names it
            if isinstance(cell, dict) and config_hash(_without_code(cell)) in same:
                (self.dir / SUPERSEDED).mkdir(exist_ok=True)
                os.replace(path, self.dir / SUPERSEDED / path.name)
                moved += 1
        return moved

    def load_all(self) -> list[dict[str, Any]]:
        if not self.dir.is_dir():
            raise BenchError(f"{self.dir}: no records directory (run 'python -m bench run' first)")
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
                check_record(rec)
            except (ValueError, UnicodeDecodeError, OSError) as exc:
                raise BenchError(f"{path}: malformed record ({exc})") from None
            out.append(rec)
        return out
