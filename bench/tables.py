"""Tables built from the records alone (never kept by hand): effectiveness, attacks, overhead.

Numeric columns hold the mean over training seeds; ``<col>_std`` the standard deviation over training seeds and ``n``
their number. Attack seeds are nested: the runs of one training seed are averaged first (``n_runs`` counts them
all), so the spread shown is the spread between trainings, not between attack repetitions. Markdown and LaTeX show
``mean ± std`` where more than one training seed went into a row.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protectors.core.atomic import atomic_write_text

from .records import model_label

EFFECTIVENESS = ["dataset", "model", "protector", "clean_acc", "auth_acc", "acc_loss", "stolen_acc", "secret_bytes",
                 "artifact_bytes", "keyspace_bits"]
ATTACKS = ["dataset", "model", "protector", "attack", "param", "stolen_acc_after", "auth_acc_after", "scratch_acc",
           "gain"]
OVERHEAD = ["model", "protector", "mode", "target", "p50_ms", "p90_ms", "p99_ms", "cold_start_ms", "overhead"]
#: the password-guessing attacks' own statistics (a separate table in the report)
GUESSING = ["dataset", "model", "protector", "attack", "param", "stolen_acc_after", "best_test_acc",
            "median_test_acc", "n_pass50", "n_pass80", "overlap_mean"]
#: shown in Markdown/LaTeX besides the contract's columns
OVERHEAD_SHOWN = OVERHEAD + ["overhead_ci_low", "overhead_ci_high", "mean_ms", "throughput_ips", "peak_mem_mb"]


def _aggregate(rows: list[dict[str, Any]], keys: list[str], values: list[str],
               extra_first: list[str] = ()) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=keys + values)
    df = pd.DataFrame(rows)
    for v in values:
        if v not in df:
            df[v] = np.nan
        df[v] = pd.to_numeric(df[v], errors="coerce")
    order = {k: sorted(dict.fromkeys(df[k]), key=_rank) for k in keys}
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
             "seed": r["cell"].get("seed", 0), **{k: r["result"].get(k) for k in EFFECTIVENESS[3:]}}
            for r in records if r["cell"].get("kind") == "effectiveness"]
    return _aggregate(rows, EFFECTIVENESS[:3], EFFECTIVENESS[3:])


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
                     "note": res.get("note", "")})
    numeric = ATTACKS[5:] + sorted({k for row in rows for k in row if k not in ATTACKS and k not in ("note", "seed")})
    return _aggregate(rows, ATTACKS[:5], numeric, extra_first=["note"])


def overhead(records: list[dict]) -> pd.DataFrame:
    rows = [{**{k: r["cell"][k] for k in ("model", "protector", "mode", "target")},
             **{k: v for k, v in r["result"].items() if isinstance(v, (int, float, type(None)))},
             "note": r["result"].get("note", "")}
            for r in records if r["cell"].get("kind") == "profile"]
    numeric = sorted({k for row in rows for k in row if k not in OVERHEAD[:4] and k != "note"})
    numeric = OVERHEAD[4:] + [c for c in numeric if c not in OVERHEAD]
    return _aggregate(rows, OVERHEAD[:4], numeric, extra_first=["note"])


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
                     "worst_attack": f"{best['attack']} {best['param']}" if best is not None else "none",
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


BUILTIN_ORDER = ["none", "aes", "edgepro"]
WHOLE = {"secret_bytes", "artifact_bytes", "n", "n_runs", "throughput_ips", "n_pass50", "n_pass80"}


def _rank(value: Any) -> tuple:
    """Built-in protectors first in a fixed order, then everything else in natural order (numbers by value)."""
    text = str(value)
    base = text.split("[")[0]
    natural = tuple((0, float(part), "") if i % 2 else (1, 0.0, part)
                    for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?(?:e-?\d+)?)", text)))
    return (BUILTIN_ORDER.index(base) if base in BUILTIN_ORDER else len(BUILTIN_ORDER), natural)


def _fmt(v: Any, std: Any = None, digits: int = 3, column: str = "") -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    if column in WHOLE:
        return f"{v:,.0f}"
    if column in ("keyspace_bits", "peak_mem_mb"):
        return f"{v:.1f}"
    if isinstance(v, (float, np.floating)):
        s = f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
        if std is not None and not (isinstance(std, float) and np.isnan(std)):
            s += f" ± {std:.{digits}f}"
        return s
    return str(v)


def display(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The table as shown in Markdown/LaTeX: listed columns, ``mean ± std`` strings, notes kept."""
    out = pd.DataFrame(index=df.index)
    for c in columns + [c for c in ("note",) if c in df and df[c].astype(str).str.len().gt(0).any()]:
        if c not in df:
            continue
        std = f"{c}_std"
        if std in df:
            out[c] = [_fmt(v, s if n > 1 else None, column=c) for v, s, n in zip(df[c], df[std], df["n"])]
        else:
            out[c] = [_fmt(v, column=c) for v in df[c]]
    return out


def write(df: pd.DataFrame, columns: list[str], stem: Path) -> list[Path]:
    """Write ``stem``.csv (all columns, raw numbers), .md and .tex (display form)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    shown = display(df, columns)
    files = {stem.with_suffix(".csv"): df.to_csv(index=False),
             stem.with_suffix(".md"): (shown.to_markdown(index=False) if len(shown) else "(no rows)") + "\n",
             stem.with_suffix(".tex"): shown.to_latex(index=False, escape=True)}
    for path, text in files.items():
        atomic_write_text(path, text)
    return list(files)
