"""Tables built from the records alone (never kept by hand): effectiveness, attacks, overhead, leaderboard.

Numeric columns hold the mean over training seeds; ``<col>_std`` the standard deviation over training seeds and ``n``
their number. Attack seeds are nested: the runs of one training seed are averaged first (``n_runs`` counts them
all), so the spread shown is the spread between trainings, not between attack repetitions. Markdown and LaTeX show
``mean ± std`` where more than one training seed went into a row.

Rows follow the config that made the records (each record's ``order``); rows of records that carry none (written
before records did) come after, the baseline protector (declared secret kind ``"none"``) first, then in natural
order. Attacks may declare a table of their own (:func:`declared_tables`), e.g. the guessing statistics.

Outcomes are often bimodal (a lock holds in some trainings and falls in others), so a mean alone misleads: the
attacks table also counts the trainings each attack *unlocked* (``unlocked_k`` of ``unlocked_n``, Wilson 95% interval
``unlocked_lo``/``unlocked_hi``), and the leaderboard gives each protector one score, its *data to break*
(:func:`leaderboard`), with the share of trainings broken there.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protectors.core.atomic import atomic_write_text

from . import stats
from .records import attack_declarations, baselines, model_label

EFFECTIVENESS = ["dataset", "model", "protector", "clean_acc", "auth_acc", "acc_loss", "stolen_acc", "secret_bytes",
                 "artifact_bytes", "keyspace_bits"]
ATTACKS = ["dataset", "model", "protector", "attack", "param", "stolen_acc_after", "auth_acc_after", "scratch_acc",
           "gain"]
OVERHEAD = ["model", "protector", "mode", "target", "p50_ms", "p90_ms", "p99_ms", "cold_start_ms", "overhead"]
#: int8 static quantization of each protector's deployed ONNX graph (config ``int8_accuracy = true``)
QUANTIZED = ["dataset", "model", "protector", "mode", "float_auth_acc", "int8_auth_acc", "int8_loss",
             "float_stolen_acc", "int8_stolen_acc"]
#: the harness's own tables (an attack's declared table may not take one of these names)
HARNESS_TABLES = ("comparison", "effectiveness", "attacks", "overhead", "quantized")
#: shown in Markdown/LaTeX besides the contract's columns
OVERHEAD_SHOWN = OVERHEAD + ["overhead_ci_low", "overhead_ci_high", "floor_overhead", "vs_floor", "vs_floor_ci_low",
                             "vs_floor_ci_high", "mean_ms", "throughput_ips", "peak_mem_mb", "resident_mb",
                             "infer_peak_mb"]
#: memory columns (MB), shown with one decimal
MEMORY = ("peak_mem_mb", "resident_mb", "infer_peak_mb")

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


def quantized(records: list[dict]) -> pd.DataFrame:
    """Per protector: the authorized accuracy of its ONNX deployment in float and after int8 static quantization
    (the same mode), what quantization cost it, and the stolen copy's accuracy in float and int8."""
    rows = [{"dataset": r["cell"]["dataset"], "model": model_label(r["cell"]), "protector": r["cell"]["label"],
             "mode": r["result"].get("mode") or "—", "seed": r["cell"].get("seed", 0), "_order": r.get("order"),
             "note": r["result"].get("note", ""), **{k: r["result"].get(k) for k in QUANTIZED[4:]}}
            for r in records if r["cell"].get("kind") == "quantized"]
    return _aggregate(rows, QUANTIZED[:4], QUANTIZED[4:], extra_first=["note"], baseline=baselines(records))


#: optional measurements of an attack record's ``result`` (newer records): the thief's own validation accuracy of
#: the model it returns, its labeled fraction of the training set, the oracle queries it used
THIEF_FIELDS = ("val_acc", "fraction", "queries")
#: an attack *unlocks* a training when the stolen copy reaches this share of that training's authorized accuracy
UNLOCKED_SHARE = 0.9
#: the columns counting the trainings an attack unlocked, with the Wilson 95% interval of the share
UNLOCKED = ["unlocked_k", "unlocked_n", "unlocked_lo", "unlocked_hi"]
#: the attacks table as shown in Markdown/LaTeX: "k/n [lo, hi]" unlocked trainings beside the mean stolen accuracy
ATTACKS_SHOWN = ATTACKS[:6] + ["unlocked"] + ATTACKS[6:]


