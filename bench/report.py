"""``python -m bench report DIR``: tables, plots and REPORT.md rebuilt from DIR/records alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from protectors.core.atomic import atomic_write_text

from . import plots, tables
from .records import RecordStore

PLOT_TITLES = {"security_vs_cost": "Security vs cost", "finetune": "Fine-tuning vs scratch",
               "pruning": "Accuracy vs pruning ratio", "guessing": "Password guessing", "overhead": "Latency overhead"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary(eff: pd.DataFrame, att: pd.DataFrame, ov: pd.DataFrame) -> list[str]:
    """Plain-language findings, each sentence computed from the tables."""
    lines = []
    if len(eff):
        worst = tables.worst_case(eff, att)
        for _, e in eff.iterrows():
            w = worst[(worst["dataset"] == e["dataset"]) & (worst["model"] == e["model"])
                      & (worst["protector"] == e["protector"])].iloc[0]
            s = (f"**{e['protector']}** on {e['dataset']}/{e['model']}: authorized accuracy {e['auth_acc']:.3f} "
                 f"(loss {e['acc_loss']:+.3f} vs clean {e['clean_acc']:.3f}); a thief running the copied artifact "
                 f"gets {e['stolen_acc']:.3f}")
            if w["worst_attack"] != "none" and not np.isnan(w["worst_gain"]):
                share = w["worst_stolen_acc"] / e["clean_acc"] if e["clean_acc"] else np.nan
                s += (f"; the strongest attack (the defender's worst case over the attacks, scored on the test set: "
                      f"{w['worst_attack']}) reaches {w['worst_stolen_acc']:.3f}, "
                      f"{_pct(share)} of clean accuracy, {w['worst_gain']:+.3f} over training from scratch")
                if e["protector"] != "none" and share >= 0.9 and w["worst_gain"] > 0.1:
                    s += " — **this attack breaks the protection at this budget**"
            lines.append(s + ".")
    if len(ov):
        d = ov.dropna(subset=["overhead"])
        d = d[d["protector"] != "none"]
        for (model, target), g in d.groupby(["model", "target"], sort=False):
            parts = [f"{r['protector']} {r['mode']} ×{r['overhead']:.3f}" + _interval(r) for _, r in g.iterrows()]
            lines.append(f"Latency overhead, {model} on {target} (p50 ratio vs none, interleaved, 95% interval): "
                         + ", ".join(parts) + ".")
    return lines


def _interval(row) -> str:
    """`` [low, high]``: the bootstrap interval of an overhead ratio, where the record has one."""
    lo, hi = row.get("overhead_ci_low"), row.get("overhead_ci_high")
    return f" [{lo:.3f}, {hi:.3f}]" if pd.notna(lo) and pd.notna(hi) else ""


def _plots(records: list[dict], eff: pd.DataFrame, att: pd.DataFrame, ov: pd.DataFrame,
           out: Path) -> dict[str, list[Path]]:
    """Every plot that has data, drawn from the tables the report already built (not rebuilt per plot)."""
    made = {"pruning": plots.pruning(att, out / "pruning"), "finetune": plots.finetune(att, out / "finetune"),
            "guessing": plots.guessing(records, out / "guessing"), "overhead": plots.overhead(ov, out / "overhead"),
            "security_vs_cost": plots.security_vs_cost(eff, att, out / "security_vs_cost")}
    return {k: v for k, v in made.items() if v}


def write(run_dir: str | Path) -> Path:
    """Rebuild ``tables/``, ``plots/`` and ``REPORT.md`` in ``run_dir`` from its records; return REPORT.md's path."""
    run_dir = Path(run_dir)
    records = RecordStore(run_dir).load_all()
    eff, att, ov = tables.effectiveness(records), tables.attacks(records), tables.overhead(records)
    guesses = att[att["overlap_mean"].notna()] if "overlap_mean" in att else att.iloc[0:0]
    frames = {"comparison": (tables.comparison(records, eff, att, ov), tables.COMPARISON),
              "effectiveness": (eff, tables.EFFECTIVENESS), "attacks": (att, tables.ATTACKS),
              "guessing": (guesses.reset_index(drop=True), tables.GUESSING),
              "overhead": (ov, tables.OVERHEAD_SHOWN)}
    made = _plots(records, eff, att, ov, run_dir / "plots")
    parts = [f"# Report: {run_dir.name}\n",
             f"Built by `python -m bench report {run_dir}` from {len(records)} records in `records/` "
             "(accuracies are fractions; `mean ± std` over seeds where there are several).\n"]
    found = summary(eff, att, ov)
    if found:
        parts.append("## Summary\n\n" + "\n".join(f"- {s}" for s in found) + "\n")
    for name, files in made.items():
        png = next(p for p in files if p.suffix == ".png")
        parts.append(f"## {PLOT_TITLES.get(name, name)}\n\n![{name}](plots/{png.name})\n")
    for name, (df, cols) in frames.items():
        if len(df) == 0:
            continue
        tables.write(df, cols, run_dir / "tables" / name)
        parts.append(f"## Table: {name}\n\n{tables.display(df, cols).to_markdown(index=False)}\n")
    path = run_dir / "REPORT.md"
    atomic_write_text(path, "\n".join(parts))
    return path
