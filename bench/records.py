"""The record store: one JSON file per result cell, named by the cell's config hash (RobustBench style).

Records are written atomically as soon as a cell finishes, so a killed run loses at most the cell in flight, and
a restarted run skips every cell whose record exists.

A record (schema :data:`SCHEMA`) holds ``schema``, the whole ``cell`` (what was computed: the hash of it names the
file), ``result``, ``provenance``, ``secret_kind`` (what the cell's protector declares: ``"none"`` marks the baseline)
and ``order`` (the cell's place in the config that made it: the tables list rows in that order). An attack cell's
``result.declaration`` is the attack's :meth:`~attacks.base.Attack.declaration` (its plot, its table). Records
without ``schema`` are version 1: they lack those fields, and :func:`upgrade` fills them from what the registered
plugins declare (where they are installed), so reading them needs no plugin name either.

One table row holds one setting: records of two different cells that map to one row (an attack's parameters or
``[train]`` changed and the run went into the same directory) are refused by :meth:`RecordStore.load_all`; only
training seeds and attack seeds repeat a row. :meth:`RecordStore.retire_superseded` (called by ``bench run``) moves
the records of settings a config no longer has to ``records/superseded/``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

from protectors.core.atomic import atomic_write_text
from protectors.core.base import NO_SECRET
from protectors.core.errors import BenchError
from protectors.core.hashing import canonical_json, config_hash

from .provenance import provenance

#: the cell fields the tables and plots read, per kind of cell (each a string)
CELL_FIELDS = {"effectiveness": ("dataset", "model", "label"),
               "attack": ("dataset", "model", "label", "attack_label", "param"),
               "profile": ("model", "protector", "mode", "target"),
               "quantized": ("dataset", "model", "label")}


#: where :meth:`RecordStore.retire_superseded` moves records of settings the config no longer has (the report does
#: not read it)
SUPERSEDED = "superseded"
#: the version of the record format this code writes; a record without ``schema`` is version 1
SCHEMA = 2
#: the cell fields that may differ between records of one table row: the repeats the tables average
REPEATS = ("seed", "attack_seed")
#: deeper JSON than this in a record is refused (no record the suite writes comes near it)
MAX_DEPTH = 32
#: the secret kind that makes a protector the baseline (it declares no secret)
BASELINE_KIND = NO_SECRET

log = logging.getLogger(__name__)


def model_label(cell: dict[str, Any]) -> str:
    """The model column of the tables: the model, and its training regime when the config sweeps ``[train]``."""
    return cell["model"] + (f"[{cell['regime']}]" if cell.get("regime") else "")


def label(cell: dict[str, Any]) -> str:
    """The protector column of the tables: the setting's label (a profile cell names it ``protector``)."""
    return cell["protector"] if cell.get("kind") == "profile" else cell["label"]


def row_key(cell: dict[str, Any]) -> tuple:
    """The table row a cell belongs to (its kind and the row's key columns)."""
    kind = cell.get("kind")
    if kind == "profile":
        return (kind, cell["model"], cell["protector"], cell["mode"], cell["target"])
    key = (kind, cell["dataset"], model_label(cell), cell["label"])
    return key + (cell["attack_label"], cell["param"]) if kind == "attack" else key


def row_name(cell: dict[str, Any]) -> str:
    """The row a cell belongs to, as the tables and ``bench compare`` name it (``digits/lenet5/aes/finetune/f=0.1``)."""
    return f"{cell.get('kind')} " + "/".join(row_key(cell)[1:])


def setting(cell: dict[str, Any]) -> str:
    """What a cell computes apart from its repeats (training and attack seeds): one per table row."""
    return config_hash({k: v for k, v in cell.items() if k not in REPEATS})


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """The dotted paths where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))]
    return [] if a == b else [where or "(value)"]


def _plugin_name(cell: dict[str, Any]) -> str | None:
    """The registered name of the cell's protector (recorded in every cell the runner writes)."""
    ref = cell.get("plugin") if cell.get("kind") == "profile" else cell.get("protector")
    name = ref.get("name") if isinstance(ref, dict) else None
    return name if isinstance(name, str) else None


def declared_secret_kind(cell: dict[str, Any]) -> str | None:
    """The ``secret_kind`` the cell's protector class declares, where that plugin is installed (else None)."""
    name = _plugin_name(cell)
    return None if name is None else _secret_kind(name)