def authorized(records: list[dict]) -> dict[tuple, float]:
    """``(dataset, model, protector, training seed) -> authorized accuracy`` from the effectiveness records."""
    found: dict[tuple, list[float]] = {}
    for r in records:
        c, res = r["cell"], r["result"]
        if c.get("kind") == "effectiveness" and res.get("auth_acc") is not None:
            found.setdefault((c["dataset"], model_label(c), c["label"], c.get("seed", 0)), []).append(res["auth_acc"])
    return {k: float(np.mean(v)) for k, v in found.items()}


def fraction(result: dict) -> float | None:
    """The thief's labeled fraction of the training set an attack record used: ``result.fraction``, else the first
    entry of its ``budget``; None where the record says neither (an attack that did not apply)."""
    f = result.get("fraction")
    if f is None and result.get("budget"):
        f = result["budget"][0]
    return None if f is None else float(f)


def _unlocked(records: list[dict], auth: dict[tuple, float]) -> pd.DataFrame:
    """Per attack row: in how many of its trainings (training seed × attack seed, each with the authorized accuracy
    of its training seed) the stolen copy reached :data:`UNLOCKED_SHARE` of it, and the Wilson interval."""
    counts: dict[tuple, list[int]] = {}
    for r in records:
        c, res = r["cell"], r["result"]
        if c.get("kind") != "attack" or res.get("stolen_acc_after") is None:
            continue
        a = auth.get((c["dataset"], model_label(c), c["label"], c.get("seed", 0)))
        if a is None:
            continue
        kn = counts.setdefault((c["dataset"], model_label(c), c["label"], c["attack_label"], c["param"]), [0, 0])
        kn[0] += int(res["stolen_acc_after"] >= UNLOCKED_SHARE * a - 1e-12)
        kn[1] += 1
    rows = [dict(zip(ATTACKS[:5], key), unlocked_k=k, unlocked_n=n,
                 **dict(zip(UNLOCKED[2:], stats.wilson(k, n)))) for key, (k, n) in counts.items()]
    return pd.DataFrame(rows, columns=ATTACKS[:5] + UNLOCKED)


def attacks(records: list[dict]) -> pd.DataFrame:
    """The attacks table: one row per (dataset, model, protector, attack, param), the contract's columns (means over
    training seeds), the numbers the attacks record in ``extra``, the thief's own measurements where records hold
    them (:data:`THIEF_FIELDS`), and how many trainings the attack unlocked (:data:`UNLOCKED`)."""
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
                     **{k: res[k] for k in THIEF_FIELDS if _is_number(res.get(k))},
                     "note": res.get("note", ""), "_order": r.get("order")})
    numeric = ATTACKS[5:] + sorted({k for row in rows for k in row
                                    if k not in ATTACKS and k not in ("note", "seed", "_order")})
    out = _aggregate(rows, ATTACKS[:5], numeric, extra_first=["note"], baseline=baselines(records))
    unlocked = _unlocked(records, authorized(records))
    if len(out):
        out = out.merge(unlocked, how="left", on=ATTACKS[:5], sort=False)
    else:
        out = out.reindex(columns=list(out.columns) + UNLOCKED)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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


# -- the leaderboard: one security score per protector, its data to break ---------------------------------------------

