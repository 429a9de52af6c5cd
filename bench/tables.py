"""Tables built from the records alone (never kept by hand): effectiveness, attacks, overhead.

Numeric columns hold the mean over training seeds; ``<col>_std`` the standard deviation over training seeds and ``n``
their number. Attack seeds are nested: the runs of one training seed are averaged first (``n_runs`` counts them
all), so the spread shown is the spread between trainings, not between attack repetitions. Markdown and LaTeX show
``mean ± std`` where more than one training seed went into a row.

Rows follow the config that made the records (each record's ``order``); rows of records that carry none (written
before records did) come after, the baseline protector (declared secret kind ``"none"``) first, then in natural
order. Attacks may declare a table of their own (:func:`declared_tables`), e.g. the guessing statistics.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protectors.core.atomic import atomic_write_text

from .records import attack_declarations, baselines, model_label

EFFECTIVENESS = ["dataset", "model", "protector", "clean_acc", "auth_acc", "acc_loss", "stolen_acc", "secret_bytes",
                 "artifact_bytes", "keyspace_bits"]
ATTACKS = ["dataset", "model", "protector", "attack", "param", "stolen_acc_after", "auth_acc_after", "scratch_acc",
           "gain"]
OVERHEAD = ["model", "protector", "mode", "target", "p50_ms", "p90_ms", "p99_ms", "cold_start_ms", "overhead"]
#: the harness's own tables (an attack's declared table may not take one of these names)
HARNESS_TABLES = ("comparison", "effectiveness", "attacks", "overhead")
#: shown in Markdown/LaTeX besides the contract's columns
OVERHEAD_SHOWN = OVERHEAD + ["overhead_ci_low", "overhead_ci_high", "mean_ms", "throughput_ips", "peak_mem_mb"]

log = logging.getLogger(__name__)


def _aggregate(rows: list[dict[str, Any]], keys: list[str], values: list[str],
               extra_first: list[str] = (), baseline: set[str] = frozenset()) -> pd.DataFrame:
    """Rows (one per record, with its ``_order``) to the table: repeats averaged, in the config's order."""
    ranks = _ranks(rows, keys, baseline)
    rows = [{k: v for k, v in row.items() if k != "_order"} for row in rows]
    if not rows:
        return pd.DataFrame(columns=keys + values)
    df = pd.DataFrame(rows)
    for v in values:
        if v not in df:
            df[v] = np.nan
        df[v] = pd.to_numeric(df[v], errors="coerce")
    order = {k: sorted(dict.fromkeys(df[k]), key=ranks[k]) for k in keys}
    runs = df.groupby(keys, sort=False, dropna=False).size().rename("n_runs")
    if "seed" in df:  # attack seeds nested within training seeds: average them first
        firsts_by_seed = df.groupby(keys + ["seed"], sort=False, dropna=False)[list(extra_first)].first() \
            if extra_first else None
        df = df.groupby(keys + ["seed"], sort=False, dropna=False)[values].mean()
        if firsts_by_seed is not None:
            df = pd.concat([df, firsts_by_seed], axis=1)
        df = df.reset_index()
    g = df.groupby(keys, sort=False, dropna=False)
    mean = g[values].mean()
    std = g[values].std(ddof=1).add_suffix("_std")
    firsts = g[list(extra_first)].first() if extra_first else None
    out = pd.concat([mean, std, g.size().rename("n"), runs] + ([firsts] if firsts is not None else []), axis=1)
    out = out.reset_index()
    for k in keys:
        out[k] = pd.Categorical(out[k], categories=order[k], ordered=True)
    return out.sort_values(keys).reset_index(drop=True).astype({k: object for k in keys})


def effectiveness(records: list[dict]) -> pd.DataFrame:
    rows = [{"dataset": r["cell"]["dataset"], "model": model_label(r["cell"]), "protector": r["cell"]["label"],
             "seed": r["cell"].get("seed", 0), "_order": r.get("order"),
             **{k: r["result"].get(k) for k in EFFECTIVENESS[3:]}}
            for r in records if r["cell"].get("kind") == "effectiveness"]
    return _aggregate(rows, EFFECTIVENESS[:3], EFFECTIVENESS[3:], baseline=baselines(records))


