"""Plots (PNG and PDF) built from the records alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import tables  # noqa: E402
from .records import model_label  # noqa: E402


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


def pruning(att: pd.DataFrame, stem: Path) -> list[Path]:
    df = att[att["attack"].astype(str).str.startswith("prune")].dropna(subset=["stolen_acc_after"])
    if df.empty:
        return []
    df = df.assign(ratio=df["param"].str.extract(r"r=([0-9.]+)")[0].astype(float),
                   ft=df["param"].str.endswith("+ft"))
    groups = _groups(df)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for row, ((ds, model), g) in enumerate(groups):
        for col, attack in enumerate(sorted(g["attack"].unique())):
            ax = axes[row][col] if col < 2 else None
            if ax is None:
                continue
            for (prot, ft), h in g[g["attack"] == attack].groupby(["protector", "ft"], sort=False):
                h = h.sort_values("ratio")
                style = "-" if not ft else "--"
                line = ax.errorbar(h["ratio"], h["stolen_acc_after"], yerr=h.get("stolen_acc_after_std"), fmt=style,
                                   marker="o", capsize=2, label=f"{prot} stolen{' +ft' if ft else ''}").lines[0]
                if h["auth_acc_after"].notna().any() and prot != "none":
                    ax.plot(h["ratio"], h["auth_acc_after"], style, marker="x", color=line.get_color(), alpha=0.5,
                            label=f"{prot} authorized{' +ft' if ft else ''}")
            ax.set(xlabel="pruning ratio", ylabel="test accuracy", ylim=(0, 1))
            ax.set_title(f"{ds} / {model}: {attack}", fontsize=10 if len(f"{ds}{model}{attack}") < 48 else 8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, stem)


def finetune(att: pd.DataFrame, stem: Path) -> list[Path]:
    df = att[att["attack"] == "finetune"].dropna(subset=["stolen_acc_after"])
    if df.empty:
        return []
    df = df.assign(fraction=df["param"].str.removeprefix("f=").astype(float))
    groups = _groups(df)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, ((ds, model), g) in zip(axes[0], groups):
        for prot, h in g.groupby("protector", sort=False):
            h = h.sort_values("fraction")
            ax.errorbar(h["fraction"], h["stolen_acc_after"], yerr=h.get("stolen_acc_after_std"), marker="o",
                        capsize=3, label=f"{prot}: fine-tuned stolen copy")
        s = g.groupby("fraction")["scratch_acc"].mean()
        ax.plot(s.index, s.values, "k--", marker="s", label="scratch (thief's own training)")
        ax.set(xscale="log", title=f"{ds} / {model}: fine-tuning", xlabel="thief's labeled fraction of training set",
               ylabel="test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, stem)


def guessing(records: list[dict], stem: Path) -> list[Path]:
    curves: dict[tuple, list[np.ndarray]] = {}
    for r in records:
        c, res = r["cell"], r["result"]
        accs = (res.get("extra") or {}).get("test_accs") if c.get("kind") == "attack" else None
        if accs:
            curves.setdefault((c["dataset"], model_label(c), c["label"], c["attack_label"]), []).append(
                np.maximum.accumulate(np.asarray(accs)))
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    for (ds, model, prot, attack), cs in curves.items():
        n = min(len(c) for c in cs)
        mean = np.mean([c[:n] for c in cs], axis=0)
        ax.plot(np.arange(1, n + 1), mean, label=f"{ds}/{model} {prot}: {attack}")
    ax.set(xscale="log", xlabel="number of guesses", ylabel="best test accuracy so far", ylim=(0, 1),
           title="Password guessing: best accuracy vs guesses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, stem)


def overhead(ov: pd.DataFrame, stem: Path) -> list[Path]:
    df = ov.dropna(subset=["overhead"])
    df = df[df["protector"] != "none"]
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
        ax.set(yscale="log", title=f"{model}: latency overhead (p50 ratio vs none)", ylabel="protected / none")
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
