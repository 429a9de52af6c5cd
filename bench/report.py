"""``python -m bench report DIR``: tables, plots and REPORT.md rebuilt from DIR/records alone."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from protectors.core.atomic import atomic_write_text
from protectors.core.errors import BenchError

from . import plots, tables
from .records import RecordStore, baselines

#: the titles of the harness's own plots (an attack's plots carry the title the attack declares)
PLOT_TITLES = {"security_vs_cost": "Security vs cost", "overhead": "Latency overhead",
               "leaderboard": "Data to break: strongest attack over scratch, by thief fraction"}
DIRTY = "-dirty"

log = logging.getLogger(__name__)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _vs(baseline: set[str]) -> str:
    return " or ".join(sorted(baseline)) or "the baseline"


def summary(eff: pd.DataFrame, att: pd.DataFrame, ov: pd.DataFrame, baseline: set[str] = frozenset()) -> list[str]:
    """Plain-language findings, each sentence computed from the tables; ``baseline``: the protector labels that
    declare no secret (never said to be broken, never listed as an overhead)."""
    lines = []
    if len(eff):
        worst = tables.worst_case(eff, att)
        for _, e in eff.iterrows():
            w = worst[(worst["dataset"] == e["dataset"]) & (worst["model"] == e["model"])
                      & (worst["protector"] == e["protector"])].iloc[0]
            s = (f"**{e['protector']}** on {e['dataset']}/{e['model']}: authorized accuracy {e['auth_acc']:.3f} "
                 f"(loss {e['acc_loss']:+.3f} vs clean {e['clean_acc']:.3f}); a thief running the copied artifact "
                 f"gets {e['stolen_acc']:.3f}")
            if not np.isnan(w["worst_gain"]):
                share = w["worst_stolen_acc"] / e["clean_acc"] if e["clean_acc"] else np.nan
                s += (f"; the strongest attack (the defender's worst case over the attacks, scored on the test set: "
                      f"{w['worst_attack']}) reaches {w['worst_stolen_acc']:.3f}, "
                      f"{_pct(share)} of clean accuracy, {w['worst_gain']:+.3f} over training from scratch")
                if (e["protector"] not in baseline and share >= tables.BREAK_SHARE
                        and w["worst_gain"] >= tables.BREAK_GAIN):
                    s += " — **this attack breaks the protection at this budget**"
            lines.append(s + ".")
    if len(ov):
        d = ov.dropna(subset=["overhead"])
        d = d[~d["protector"].isin(baseline)]
        for (model, target), g in d.groupby(["model", "target"], sort=False):
            parts = [f"{r['protector']} {r['mode']} ×{r['overhead']:.3f}" + _interval(r) for _, r in g.iterrows()]
            lines.append(f"Latency overhead, {model} on {target} (p50 ratio vs {_vs(baseline)}, interleaved, 95% "
                         "interval): " + ", ".join(parts) + ".")
    return lines


def _interval(row) -> str:
    """`` [low, high]``: the bootstrap interval of an overhead ratio, where the record has one."""
    lo, hi = row.get("overhead_ci_low"), row.get("overhead_ci_high")
    return f" [{lo:.3f}, {hi:.3f}]" if pd.notna(lo) and pd.notna(hi) else ""


def provenance_line(records: list[dict]) -> str:
    """One line: how many records were computed from a tree with uncommitted changes (``-dirty``), at which commits."""
    commits = [(r.get("provenance") or {}).get("git_commit") for r in records]
    dirty = Counter(c.removesuffix(DIRTY)[:7] for c in commits if isinstance(c, str) and c.endswith(DIRTY))
    unknown = sum(1 for c in commits if not isinstance(c, str))
    if not dirty:
        line = f"Provenance: none of the {len(records)} records comes from a dirty tree"
    else:
        at = ", ".join(f"{c} ({n})" for c, n in sorted(dirty.items(), key=lambda kv: (-kv[1], kv[0])))
        line = (f"**Provenance: {sum(dirty.values())} of {len(records)} records come from a dirty tree** "
                f"(uncommitted changes) at {at}")
    return line + (f"; {unknown} name no commit." if unknown else ".")


def leaderboard_lines(lb: pd.DataFrame) -> list[str]:
    """One sentence per protector setting: its data to break and how many trainings fall there."""
    lines = []
    for _, r in lb.iterrows():
        shown = tables.display(lb.loc[[r.name]], ["data_to_break", "broken"]).iloc[0]
        if np.isinf(r["data_to_break"]):
            s = (f"**{r['protector']}** on {r['dataset']}/{r['model']}: {shown['data_to_break']}"
                 + (f" (strongest there: {r['strongest_attack']}, {r['stolen_acc']:.3f} vs scratch "
                    f"{r['scratch_acc']:.3f}; trainings whose own strongest attack broke them at f ≤ "
                    f"{r['grid_max']:g}: {shown['broken']})"
                    if r["strongest_attack"] != tables.NO_ATTACK else ""))
        else:
            s = (f"**{r['protector']}** on {r['dataset']}/{r['model']}: data to break f = "
                 f"{shown['data_to_break']} ({r['strongest_attack']}, chosen on {r['selected_on']}: "
                 f"{r['stolen_acc']:.3f} of authorized {r['auth_acc']:.3f}, {r['gain']:+.3f} over scratch; "
                 f"broken at this fraction or below in {shown['broken']} trainings)")
        lines.append(s + ".")
    return lines


def frames(records: list[dict]) -> dict[str, tuple[pd.DataFrame, list[str], set[str]]]:
    """Every table of the report, in the report's order: ``name -> (rows, shown columns, whole-number columns)``.
    What ``bench report`` writes under ``tables/`` and what ``bench readme`` puts in the README."""
    return _frames(records)[0]


def _frames(records: list[dict]) -> tuple[dict[str, tuple[pd.DataFrame, list[str], set[str]]], pd.DataFrame]:
    eff, att, ov = tables.effectiveness(records), tables.attacks(records), tables.overhead(records)
    lb, strong, _ = tables.leaderboard_detail(records)
    out = {"comparison": (tables.comparison(records, eff, att, ov), tables.COMPARISON, set()),
           "leaderboard": (lb, tables.LEADERBOARD_SHOWN, set())}
    offline = without_queries(records)
    if len(offline) < len(records):
        # The same verdict for a thief without the device's answers: an oracle lets a thief extract the model
        # whatever protects the artifact, so this one says what the protection itself is worth.
        out["leaderboard_offline"] = (tables.leaderboard_detail(offline)[0], tables.LEADERBOARD_SHOWN, set())
    out |= {"effectiveness": (eff, tables.EFFECTIVENESS, set()), "attacks": (att, tables.ATTACKS_SHOWN, set()),
            **tables.declared_tables(records, att),
            "overhead": (ov, tables.OVERHEAD_SHOWN, set())}
    quant = tables.quantized(records)
    if len(quant):
        out["quantized"] = (quant, tables.QUANTIZED + ["note"], set())
    return out, strong


def without_queries(records: list[dict]) -> list[dict]:
    """The records of a thief that never queries the device: attack rows that used oracle queries left out."""
    return [r for r in records if not (r["cell"].get("kind") == "attack"
                                       and isinstance(r["result"].get("queries"), (int, float))
                                       and r["result"]["queries"] > 0)]


def _plots(records: list[dict], eff: pd.DataFrame, att: pd.DataFrame, ov: pd.DataFrame, out: Path,
           baseline: set[str], strong: pd.DataFrame | None = None) -> dict[str, tuple[str, list[Path]]]:
    """Every plot that has data, drawn from the tables the report already built (not rebuilt per plot): the figures
    the attacks declare, then the harness's own. ``name -> (title, files)``."""
    made = plots.attack_figures(records, att, out, baseline)
    if strong is not None:
        made["leaderboard"] = (PLOT_TITLES["leaderboard"], plots.leaderboard(strong, out / "leaderboard", baseline))
    made["overhead"] = (PLOT_TITLES["overhead"], plots.overhead(ov, out / "overhead", baseline))
    made["security_vs_cost"] = (PLOT_TITLES["security_vs_cost"], plots.security_vs_cost(eff, att,
                                                                                         out / "security_vs_cost"))
    return {k: v for k, v in made.items() if v[1]}


