"""Plots (PNG and PDF) built from the records alone.

Which attack rows go in which plot is what the attacks declare (:class:`attacks.base.PlotSpec`, recorded with every
attack row), never their names; the overhead plot leaves out the baseline (the protector that declares no secret).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import tables  # noqa: E402
from .records import attack_declarations, model_label  # noqa: E402

log = logging.getLogger(__name__)


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"CreationDate": None} if ext == "pdf" else None)
        out.append(path)
    plt.close(fig)
    return out


def _groups(df: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    return list(df.groupby(["dataset", "model"], sort=False))


def _with_spec(att: pd.DataFrame, specs: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """The applicable attack rows with a plot spec, with their ``x`` and ``series`` from it."""
    if att.empty:
        return att.assign(x=np.nan, series="")
    keys = list(zip(att["attack"], att["param"]))
    keep = [k in specs for k in keys]
    df = att[keep].dropna(subset=["stolen_acc_after"]).copy()  # one block: assign on a fragmented frame warns
    if df.empty:  # every row of these attacks was n/a: nothing to draw, but the columns callers select exist
        return df.assign(x=np.nan, series="")
    picked = [specs[(a, p)] for a, p in zip(df["attack"], df["param"])]
    return df.assign(x=[s.get("x") for s in picked], series=[s.get("series") or "" for s in picked])


def _sweep(att: pd.DataFrame, specs: dict, stem: Path, baseline: set[str]) -> list[Path]:
    """One panel per attack and (dataset, model): stolen (and authorized) accuracy against x, a line per protector
    and series (a non-empty series dashed)."""
    df = _with_spec(att, specs).dropna(subset=["x"])
    if df.empty:
        return []
    spec = next(iter(specs.values()))
    groups = _groups(df)
    cols = max(g["attack"].nunique() for _, g in groups)
    fig, axes = plt.subplots(len(groups), cols, figsize=(5.5 * cols, 3.6 * len(groups)), squeeze=False)
    for row, ((ds, model), g) in enumerate(groups):
        for col, attack in enumerate(sorted(g["attack"].unique())):
            ax = axes[row][col]
            for (prot, series), h in g[g["attack"] == attack].groupby(["protector", "series"], sort=False):
                h = h.sort_values("x")
                style = "--" if series else "-"
                tail = f" {series}" if series else ""
                line = ax.errorbar(h["x"], h["stolen_acc_after"], yerr=h.get("stolen_acc_after_std"), fmt=style,
                                   marker="o", capsize=2, label=f"{prot} stolen{tail}").lines[0]
                if h["auth_acc_after"].notna().any() and prot not in baseline:
                    ax.plot(h["x"], h["auth_acc_after"], style, marker="x", color=line.get_color(), alpha=0.5,
                            label=f"{prot} authorized{tail}")
            ax.set(xlabel=spec["xlabel"], xscale=spec.get("xscale", "linear"), ylabel="test accuracy", ylim=(0, 1))
            ax.set_title(f"{ds} / {model}: {attack}", fontsize=10 if len(f"{ds}{model}{attack}") < 48 else 8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for col in range(g["attack"].nunique(), cols):
            axes[row][col].set_visible(False)
    fig.tight_layout()
    return _save(fig, stem)


def _budget(att: pd.DataFrame, specs: dict, stem: Path, baseline: set[str]) -> list[Path]:
    """One panel per (dataset, model): stolen accuracy after the attack against the thief's budget x, a line per
    protector (and attack, where several declare the figure), beside the thief's scratch baseline."""
    df = _with_spec(att, specs).dropna(subset=["x"])
    if df.empty:
        return []
    spec = next(iter(specs.values()))
    groups = _groups(df)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, ((ds, model), g) in zip(axes[0], groups):
        several = g["attack"].nunique() > 1
        for (prot, attack, series), h in g.groupby(["protector", "attack", "series"], sort=False):
            h = h.sort_values("x")
            what = ", ".join(w for w in (attack if several else "", series) if w)
            ax.errorbar(h["x"], h["stolen_acc_after"], yerr=h.get("stolen_acc_after_std"), marker="o",
                        capsize=3, linestyle="--" if series else "-",
                        label=f"{prot}{f' ({what})' if what else ''}: attacked stolen copy")
        for attack, h in g.groupby("attack", sort=False):
            s = h.groupby("x")["scratch_acc"].mean()
            ax.plot(s.index, s.values, "k--", marker="s",
                    label=f"scratch{f' ({attack})' if several else ''} (thief's own training)")
        attacks_ = ", ".join(dict.fromkeys(g["attack"]))
        ax.set(xscale=spec.get("xscale", "linear"), title=f"{ds} / {model}: {attacks_}", xlabel=spec["xlabel"],
               ylabel="test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, stem)


def _curve(records: list[dict], specs: dict, stem: Path, baseline: set[str]) -> list[Path]:
    """A line per (dataset, model, protector, attack): the running best of the accuracies each record lists in the
    extra field its attack declares (``curve``), averaged over the records."""
    curves: dict[tuple, list[np.ndarray]] = {}
    for r in records:
        c, res = r["cell"], r["result"]
        spec = specs.get((c.get("attack_label"), c.get("param"))) if c.get("kind") == "attack" else None
        accs = (res.get("extra") or {}).get(spec["curve"]) if spec else None
        if accs:
            curves.setdefault((c["dataset"], model_label(c), c["label"], c["attack_label"]), []).append(
                np.maximum.accumulate(np.asarray(accs, dtype=float)))
    if not curves:
        return []
    spec = next(iter(specs.values()))
    fig, ax = plt.subplots(figsize=(7, 4))
    for (ds, model, prot, attack), cs in curves.items():
        n = min(len(c) for c in cs)
        mean = np.mean([c[:n] for c in cs], axis=0)
        ax.plot(np.arange(1, n + 1), mean, label=f"{ds}/{model} {prot}: {attack}")
    ax.set(xscale=spec.get("xscale", "linear"), xlabel=spec["xlabel"], ylabel="best test accuracy so far",
           ylim=(0, 1), title=f"{spec['title']}: best accuracy vs {spec['xlabel']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, stem)


#: how each plot style of :data:`attacks.base.PLOT_STYLES` is drawn: from the attacks table, or from the records
STYLES = {"sweep": ("table", _sweep), "budget": ("table", _budget), "curve": ("records", _curve)}


def attack_figures(records: list[dict], att: pd.DataFrame, out: Path,
                   baseline: set[str] = frozenset()) -> dict[str, tuple[str, list[Path]]]:
    """The figures the attacks declare (:meth:`attacks.base.Attack.plot`, recorded with every attack row): one
    file per declared ``figure``, in the order of the attacks table. ``name -> (title, files)``."""
    specs = {k: d["plot"] for k, d in attack_declarations(records).items() if isinstance(d.get("plot"), dict)}
    by_figure: dict[str, dict[tuple[str, str], dict]] = {}
    order = list(dict.fromkeys(zip(att["attack"], att["param"]))) if len(att) else []
    for key in order + [k for k in specs if k not in order]:
        if key in specs:
            by_figure.setdefault(specs[key]["figure"], {})[key] = specs[key]
    made = {}
    for figure, found in by_figure.items():
        styles = {s["style"] for s in found.values()}
        if len(styles) != 1 or next(iter(styles)) not in STYLES:
            log.warning("plot %r: attacks declare it in style(s) %s; drawn only in one of %s", figure,
                        ", ".join(sorted(styles)), ", ".join(STYLES))
            continue
        source, draw = STYLES[next(iter(styles))]
        files = draw(att if source == "table" else records, found, out / _stem(figure), baseline)
        if files:
            made[figure] = (next(iter(found.values()))["title"], files)
    return made


def _stem(figure: str) -> str:
    """A file name for a declared figure (its name, with anything but letters, digits, ``-`` and ``_`` replaced)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", figure) or "figure"


def overhead(ov: pd.DataFrame, stem: Path, baseline: set[str] = frozenset()) -> list[Path]:
    """Latency overhead ratios per model and target, every protector but the baseline (whose ratio is 1)."""
    df = ov.dropna(subset=["overhead"])
    df = df[~df["protector"].isin(baseline)]
    if df.empty:
        return []
    models = list(dict.fromkeys(df["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        g = df[df["model"] == model]
        variants = list(dict.fromkeys(g["protector"] + " " + g["mode"]))
        targets_ = list(dict.fromkeys(g["target"]))
        width = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            h = g[(g["protector"] + " " + g["mode"]) == v].set_index("target").reindex(targets_)
            err = None
            if "overhead_ci_low" in h:  # the 95% bootstrap interval of the ratio
                err = np.vstack([(h["overhead"] - h["overhead_ci_low"]).clip(lower=0).fillna(0),
                                 (h["overhead_ci_high"] - h["overhead"]).clip(lower=0).fillna(0)])
            ax.bar(np.arange(len(targets_)) + i * width, h["overhead"], width, yerr=err, capsize=2, label=v)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.03, color="r", lw=0.8, ls=":", label="+3%")
        ax.set_xticks(np.arange(len(targets_)) + width * (len(variants) - 1) / 2, targets_, rotation=20, ha="right",
                      fontsize=7)
        vs = " or ".join(sorted(baseline)) or "baseline"
        ax.set(yscale="log", title=f"{model}: latency overhead (p50 ratio vs {vs})", ylabel=f"protected / {vs}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return _save(fig, stem)


def security_vs_cost(eff: pd.DataFrame, att: pd.DataFrame, stem: Path) -> list[Path]:
    if eff.empty:
        return []
    worst = tables.worst_case(eff, att)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    several = worst[["dataset", "model"]].drop_duplicates().shape[0] > 1
    markers = "osD^v<>pPX*h"
    for i, (_, r) in enumerate(worst.iterrows()):
        label = r["protector"] + (f" ({r['dataset']}/{r['model']})" if several else "")
        ax.scatter(r["acc_loss"], r["worst_stolen_acc"], s=45, marker=markers[i % len(markers)], label=label)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.set(xlabel="accuracy loss with the secret (clean − authorized)",
           ylabel="worst-case stolen accuracy after attacks", ylim=(0, 1.05),
           title="Security vs cost (lower-left is better)")
    ax.grid(alpha=0.3)
    return _save(fig, stem)


def leaderboard(strong: pd.DataFrame, stem: Path, baseline: set[str] = frozenset()) -> list[Path]:
    """One panel per (dataset, model): the strongest attack's stolen accuracy minus the thief's scratch (both on the
    test set, the attack chosen per fraction on the thief's validation) against the thief's labeled fraction, a line
    per protector; a filled marker where the protector is broken at that fraction (90% of its authorized accuracy and
    0.05 over scratch), a hollow one where it holds. The dotted line is the 0.05 margin over scratch."""
    df = strong.dropna(subset=["gain"]) if len(strong) else strong
    if df.empty:
        return []
    groups = _groups(df)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.2), squeeze=False)
    for ax, ((ds, model), g) in zip(axes[0], groups):
        for prot, h in g.groupby("protector", sort=False):
            h = h.sort_values("fraction")
            line = ax.plot(h["fraction"], h["gain"], "-" if prot not in baseline else ":",
                           label=prot + (" (baseline)" if prot in baseline else ""))[0]
            broken = h["broken"].astype(bool)
            ax.scatter(h["fraction"][broken], h["gain"][broken], color=line.get_color(), s=28, zorder=3)
            ax.scatter(h["fraction"][~broken], h["gain"][~broken], facecolors=(0, 0, 0, 0), edgecolors=line.get_color(),
                       s=28, zorder=3)
        ax.axhline(tables.BREAK_GAIN, color="k", lw=0.8, ls=":", label=f"+{tables.BREAK_GAIN:g} over scratch")
        ax.axhline(0, color="k", lw=0.5)
        positive = sorted(f for f in g["fraction"].unique() if f > 0)
        if positive:
            ax.set_xscale("symlog", linthresh=positive[0])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(sorted(g["fraction"].unique()), [f"{f:g}" for f in sorted(g["fraction"].unique())],
                      fontsize=7)
        ax.set(xlabel="thief's labeled fraction of the training set (0: no data)",
               ylabel="strongest attack − scratch (test accuracy)",
               title=f"{ds} / {model}: strongest attack over scratch (filled: broken)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return _save(fig, stem)