#: a protector is *broken* at a thief fraction when the strongest attack there reaches this share of the protector's
#: authorized accuracy ...
BREAK_SHARE = 0.9
#: ... and beats the thief's own training from scratch (``scratch_acc``) by at least this much (on the test set)
BREAK_GAIN = 0.05
#: how the strongest attack at a fraction was chosen: on the thief's own validation accuracy (``val_acc``); on the
#: test set where a record predates ``val_acc``; on the test set where the thief had no data to validate on
VALIDATION, OLD_RECORDS, NO_VALIDATION = "validation", "test (old records)", "test (no thief validation)"
#: the attack row standing for the copied artifact run as it is (no attack, no data): the effectiveness record's
#: ``stolen_acc`` against chance
COPIED = "(copied artifact)"
LEADERBOARD = ["dataset", "model", "protector", "data_to_break", "strongest_attack", "stolen_acc", "auth_acc",
               "scratch_acc", "gain", "broken_k", "broken_n", "note"]
#: the leaderboard as shown: ``per_training`` the range of the data to break of each training, ``broken``
#: "k/n [lo, hi]" (the trainings broken at the reported fraction or below, Wilson 95% interval)
LEADERBOARD_SHOWN = ["dataset", "model", "protector", "data_to_break", "per_training", "broken", "strongest_attack",
                     "selected_on", "stolen_acc", "auth_acc", "scratch_acc", "gain", "note"]
#: the per-fraction frame behind the leaderboard and its plot
STRONGEST = ["dataset", "model", "protector", "fraction", "strongest_attack", "selected_on", "stolen_acc",
             "scratch_acc", "gain", "val_acc", "queries", "auth_acc", "broken", "broken_k", "broken_n"]
_GROUP = ["dataset", "model", "protector"]
_UNIT = ["seed", "attack_seed"]


def thief_runs(records: list[dict]) -> pd.DataFrame:
    """One row per training of an attack that applied (an attack record, training seed × attack seed), with the
    thief's fraction, the test accuracies, the thief's validation accuracy (NaN where the record has none) and the
    authorized accuracy of its training seed; plus, per training, the copied artifact as it is (:data:`COPIED`, at
    fraction 0, scored against chance)."""
    auth = authorized(records)
    rows, seeds = [], {}
    for r in records:
        c, res = r["cell"], r["result"]
        if c.get("kind") != "attack" or res.get("stolen_acc_after") is None or fraction(res) is None:
            continue
        key, seed = (c["dataset"], model_label(c), c["label"]), c.get("seed", 0)
        seeds.setdefault(key + (seed,), set()).add(c.get("attack_seed", 0))
        val = res.get("val_acc")
        why = VALIDATION if _is_number(val) else OLD_RECORDS if "val_acc" not in res else NO_VALIDATION
        rows.append(dict(zip(_GROUP, key), attack=c["attack_label"], param=c["param"], seed=seed,
                         attack_seed=c.get("attack_seed", 0), fraction=fraction(res),
                         stolen=res["stolen_acc_after"], scratch=_num(res.get("scratch_acc")), val=_num(val), why=why,
                         queries=_num(res.get("queries")), auth=auth.get(key + (seed,), np.nan)))
    for r in records:
        c, res = r["cell"], r["result"]
        if c.get("kind") != "effectiveness" or res.get("stolen_acc") is None:
            continue
        key = (c["dataset"], model_label(c), c["label"], c.get("seed", 0))
        for attack_seed in sorted(seeds.get(key, {0})):
            rows.append(dict(zip(_GROUP, key[:3]), attack=COPIED, param="", seed=key[3], attack_seed=attack_seed,
                             fraction=0.0, stolen=res["stolen_acc"], scratch=_num(res.get("chance")), val=np.nan,
                             why=NO_VALIDATION, queries=np.nan, auth=auth.get(key, np.nan)))
    cols = _GROUP + ["attack", "param"] + _UNIT + ["fraction", "stolen", "scratch", "val", "why", "queries", "auth"]
    return pd.DataFrame(rows, columns=cols)


def _num(v: Any) -> float:
    return float(v) if _is_number(v) else np.nan


def _broken(stolen: float, scratch: float, auth: float) -> bool:
    return bool(stolen >= BREAK_SHARE * auth - 1e-12 and stolen - scratch >= BREAK_GAIN - 1e-12)


