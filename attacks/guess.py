"""Password-guessing attacks on EdgePro: random guesses, ranked guesses, and mask learning.

The thief knows the method and its public defaults (Kerckhoffs): the lock sites the model declares, ``gamma`` and
``pool`` (read from the artifact's plaintext metadata when it discloses them, else the paper's 0.1 and 0.3; so the
number of authorization neurons per site), and assumes the default locking value λ = 0 and scale s = 1; it does not
know which neurons. Every guess is scored on the thief's own labeled data (never the test set) and the thief keeps
the guess that scores best there; the harness reports that guess's test accuracy as ``stolen_acc_after``. The
per-guess statistics (``guess_accs``, best and median) are accuracies on the thief's data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protectors.core import lock
from protectors.core.kinds import neuron_mask
from protectors.core.kinds.neuron_mask import Password, apply_password, rank_neurons, select_neurons
from protectors.core.seeding import stream_seed

from .base import Attack, Loot, Outcome, PlotSpec, ThiefContext, pass_counts
from .finetune import check_fractions
from .registry_instance import attacks

#: evaluation batch for scoring guesses
GUESS_BATCH = 2000


@dataclass(frozen=True)
class GuessParams:
    guesses: int = 200
    fraction: float = 0.05
    #: ``None``: what the artifact's public metadata says, else the paper's default
    gamma: float | None = None
    pool: float | None = None
    lock_value: float = 0.0

    def validate(self) -> None:
        if self.guesses < 1:
            raise ValueError("parameter 'guesses' must be >= 1")
        check_fractions([self.fraction])
        if any(v is not None and not 0 < v <= 1 for v in (self.gamma, self.pool)):
            raise ValueError("parameters 'gamma' and 'pool' must be in (0, 1]")


def guess_stats(accs: np.ndarray, samples: int) -> dict:
    """The per-guess statistics the guessing table reports (best, median, every guess's accuracy), on the
    ``samples`` labeled images of the thief's own data the guesses were scored on."""
    return {"best_guess_acc": float(accs.max()), "median_guess_acc": float(np.median(accs)),
            "guesses": len(accs), "guess_accs": accs.round(4).tolist(), "stats_samples": samples}


#: the plot of attacks that score many guesses (``extra["guess_accs"]``, one thief-data accuracy per guess)
GUESS_CURVE = dict(figure="guessing", title="Password guessing (accuracy on the thief's data)", style="curve",
                   xlabel="number of guesses", xscale="log", curve="guess_accs")


class ScoredGuesses:
    """A mixin for attacks whose ``extra`` lists every guess's accuracy on the thief's data (``guess_accs``, from
    :func:`guess_stats`): they declare the guessing plot, and how many guesses pass 50% and 80% of clean accuracy."""

    def plot(self, cell: str) -> PlotSpec | None:
        return PlotSpec(**GUESS_CURVE)

    def derived(self, extra: dict, clean_acc: float) -> dict:
        return pass_counts(extra["guess_accs"], clean_acc) if "guess_accs" in extra else {}


class _GuessAttack(ScoredGuesses, Attack):
    Params = GuessParams
    secret_kinds = ("neuron-mask",)
    #: the guessing table: per-guess statistics, and how much of the real secret the chosen guess holds
    report_table = "guessing"
    report_columns = ("best_guess_acc", "median_guess_acc", "n_pass50", "n_pass80", "overlap_mean")
    count_columns = ("n_pass50", "n_pass80")

    def cells(self) -> list[str]:
        return [f"N={self.params.guesses}"]

    def draw(self, model: nn.Module, ctx: ThiefContext, x: torch.Tensor, widths: dict[str, int],
             rng: np.random.Generator, gamma: float, pool: float) -> list[dict[str, list[int]]]:
        raise NotImplementedError

    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        p = self.params
        stolen = loot.stolen_model()
        x, y = ctx.thief_data(p.fraction, ctx.seed)
        sites = neuron_mask.public_sites(loot.artifact.meta, ctx.lock_sites)
        widths = lock.site_widths(stolen, sites, x[:1])
        rng = np.random.default_rng(stream_seed(ctx.seed, "thief/guesses"))
        model = copy.deepcopy(stolen)
        sites = lock.install(model, sites)
        scores = []
        meta = loot.artifact.meta
        gamma, pool = neuron_mask.public_gamma(meta, p.gamma), neuron_mask.public_pool(meta, p.pool)
        for neurons in self.draw(stolen, ctx, x, widths, rng, gamma, pool):
            pw = Password(neurons, widths, p.lock_value, 1.0)
            for name, site in sites.items():
                site.set_mask(pw.mask(name))
            scores.append((ctx.trainer.evaluate(model, x, y, batch=GUESS_BATCH), pw))
        accs = np.array([s[0] for s in scores])
        best = max(scores, key=lambda s: s[0])  # the first of the best, on the thief's data
        best_model = apply_password(copy.deepcopy(stolen), best[1])
        # The budget is the thief's data: the scratch baseline trains on it with the recipe.
        return Outcome(cell, best_model, (p.fraction, 0), extra=guess_stats(accs, len(y)), guess=best[1],
                       val_acc=best[0])


@attacks.register()
class GuessRandom(_GuessAttack):
    """N uniformly random guesses: the right number of neurons per site, λ known."""

    name = "guess-random"

    def draw(self, model, ctx, x, widths, rng, gamma, pool):
        k = {s: neuron_mask.neurons_per_site(n, gamma) for s, n in widths.items()}
        return [{s: sorted(rng.choice(n, size=k[s], replace=False).tolist()) for s, n in widths.items()}
                for _ in range(self.params.guesses)]


@attacks.register()
class GuessRanked(_GuessAttack):
    """N guesses by EdgePro's own selection rule, with neurons ranked on the thief's data through the stolen copy."""

    name = "guess-ranked"

    def draw(self, model, ctx, x, widths, rng, gamma, pool):
        ranks = rank_neurons(model, list(widths), x[:200])
        return [{s: select_neurons(ranks[s], gamma, pool, rng) for s in widths} for _ in range(self.params.guesses)]


@dataclass(frozen=True)
class MaskLearningParams:
    fraction: float = 0.05
    epochs: int = 10
    lr: float = 0.05
    gamma: float | None = None
    lock_value: float = 0.0

    def validate(self) -> None:
        check_fractions([self.fraction])
        if self.epochs < 1 or self.lr <= 0:
            raise ValueError("parameters 'epochs' must be >= 1 and 'lr' > 0")


class _Gate(nn.Module):
    """A learnable per-neuron gate in (0, 1) at a lock site: the continuous relaxation of the password mask."""

    def __init__(self, width: int):
        super().__init__()
        self.logit = nn.Parameter(torch.full((width,), 3.0))

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.logit)
        return out * lock.channel_view(g, out)