def _secret_kind(name: str) -> str | None:
    import protectors

    try:
        kind = getattr(protectors.protectors.get(name), "secret_kind", None)
    except BenchError:  # not installed here
        return None
    return kind if isinstance(kind, str) else None


def declared_attack(cell: dict[str, Any]) -> dict[str, Any] | None:
    """The declaration of an attack cell's attack for its row, from the installed plugin (None where it is not)."""
    ref = cell.get("attack")
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
        return None
    params = ref.get("params") if isinstance(ref.get("params"), dict) else {}
    decl = _attack_declaration(ref["name"], canonical_json(params), cell["param"])
    return json.loads(decl) if decl is not None else None


@functools.lru_cache(maxsize=4096)
def _attack_declaration(name: str, params: str, param: str) -> str | None:
    from attacks import attacks

    try:
        cls = attacks.get(name)
    except BenchError:
        return None
    for attempt in (json.loads(params), {}):  # parameters the plugin no longer has: its defaults declare the same
        try:
            return json.dumps(cls(**attempt).declaration(param))
        except (BenchError, TypeError, ValueError):
            continue
    return None


def secret_kind(rec: dict[str, Any]) -> str | None:
    """The secret kind the record's protector declares: recorded (schema 2), in an effectiveness record's protector
    declaration, or asked of the installed plugin."""
    if "secret_kind" in rec:
        return rec["secret_kind"]
    cell, result = rec["cell"], rec["result"]
    decl = result.get("declaration") if cell.get("kind") == "effectiveness" else None
    kind = decl.get("secret_kind") if isinstance(decl, dict) else None
    return kind if isinstance(kind, str) else declared_secret_kind(cell)


def attack_declaration(rec: dict[str, Any]) -> dict[str, Any] | None:
    """How the report shows an attack record's row: recorded (schema 2), or asked of the installed attack."""
    result = rec["result"]
    return result["declaration"] if "declaration" in result else declared_attack(rec["cell"])


def upgrade(rec: dict[str, Any]) -> dict[str, Any]:
    """A checked record with every field of the current schema that the tables read: a version-1 record gets its
    protector's ``secret_kind`` and its attack's ``declaration`` from the installed plugins (or none)."""
    rec["secret_kind"] = secret_kind(rec)
    if rec["cell"]["kind"] == "attack":
        rec["result"]["declaration"] = attack_declaration(rec)
    return rec


def baselines(records: list[dict[str, Any]]) -> set[str]:
    """The protector labels that are baselines: their protector declares no secret (``secret_kind`` ``"none"``)."""
    return {label(r["cell"]) for r in records if secret_kind(r) == BASELINE_KIND}