def _pick(cands: pd.DataFrame) -> tuple[pd.Series, str]:
    """The strongest of the candidate settings (one row each, with ``val``, ``stolen``, ``why``): the highest
    validation accuracy where every candidate has one (ties, which the thief cannot tell apart, go to the higher test
    accuracy: the defender's worst case), else the highest test accuracy; and how it was chosen."""
    if cands["val"].notna().all():
        best = cands.sort_values(["val", "stolen"], ascending=False, kind="stable").iloc[0]
        return best, VALIDATION
    best = cands.sort_values("stolen", ascending=False, kind="stable").iloc[0]
    return best, OLD_RECORDS if (cands["why"] == OLD_RECORDS).any() else NO_VALIDATION


def _setting(row: pd.Series) -> str:
    return f"{row['attack']} {row['param']}".strip()


def strongest(records: list[dict], runs: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (dataset, model, protector) and thief fraction: the strongest attack (chosen as :func:`_pick` says, on
    the settings' means over training seeds, attack seeds averaged first), its test accuracies, and whether it breaks
    the protector (:data:`BREAK_SHARE` of the mean authorized accuracy and :data:`BREAK_GAIN` over scratch); with,
    per training (training seed × attack seed), whether the strongest attack that training's thief chooses (on its
    own validation) breaks that training. Returns ``(per fraction, per training and fraction)``."""
    runs = thief_runs(records) if runs is None else runs
    per_fraction, per_training = [], []
    for (ds, model, prot, f), g in runs.groupby(_GROUP + ["fraction"], sort=False):
        auth = float(np.nanmean(g.drop_duplicates("seed")["auth"])) if g["auth"].notna().any() else np.nan
        by_seed = g.groupby(["attack", "param", "seed"], sort=False).agg(
            stolen=("stolen", "mean"), scratch=("scratch", "mean"), queries=("queries", "mean"),
            val=("val", lambda v: v.mean(skipna=False)), why=("why", lambda w: min(w, key=_WHY.index)))
        settings = by_seed.groupby(["attack", "param"], sort=False).agg(
            stolen=("stolen", "mean"), scratch=("scratch", "mean"), queries=("queries", "mean"),
            val=("val", lambda v: v.mean(skipna=False)), why=("why", lambda w: min(w, key=_WHY.index))).reset_index()
        best, how = _pick(settings)
        units = []
        for _, u in g.groupby(_UNIT, sort=False):
            pick, _ = _pick(u)
            if np.isnan(pick["auth"]):
                continue  # no effectiveness record of this training: nothing to judge it against
            units.append(_broken(pick["stolen"], pick["scratch"], pick["auth"]))
            per_training.append(dict(zip(_GROUP, (ds, model, prot)), seed=pick["seed"],
                                     attack_seed=pick["attack_seed"], fraction=f, broken=units[-1]))
        per_fraction.append(dict(zip(_GROUP, (ds, model, prot)), fraction=f, strongest_attack=_setting(best),
                                 selected_on=how, stolen_acc=best["stolen"], scratch_acc=best["scratch"],
                                 gain=best["stolen"] - best["scratch"], val_acc=best["val"], queries=best["queries"],
                                 auth_acc=auth, broken=_broken(best["stolen"], best["scratch"], auth),
                                 broken_k=sum(units), broken_n=len(units)))
    out = pd.DataFrame(per_fraction, columns=STRONGEST)
    if len(out):
        out = out.sort_values(["dataset", "model", "protector", "fraction"], kind="stable").reset_index(drop=True)
    return out, pd.DataFrame(per_training, columns=_GROUP + _UNIT + ["fraction", "broken"])


#: the order of preference of how a setting's runs were chosen (the least informative wins for a setting)
_WHY = [OLD_RECORDS, NO_VALIDATION, VALIDATION]


def leaderboard_detail(records: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, dict[tuple, np.ndarray]]:
    """The leaderboard (see :func:`leaderboard`), the per-fraction frame it comes from (:func:`strongest`), and per
    (dataset, model, protector) the data to break of every training (``inf`` where it holds up to the grid's
    largest fraction)."""
    runs = thief_runs(records)
    strong, per_training = strongest(records, runs)
    grids = {k: sorted(set(g["fraction"])) for k, g in runs.groupby(["dataset", "model"], sort=False)}
    base = baselines(records)
    order_rows = [{"dataset": r["cell"]["dataset"], "model": model_label(r["cell"]), "protector": r["cell"]["label"],
                   "_order": r.get("order")} for r in records if r["cell"].get("kind") in ("effectiveness", "attack")]
    ranks = _ranks(order_rows, _GROUP, base)
    keys = sorted({tuple(row[k] for k in _GROUP) for row in order_rows},
                  key=lambda k: tuple(ranks[c](v) for c, v in zip(_GROUP, k)))
    if len(strong):  # in the leaderboard's order (the config's), fractions ascending
        pos = {k: i for i, k in enumerate(keys)}
        strong = strong.assign(_pos=[pos.get(k, len(pos)) for k in zip(*(strong[c] for c in _GROUP))]) \
            .sort_values(["_pos", "fraction"], kind="stable").drop(columns="_pos").reset_index(drop=True)
    rows, trainings = [], {}
    for key in keys:
        grid = grids.get(key[:2], [])
        s = strong[(strong["dataset"] == key[0]) & (strong["model"] == key[1]) & (strong["protector"] == key[2])]
        t = per_training[(per_training["dataset"] == key[0]) & (per_training["model"] == key[1])
                         & (per_training["protector"] == key[2])]
        dtb = np.array([g.loc[g["broken"], "fraction"].min() if g["broken"].any() else np.inf
                        for _, g in t.groupby(_UNIT, sort=False)], dtype=float)
        trainings[key] = dtb
        grid_max = max(grid) if grid else np.nan
        broken = s[s["broken"]]
        if len(broken):
            at = broken.iloc[0]
            value, note = float(at["fraction"]), ""
        elif len(s):
            at = s.iloc[-1]
            value, note = np.inf, ""  # shown as "holds up to f = <grid_max>"
        else:
            at, value, note = None, np.inf, "no attack applies"
        where = value if np.isfinite(value) else grid_max
        k, n = int((dtb <= where).sum()) if len(dtb) else 0, len(dtb)
        lo, hi = stats.wilson(k, n)
        if key[2] in base:
            note = "baseline (no secret)" + (f"; {note}" if note else "")
        if at is not None and np.isnan(at["auth_acc"]):
            note = (note + "; " if note else "") + "no effectiveness record: no authorized accuracy"
        rows.append(dict(zip(_GROUP, key), data_to_break=value,
                         data_to_break_lo=float(dtb.min()) if n else np.nan,
                         data_to_break_hi=float(dtb.max()) if n else np.nan, grid_max=grid_max,
                         fraction=at["fraction"] if at is not None else np.nan,
                         strongest_attack=at["strongest_attack"] if at is not None else NO_ATTACK,
                         selected_on=at["selected_on"] if at is not None else "",
                         **{c: at[c] if at is not None else np.nan
                            for c in ("stolen_acc", "auth_acc", "scratch_acc", "gain", "val_acc", "queries")},
                         broken_k=k, broken_n=n, broken_lo=lo, broken_hi=hi, note=note))
    cols = LEADERBOARD[:4] + ["data_to_break_lo", "data_to_break_hi", "grid_max", "fraction", "strongest_attack",
                              "selected_on", "stolen_acc", "auth_acc", "scratch_acc", "gain", "val_acc", "queries",
                              "broken_k", "broken_n", "broken_lo", "broken_hi", "note"]
    return pd.DataFrame(rows, columns=cols), strong, trainings


def leaderboard(records: list[dict]) -> pd.DataFrame:
    """One security score per (dataset, model, protector): its *data to break*, the smallest thief fraction of the
    run's grid (the fractions its attack records used, 0 for data-free attacks and the copied artifact) at which the
    strongest attack (:func:`strongest`: chosen on the thief's validation accuracy) reaches :data:`BREAK_SHARE` of
    the protector's mean authorized accuracy and beats scratch by :data:`BREAK_GAIN`; ``inf`` ("holds up to f = max")
    where no fraction of the grid does. The attack's numbers are those at that fraction (at the largest one where it
    holds). Over trainings: ``data_to_break_lo``/``_hi`` the range of the data to break of each training (training
    seed × attack seed, its thief choosing on its own validation), ``broken_k`` of ``broken_n`` trainings broken at
    the reported fraction or below, with the Wilson 95% interval ``broken_lo``/``broken_hi``."""
    return leaderboard_detail(records)[0]


def _fraction_text(v: Any, grid_max: Any = np.nan, short: bool = False) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    if np.isinf(v):
        return "holds" if short or np.isnan(grid_max) else f"holds up to f = {grid_max:g}"
    return "0 (no data)" if v == 0 and not short else f"{v:g}"


def _kn_text(k: Any, n: Any, lo: Any, hi: Any) -> str:
    if k is None or n is None or pd.isna(k) or pd.isna(n) or n == 0:
        return "—"
    return f"{int(k)}/{int(n)} [{lo:.2f}, {hi:.2f}]"


def _trainings_text(row: pd.Series) -> str:
    lo, hi = row["data_to_break_lo"], row["data_to_break_hi"]
    if pd.isna(lo):
        return "—"
    if lo == hi:
        return _fraction_text(lo, short=True)
    return f"{_fraction_text(lo, short=True)} – {_fraction_text(hi, short=True)}"


def _ratio_text(v: Any, lo: Any, hi: Any) -> str:
    """A latency ratio with its 95% interval, e.g. ``×1.104 [1.096, 1.111]``; ``n/a`` where it was not measured."""
    if not _is_number(v) or np.isnan(v):
        return "n/a"
    ci = f" [{lo:.3f}, {hi:.3f}]" if _is_number(lo) and _is_number(hi) and not np.isnan(lo) else ""
    return f"×{v:.3f}{ci}"


#: columns shown by a formatter of the whole row (derived from several raw columns): column -> (needs, format)
FORMATTED = {
    "overhead_x": (["overhead", "overhead_ci_low", "overhead_ci_high"],
                   lambda r: _ratio_text(r["overhead"], r["overhead_ci_low"], r["overhead_ci_high"])),
    "vs_floor_x": (["vs_floor", "vs_floor_ci_low", "vs_floor_ci_high"],
                   lambda r: _ratio_text(r["vs_floor"], r["vs_floor_ci_low"], r["vs_floor_ci_high"])),
    "unlocked": (UNLOCKED, lambda r: _kn_text(r["unlocked_k"], r["unlocked_n"], r["unlocked_lo"], r["unlocked_hi"])),
    "broken": (["broken_k", "broken_n", "broken_lo", "broken_hi"],
               lambda r: _kn_text(r["broken_k"], r["broken_n"], r["broken_lo"], r["broken_hi"])),
    "data_to_break": (["data_to_break", "grid_max"], lambda r: _fraction_text(r["data_to_break"], r["grid_max"])),
    "per_training": (["data_to_break_lo", "data_to_break_hi"], _trainings_text),
}


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
    if column == "keyspace_bits" or column in MEMORY:
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
    out: dict[str, list[str]] = {}  # built whole, then one frame (column-by-column inserts fragment pandas frames)
    for c in columns + [c for c in ("note",) if c in df and df[c].astype(str).str.len().gt(0).any()
                        and c not in columns]:
        if c in FORMATTED and all(n in df for n in FORMATTED[c][0]):
            out[c] = [FORMATTED[c][1](r) for _, r in df.iterrows()]
            continue
        if c not in df:
            continue
        std = f"{c}_std"
        if std in df:
            out[c] = [_fmt(v, s if n > 1 else None, column=c, whole=whole)
                      for v, s, n in zip(df[c], df[std], df["n"])]
        else:
            out[c] = [_fmt(v, column=c, whole=whole) for v in df[c]]
    return pd.DataFrame(out, index=df.index)


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