@attacks.register()
class MaskLearning(_GuessAttack):
    """Adaptive reverse engineering: freeze the weights, learn a gate per neuron on the thief's data, threshold.

    The ``ceil(gamma·n)`` neurons with the lowest gate at each site become the guessed authorization neurons.
    """

    name = "mask-learning"
    Params = MaskLearningParams

    def cells(self) -> list[str]:
        return [f"f={self.params.fraction:g}"]

    def plot(self, cell: str) -> PlotSpec | None:
        return None  # one learned guess: no curve of guesses

    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        p = self.params
        stolen = loot.stolen_model()
        x, y = ctx.thief_data(p.fraction, ctx.seed)
        widths = lock.site_widths(stolen, neuron_mask.public_sites(loot.artifact.meta, ctx.lock_sites), x[:1])
        model = copy.deepcopy(stolen).eval()  # eval: batch-norm statistics stay frozen too
        for q in model.parameters():
            q.requires_grad_(False)
        gates = {s: _Gate(w) for s, w in widths.items()}
        handles = [model.get_submodule(s).register_forward_hook(lambda m, i, o, g=g: g(o)) for s, g in gates.items()]
        opt = torch.optim.Adam([g.logit for g in gates.values()], lr=p.lr)
        loader = ctx.loader(x, y, ctx.seed)
        for _ in range(p.epochs):
            for xb, yb in loader:
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for h in handles:
            h.remove()
        neurons = {}
        gamma = neuron_mask.public_gamma(loot.artifact.meta, p.gamma)
        for s, g in gates.items():
            k = neuron_mask.neurons_per_site(widths[s], gamma)
            neurons[s] = sorted(torch.argsort(g.logit.detach())[:k].tolist())
        guess = Password(neurons, widths, p.lock_value, 1.0)
        result = apply_password(copy.deepcopy(stolen), guess)
        return Outcome(cell, result, (p.fraction, p.epochs), guess=guess, val_acc=ctx.evaluate(result, x, y))
