"""The record store: one JSON file per result cell, named by the cell's config hash (RobustBench style).

Records are written atomically as soon as a cell finishes, so a killed run loses at most the cell in flight, and
a restarted run skips every cell whose record exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protectors.atomic import atomic_write_text
from protectors.errors import BenchError
from protectors.hashing import config_hash

from .provenance import provenance


class RecordStore:
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

    def load_all(self) -> list[dict[str, Any]]:
        if not self.dir.is_dir():
            raise BenchError(f"{self.dir}: no records directory (run 'python -m bench run' first)")
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
                if not isinstance(rec, dict) or not isinstance(rec.get("cell"), dict) or "result" not in rec:
                    raise ValueError("missing 'cell' or 'result'")
            except (ValueError, UnicodeDecodeError) as exc:
                raise BenchError(f"{path}: malformed record ({exc})") from None
            out.append(rec)
        return out