def attacks(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        c, res = r["cell"], r["result"]
        if c.get("kind") != "attack":
            continue
        extra = res.get("extra") or {}
        rows.append({"dataset": c["dataset"], "model": model_label(c), "protector": c["label"],
                     "attack": c["attack_label"], "param": c["param"], "seed": c.get("seed", 0),
                     **{k: res.get(k) for k in ATTACKS[5:]},
                     **{k: v for k, v in extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                     "note": res.get("note", ""), "_order": r.get("order")})
    numeric = ATTACKS[5:] + sorted({k for row in rows for k in row
                                    if k not in ATTACKS and k not in ("note", "seed", "_order")})
    return _aggregate(rows, ATTACKS[:5], numeric, extra_first=["note"], baseline=baselines(records))


def overhead(records: list[dict]) -> pd.DataFrame:
    rows = [{**{k: r["cell"][k] for k in ("model", "protector", "mode", "target")},
             **{k: v for k, v in r["result"].items() if isinstance(v, (int, float, type(None)))},
             "note": r["result"].get("note", ""), "_order": r.get("order")}
            for r in records if r["cell"].get("kind") == "profile"]
    numeric = sorted({k for row in rows for k in row if k not in OVERHEAD[:4] and k not in ("note", "_order")})
    numeric = OVERHEAD[4:] + [c for c in numeric if c not in OVERHEAD]
    return _aggregate(rows, OVERHEAD[:4], numeric, extra_first=["note"], baseline=baselines(records))


def declared_tables(records: list[dict], att: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, list[str], set[str]]]:
    """The tables attacks declare for themselves (``report_table``): ``name -> (rows, shown columns, counts)``.

    A declared table holds the applicable rows of the attacks declaring it (in the attacks table's order), and
    shows the key columns, ``stolen_acc_after`` and the columns they declare (in their order of declaration)."""
    by_label: dict[str, dict] = {}
    for (attack, _), decl in attack_declarations(records).items():
        by_label.setdefault(attack, decl)
    out: dict[str, tuple[pd.DataFrame, list[str], set[str]]] = {}
    for name in dict.fromkeys(d["table"] for d in by_label.values() if d.get("table")):
        if name in HARNESS_TABLES:
            log.warning("an attack declares a table named %r, which the harness's own table has; not written", name)
            continue
        decls = [d for d in by_label.values() if d.get("table") == name]
        labels = [a for a, d in by_label.items() if d.get("table") == name]
        rows = att[att["attack"].isin(labels) & att["stolen_acc_after"].notna()] if len(att) else att
        if rows.empty:
            continue
        columns = list(dict.fromkeys(c for d in decls for c in d.get("columns", [])))
        counts = {c for d in decls for c in d.get("counts", [])}
        out[name] = (rows.reset_index(drop=True), ATTACKS[:5] + ["stolen_acc_after"] + columns, counts)
    return out


#: the worst case's attack where no attack applied (its gain is NaN)
NO_ATTACK = "(no attack)"


def worst_case(eff: pd.DataFrame, att: pd.DataFrame) -> pd.DataFrame:
    """Per protector setting: accuracy loss, and the defender's worst case: the highest stolen accuracy any attack
    reached (scored on the test set, mean over training seeds), which attack, and its gain over scratch."""
    rows = []
    for _, e in eff.iterrows():
        a = att[(att["dataset"] == e["dataset"]) & (att["model"] == e["model"]) & (att["protector"] == e["protector"])]
        a = a.dropna(subset=["stolen_acc_after"])
        best = a.loc[a["stolen_acc_after"].idxmax()] if len(a) else None
        rows.append({"dataset": e["dataset"], "model": e["model"], "protector": e["protector"],
                     "acc_loss": e["acc_loss"], "stolen_acc": e["stolen_acc"],
                     "worst_stolen_acc": max(e["stolen_acc"], best["stolen_acc_after"]) if best is not None
                     else e["stolen_acc"],
                     "worst_attack": f"{best['attack']} {best['param']}" if best is not None else NO_ATTACK,
                     "worst_gain": best["gain"] if best is not None else np.nan})
    return pd.DataFrame(rows)


#: the README's one comparison table
COMPARISON = ["dataset", "model", "protector", "acc_loss", "stolen_acc", "strongest_attack", "strongest_acc",
              "strongest_scratch", "strongest_gain", "secret_bytes", "mode", "overhead_torch-cpu-1t",
              "overhead_onnxruntime-cpu-1t"]
COMPARISON_TARGETS = ("torch-cpu-1t", "onnxruntime-cpu-1t")


def comparison(records: list[dict], eff: pd.DataFrame, att: pd.DataFrame, ov: pd.DataFrame) -> pd.DataFrame:
    """Per protector setting: accuracy loss, stolen accuracy, the strongest attack against scratch, secret bytes,
    and the per-inference overhead of its default deploy mode on the single-core edge runtimes."""
    if eff.empty:
        return pd.DataFrame(columns=COMPARISON)
    default_mode = {r["cell"]["label"]: (r["result"].get("declaration") or {}).get("modes", [None])[0]
                    for r in records if r["cell"].get("kind") == "effectiveness"}
    worst = worst_case(eff, att)
    rows = []
    for _, w in worst.iterrows():
        e = eff[(eff["dataset"] == w["dataset"]) & (eff["model"] == w["model"]) & (eff["protector"] == w["protector"])]
        a = att[(att["dataset"] == w["dataset"]) & (att["model"] == w["model"]) & (att["protector"] == w["protector"])
                & ((att["attack"] + " " + att["param"]) == w["worst_attack"])]
        row = {"dataset": w["dataset"], "model": w["model"], "protector": w["protector"],
               "acc_loss": w["acc_loss"], "stolen_acc": w["stolen_acc"], "strongest_attack": w["worst_attack"],
               "strongest_acc": w["worst_stolen_acc"],
               "strongest_scratch": a["scratch_acc"].iloc[0] if len(a) else np.nan,
               "strongest_gain": w["worst_gain"], "secret_bytes": e["secret_bytes"].iloc[0]}
        mode = default_mode.get(w["protector"])
        for t in COMPARISON_TARGETS:
            o = ov[(ov["model"] == w["model"]) & (ov["protector"] == w["protector"]) & (ov["target"] == t)
                   & (ov["mode"] == mode)] if len(ov) else ov
            row[f"overhead_{t}"] = o["overhead"].iloc[0] if len(o) else np.nan
        row["mode"] = mode
        rows.append(row)
    return pd.DataFrame(rows)


#: columns shown as whole numbers (attacks add their own counts through their declaration)
WHOLE = {"secret_bytes", "artifact_bytes", "n", "n_runs", "throughput_ips"}


def _natural(value: Any) -> tuple:
    """Natural order: numbers inside the text by value (``r=0.1`` < ``r=0.3`` < ``r=10``)."""
    return tuple((0, float(part), "") if i % 2 else (1, 0.0, part)
                 for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?(?:e-?\d+)?)", str(value))))


def _ranks(rows: list[dict[str, Any]], keys: list[str], baseline: set[str]) -> dict[str, Any]:
    """Per key column, the sort key of its values: first the values whose records say where the config put them
    (``order``: the first place wins), in that order; then the others, the baseline protector first, in natural
    order."""
    first: dict[str, dict[Any, int]] = {k: {} for k in keys}
    for row in rows:
        for k, pos in (row.get("_order") or {}).items():
            if k in first and k in row:
                v = row[k]
                first[k][v] = min(pos, first[k].get(v, pos))

    def rank(k: str):
        def key(v: Any) -> tuple:
            if v in first[k]:
                return (0, first[k][v], _natural(v))
            return (1, 0 if k == "protector" and v in baseline else 1, _natural(v))
        return key

    return {k: rank(k) for k in keys}


def _fmt(v: Any, std: Any = None, digits: int = 3, column: str = "", whole: set[str] = frozenset()) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    if column in WHOLE or column in whole:
        return f"{v:,.0f}"
    if column in ("keyspace_bits", "peak_mem_mb"):
        return f"{v:.1f}"
    if isinstance(v, (float, np.floating)):
        s = f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
        if std is not None and not (isinstance(std, float) and np.isnan(std)):
            s += f" ± {std:.{digits}f}"
        return s
    return str(v)


def display(df: pd.DataFrame, columns: list[str], whole: set[str] = frozenset()) -> pd.DataFrame:
    """The table as shown in Markdown/LaTeX: listed columns, ``mean ± std`` strings, notes kept; ``whole``: more
    columns shown as whole numbers (counts an attack declares)."""
    out = pd.DataFrame(index=df.index)
    for c in columns + [c for c in ("note",) if c in df and df[c].astype(str).str.len().gt(0).any()]:
        if c not in df:
            continue
        std = f"{c}_std"
        if std in df:
            out[c] = [_fmt(v, s if n > 1 else None, column=c, whole=whole)
                      for v, s, n in zip(df[c], df[std], df["n"])]
        else:
            out[c] = [_fmt(v, column=c, whole=whole) for v in df[c]]
    return out


def write(df: pd.DataFrame, columns: list[str], stem: Path, whole: set[str] = frozenset()) -> list[Path]:
    """Write ``stem``.csv (all columns, raw numbers), .md and .tex (display form)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    shown = display(df, columns, whole)
    files = {stem.with_suffix(".csv"): df.to_csv(index=False),
             stem.with_suffix(".md"): (shown.to_markdown(index=False) if len(shown) else "(no rows)") + "\n",
             stem.with_suffix(".tex"): shown.to_latex(index=False, escape=True)}
    for path, text in files.items():
        atomic_write_text(path, text)
    return list(files)