def write(run_dir: str | Path) -> Path:
    """Rebuild ``tables/``, ``plots/`` and ``REPORT.md`` in ``run_dir`` from its records; return REPORT.md's path.

    Raises :class:`BenchError` (one line) for a directory without records, a damaged record, or records of two
    settings of one table row."""
    run_dir = Path(run_dir)
    store = RecordStore(run_dir)
    records = store.load_all()
    if not records:
        raise BenchError(f"{store.dir}: no records in it (run 'python -m bench run --out {run_dir}' first)")
    baseline = baselines(records)
    built, strong = _frames(records)
    eff, att, ov, lb = (built[k][0] for k in ("effectiveness", "attacks", "overhead", "leaderboard"))
    made = _plots(records, eff, att, ov, run_dir / "plots", baseline, strong)
    parts = [f"# Report: {run_dir.name}\n",
             f"Built by `python -m bench report {run_dir}` from {len(records)} records in `records/` "
             "(accuracies are fractions; `mean ± std` over seeds where there are several).\n",
             provenance_line(records) + "\n"]
    found = summary(eff, att, ov, baseline)
    if found:
        parts.append("## Summary\n\n" + "\n".join(f"- {s}" for s in found) + "\n")
    if len(lb):
        parts.append("## Data to break\n\n"
                     f"Per protector: the smallest thief fraction of the run's grid at which the strongest attack, "
                     f"chosen on the thief's own validation, reaches {tables.BREAK_SHARE:.0%} of the authorized "
                     f"accuracy and beats scratch by {tables.BREAK_GAIN:g} on the test set; k/n: the trainings "
                     "(training seed × attack seed) broken at that fraction or below, with the Wilson 95% interval "
                     "(table: `leaderboard`).\n\n" + "\n".join(f"- {s}" for s in leaderboard_lines(lb)) + "\n")
    for name, (title, files) in made.items():
        png = next(p for p in files if p.suffix == ".png")
        parts.append(f"## {title}\n\n![{name}](plots/{png.name})\n")
    for name, (df, cols, whole) in built.items():
        if len(df) == 0:
            continue
        tables.write(df, cols, run_dir / "tables" / name, whole)
        parts.append(f"## Table: {name}\n\n{tables.display(df, cols, whole).to_markdown(index=False)}\n")
    path = run_dir / "REPORT.md"
    atomic_write_text(path, "\n".join(parts))
    log.debug("%s: %d records, %d plots, %d tables", path, len(records), len(made), len(built))
    return path