def attack_declarations(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """``(attack label, param) -> declaration`` of every attack row the records hold (rows without one left out)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        c = r["cell"]
        if c["kind"] == "attack" and (c["attack_label"], c["param"]) not in out:
            decl = attack_declaration(r)
            if isinstance(decl, dict):
                out[(c["attack_label"], c["param"])] = decl
    return out


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    """A JSON number a float holds exactly enough and that is not NaN or infinite (10**400 is not)."""
    if not _is_number(v):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _accuracy(v: Any) -> bool:
    return _finite(v) and 0 <= v <= 1


#: the value types of typed fields: (test, what the error says it must be)
ACCURACY = (_accuracy, "a finite number in [0, 1]")
ACCURACY_OR_NULL = (lambda v: v is None or _accuracy(v), "a finite number in [0, 1] or null")
DIFFERENCE = (lambda v: _finite(v) and -1 <= v <= 1, "a finite number in [-1, 1]")
DIFFERENCE_OR_NULL = (lambda v: v is None or (_finite(v) and -1 <= v <= 1), "a finite number in [-1, 1] or null")
COUNT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0")
COUNT_OR_NULL = (lambda v: v is None or COUNT[0](v), "a whole number >= 0 or null")
NONNEGATIVE = (lambda v: _finite(v) and v >= 0, "a finite number >= 0")
NONNEGATIVE_OR_NULL = (lambda v: v is None or (_finite(v) and v >= 0), "a finite number >= 0 or null")
NUMBER_OR_NULL = (lambda v: v is None or _finite(v), "a finite number or null")
FLAG = (lambda v: isinstance(v, bool), "true or false")
TEXT = (lambda v: isinstance(v, str), "a string")
TEXT_OR_NULL = (lambda v: v is None or isinstance(v, str), "a string or null")
OBJECT = (lambda v: isinstance(v, dict), "an object")
OBJECT_OR_NULL = (lambda v: v is None or isinstance(v, dict), "an object or null")
SEED = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
SEED_OR_NULL = (lambda v: v is None or SEED[0](v), "an integer or null")
ACCURACIES = (lambda v: isinstance(v, dict) and all(_accuracy(a) for a in v.values()),
              "an object of finite numbers in [0, 1]")
NUMBERS = (lambda v: isinstance(v, list) and all(_finite(a) for a in v), "a list of finite numbers")

#: the typed fields of ``result``, per kind of cell (a field may be absent; other fields are free-form, checked only
#: for numbers a float can hold)
RESULT_TYPES = {
    "effectiveness": {"clean_acc": ACCURACY, "auth_acc": ACCURACY, "stolen_acc": ACCURACY, "acc_loss": DIFFERENCE,
                      "chance": ACCURACY, "auth_acc_by_mode": ACCURACIES, "secret_bytes": COUNT,
                      "artifact_bytes": COUNT, "keyspace_bits": NONNEGATIVE, "seconds": NONNEGATIVE,
                      "declaration": OBJECT},
    "attack": {"applicable": FLAG, "stolen_acc_after": ACCURACY, "auth_acc_after": ACCURACY_OR_NULL,
               "scratch_acc": ACCURACY, "gain": DIFFERENCE_OR_NULL, "budget": NUMBERS, "extra": OBJECT,
               "seconds": NONNEGATIVE, "note": TEXT, "declaration": OBJECT_OR_NULL,
               # optional (newer records): the thief's validation accuracy of what it returns (null: no thief data to
               # validate on), its labeled fraction of the training set, the oracle queries it used
               "val_acc": ACCURACY_OR_NULL, "fraction": ACCURACY_OR_NULL, "queries": COUNT_OR_NULL},
    "quantized": {"mode": TEXT, "float_auth_acc": ACCURACY, "int8_auth_acc": ACCURACY, "int8_loss": DIFFERENCE,
                  "float_stolen_acc": ACCURACY, "int8_stolen_acc": ACCURACY, "int8_auth_acc_by_mode": ACCURACIES,
                  "seconds": NONNEGATIVE, "note": TEXT},
    "profile": {"p50_ms": NONNEGATIVE_OR_NULL, "p90_ms": NONNEGATIVE_OR_NULL, "p99_ms": NONNEGATIVE_OR_NULL,
                "mean_ms": NONNEGATIVE_OR_NULL, "cold_start_ms": NONNEGATIVE_OR_NULL,
                "overhead": NONNEGATIVE_OR_NULL, "overhead_ci_low": NONNEGATIVE_OR_NULL,
                "overhead_ci_high": NONNEGATIVE_OR_NULL, "throughput_ips": NONNEGATIVE_OR_NULL,
                "peak_mem_mb": NUMBER_OR_NULL, "artifact_bytes": COUNT_OR_NULL, "secret_bytes": COUNT_OR_NULL,
                "queries": COUNT_OR_NULL, "threads": COUNT_OR_NULL, "note": TEXT,
                # newer records: the design floor of an in-graph secret, and resident / per-inference memory
                "floor_p50_ms": NONNEGATIVE_OR_NULL, "floor_overhead": NONNEGATIVE_OR_NULL,
                "floor_overhead_ci_low": NONNEGATIVE_OR_NULL, "floor_overhead_ci_high": NONNEGATIVE_OR_NULL,
                "vs_floor": NONNEGATIVE_OR_NULL, "vs_floor_ci_low": NONNEGATIVE_OR_NULL,
                "vs_floor_ci_high": NONNEGATIVE_OR_NULL, "resident_mb": NUMBER_OR_NULL,
                "infer_peak_mb": NUMBER_OR_NULL},
}
CELL_TYPES = {"seed": SEED, "attack_seed": SEED, "regime": TEXT}
PROVENANCE_TYPES = {"seed": SEED_OR_NULL, "git_commit": TEXT_OR_NULL}
#: the typed fields of an attack's declaration and of its plot
DECLARATION_TYPES = {"plot": OBJECT_OR_NULL, "table": TEXT_OR_NULL,
                     "columns": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
                                 "a list of strings"),
                     "counts": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
                                "a list of strings")}
PLOT_TYPES = {"figure": TEXT, "title": TEXT, "style": TEXT, "xlabel": TEXT, "x": NUMBER_OR_NULL, "xscale": TEXT,
              "series": TEXT, "curve": TEXT_OR_NULL}


def _typed(obj: dict[str, Any], types: dict[str, tuple], where: str) -> None:
    for name, (ok, what) in types.items():
        if name in obj and not ok(obj[name]):
            raise ValueError(f"{where}.{name} must be {what}, got {_short(obj[name])}")


def _numbers(v: Any, where: str, depth: int = 0) -> None:
    """Every number in ``v`` fits a float; objects and lists nest at most :data:`MAX_DEPTH` deep."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(v, dict):
        for k, x in v.items():
            _numbers(x, f"{where}.{k}", depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _numbers(x, f"{where}[{i}]", depth + 1)
    elif _is_number(v):
        try:
            float(v)
        except OverflowError:
            raise ValueError(f"{where}: number too large ({_short(v)})") from None


def check_record(rec: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``rec`` the report could not use.

    One schema for every record: the cell's key fields are strings, seeds integers, accuracies finite numbers in
    [0, 1] (``null`` only where a value may be missing: the accuracy with the secret re-applied), counts whole
    numbers; every number anywhere fits a float and nothing nests deeper than :data:`MAX_DEPTH`. Checked when
    records are loaded, so a damaged or hand-edited file is named instead of failing deep in pandas.
    """
    if not isinstance(rec, dict) or not isinstance(rec.get("cell"), dict) or "result" not in rec:
        raise ValueError("missing 'cell' or 'result'")
    schema = rec.get("schema", 1)
    if not SEED[0](schema) or schema < 1:
        raise ValueError(f"schema must be a version number >= 1, got {_short(schema)}")
    if schema > SCHEMA:
        raise ValueError(f"schema {schema} is newer than this edgepro-bench reads (up to {SCHEMA}); update it")
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
    _typed(cell, CELL_TYPES, "cell")
    if not isinstance(result, dict):
        raise ValueError(f"'result' must be an object, got {type(result).__name__}")
    extra = result.get("extra")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"result.extra must be an object, got {type(extra).__name__}")
    _typed(result, RESULT_TYPES[kind], "result")
    for name, value in (extra or {}).items():
        if isinstance(value, list) and not NUMBERS[0](value):
            raise ValueError(f"result.extra.{name} must be a list of numbers (a list in extra holds numbers)")
    decl = result.get("declaration") if kind == "attack" else None
    if isinstance(decl, dict):
        _typed(decl, DECLARATION_TYPES, "result.declaration")
        plot = decl.get("plot")
        if isinstance(plot, dict):
            _typed(plot, PLOT_TYPES, "result.declaration.plot")
            curve = plot.get("curve")
            if curve is not None and curve in (extra or {}) and not all(_accuracy(a) for a in extra[curve]):
                raise ValueError(f"result.extra.{curve} must be a list of finite numbers in [0, 1] "
                                 "(the attack declares it a curve of accuracies)")
    prov = rec.get("provenance", {})
    if not isinstance(prov, dict):
        raise ValueError(f"'provenance' must be an object, got {type(prov).__name__}")
    _typed(prov, PROVENANCE_TYPES, "provenance")
    for name, (ok, what) in {"secret_kind": TEXT_OR_NULL, "order": OBJECT}.items():
        if name in rec and not ok(rec[name]):
            raise ValueError(f"{name} must be {what}, got {_short(rec[name])}")
    if not all(SEED[0](v) for v in rec.get("order", {}).values()):
        raise ValueError("order must map table columns to integer positions")
    for name in ("cell", "result", "provenance", "order"):
        _numbers(rec.get(name), name)


class RecordStore:
    """The ``records/`` directory of one run."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "records"
        #: ``cell -> {table column: position in the config}``, set by the runner: written as each record's ``order``
        self.order: Callable[[dict[str, Any]], dict[str, int]] | None = None

    def key(self, cell: dict[str, Any]) -> str:
        return config_hash(cell)

    def path(self, cell: dict[str, Any]) -> Path:
        return self.dir / f"{self.key(cell)}.json"

    def has(self, cell: dict[str, Any]) -> bool:
        return self.path(cell).exists()

    def write(self, cell: dict[str, Any], result: dict[str, Any], seed: int | None = None) -> Path:
        record = {"schema": SCHEMA, "cell": cell, "result": result, "provenance": provenance(seed),
                  "secret_kind": declared_secret_kind(cell)}
        order = self.order(cell) if self.order is not None else None
        if order:
            record["order"] = order
        path = self.path(cell)
        text = json.dumps(record, indent=1, sort_keys=True, default=float) + "\n"
        try:  # what the report will read back: a cell's result that fails the schema is never written
            check_record(json.loads(text))
        except (ValueError, RecursionError) as exc:
            raise BenchError(f"{row_name(cell)}: result not written, it fails the record schema ({exc})") from None
        atomic_write_text(path, text)
        return path

    def retire_superseded(self, cells: list[dict[str, Any]]) -> int:
        """Move aside the records of settings that ``cells`` replace: a record of a table row that ``cells`` compute,
        made with another setting of it (another version of a plugin's code, other attack or training parameters),
        so that every row holds one setting. Records of the same setting with other seeds stay (the repeats a row
        averages), and so do rows that ``cells`` do not compute. They go to ``records/superseded/`` (kept, not
        deleted; the report does not read them). Returns how many were moved."""
        if not self.dir.is_dir():
            return 0
        current = {self.key(c) for c in cells}
        settings: dict[tuple, set[str]] = {}
        for c in cells:
            settings.setdefault(row_key(c), set()).add(setting(c))
        moved = 0
        for path in sorted(self.dir.glob("*.json")):
            if path.stem in current:
                continue
            try:
                cell = json.loads(path.read_text())["cell"]
                row, same = row_key(cell), setting(cell)
            except (ValueError, UnicodeDecodeError, OSError, RecursionError, KeyError, TypeError, AttributeError):
                continue  # a damaged record is left where the report names it
            if row in settings and same not in settings[row]:
                (self.dir / SUPERSEDED).mkdir(exist_ok=True)
                os.replace(path, self.dir / SUPERSEDED / path.name)
                log.debug("%s: a setting of %s this config no longer has; moved to %s/", path.name, row_name(cell),
                          SUPERSEDED)
                moved += 1
        return moved

    def load(self, path: Path) -> dict[str, Any]:
        """One record, checked (:func:`check_record`) and upgraded to the current schema (:func:`upgrade`)."""
        try:
            rec = json.loads(path.read_text())
            check_record(rec)
            return upgrade(rec)
        except (ValueError, UnicodeDecodeError, OSError, RecursionError, OverflowError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise BenchError(f"{path}: malformed record ({why})") from None

    def load_all(self) -> list[dict[str, Any]]:
        """Every record of the directory, checked; refuses (:class:`BenchError`, one line) a damaged record and two
        different settings of one table row."""
        if not self.dir.is_dir():
            raise BenchError(f"{self.dir}: no records directory (run 'python -m bench run' first)")
        paths = sorted(self.dir.glob("*.json"))
        out = [self.load(path) for path in paths]
        self.check_one_setting_per_row(paths, out)
        return out

    def check_one_setting_per_row(self, paths: list[Path], records: list[dict[str, Any]]) -> None:
        """Raise :class:`BenchError` where records of two different settings map to one table row: the tables would
        average them as if they were repeats. Only training and attack seeds may differ within a row."""
        seen: dict[tuple, tuple[str, Path, dict[str, Any]]] = {}
        for path, rec in zip(paths, records):
            cell = rec["cell"]
            row, same = row_key(cell), setting(cell)
            if row not in seen:
                seen[row] = (same, path, cell)
                continue
            first_setting, first, first_cell = seen[row]
            if same != first_setting:
                strip = {k: v for k, v in first_cell.items() if k not in REPEATS}
                diff = _differences(strip, {k: v for k, v in cell.items() if k not in REPEATS})
                fields = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
                raise BenchError(
                    f"{self.dir}: {first.name} and {path.name} are two different settings of one table row "
                    f"({row_name(cell)}; they differ in {fields}), which the tables would average as repeats (only "
                    f"training and attack seeds may repeat a row). 'python -m bench run --config CONFIG --out "
                    f"{self.dir.parent}' with the config whose setting should stay moves the records of the other "
                    f"settings to records/{SUPERSEDED}/; or move one of the two files out of records/ yourself")
