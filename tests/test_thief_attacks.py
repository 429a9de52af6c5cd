"""The thief's query and rescaling attacks (``query-distill``, ``rescale-finetune``) on tiny synthetic data."""

import copy

import pytest
import torch
from torch import nn

import protectors
from attacks.base import Grants, Loot, Oracle, ThiefContext
from attacks.distill import QueryDistill
from attacks.recipe import ThiefRecipe
from attacks.rescale import RescaleFinetune, normalize
from bench import models
from bench.training import TrainConfig, Trainer
from protectors.core.errors import ConfigError

KEY = bytes(range(32))
CLASSES = 10
#: a recipe that trains just enough to check the plumbing
TINY = ThiefRecipe(lrs=(3e-3,), max_epochs=3, patience=2)


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` 1×8×8 images: one random prototype per class plus a little noise; and the prototypes."""
    gen = torch.Generator().manual_seed(0)
    protos = torch.randn(CLASSES, 1, 8, 8, generator=gen)
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    return protos[y] + 0.3 * torch.randn(n, 1, 8, 8, generator=gen), y, protos


def teacher() -> nn.Module:
    """A fixed model: the class whose prototype has the largest dot product with the input."""
    _, _, protos = separable(1, 0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(protos.flatten(1))
    return net.eval()


@pytest.fixture(scope="module")
def factory():
    return models.factory("lenet5", 1, 8, CLASSES, seed=0)


def loot_of(model: nn.Module, factory) -> Loot:
    none = protectors.get("none")
    ctx = protectors.latency_context(factory, torch.zeros(1, 1, 8, 8), CLASSES, 1)
    return Loot(none.protect_for_latency(model, ctx, KEY), none, factory)


def thief(labeled: int = 40, pool: int = 400, oracle: Oracle | None = None, recipe: ThiefRecipe = TINY):
    x, y, _ = separable(labeled, seed=1)
    px, _, _ = separable(pool, seed=2)
    grants = Grants(oracle.output, oracle.budget, 0.5) if oracle else Grants()
    return ThiefContext(trainer=Trainer(TrainConfig(epochs=1), progress=False), thief_data=lambda f, s: (x, y),
                        loader=None, num_classes=CLASSES, lock_sites=(), seed=0, recipe=recipe, grants=grants,
                        oracle=oracle, unlabeled_pool=(lambda s: px) if pool else None)


def test_params_and_cells():
    a = QueryDistill(fractions=[0.05, 0.1], inits=["stolen"])
    assert a.cells() == ["stolen/labels/f=0.05", "stolen/probs/f=0.05", "stolen/labels/f=0.1", "stolen/probs/f=0.1"]
    assert [a.needs_oracle(c) for c in a.cells()[:2]] == ["labels", "probs"]
    assert a.plot("stolen/probs/f=0.1").x == 0.1 and a.plot("stolen/probs/f=0.1").series == "stolen/probs"
    assert RescaleFinetune().cells() == ["f=0.01", "f=0.1"]
    assert RescaleFinetune().plot("f=0.1").style == "budget"
    with pytest.raises(ConfigError, match="'outputs' must be"):
        QueryDistill(outputs=["logits"])
    with pytest.raises(ConfigError, match="'per' must be"):
        RescaleFinetune(per="weight")


def test_not_applicable_reads_the_grants(factory):
    loot = loot_of(factory(), factory)
    a = QueryDistill()
    why = a.not_applicable(loot.protector, loot.artifact, Grants(), "fresh/labels/f=0.05")
    assert why.startswith("n/a: query-distill needs an oracle")
    labels_only = Grants(oracle="labels", queries=100)
    assert a.not_applicable(loot.protector, loot.artifact, labels_only, "fresh/labels/f=0.05") is None
    assert "needs probabilities" in a.not_applicable(loot.protector, loot.artifact, labels_only, "stolen/probs/f=0.05")
    probs = Grants(oracle="probs", queries=100)
    assert a.not_applicable(loot.protector, loot.artifact, probs, "stolen/probs/f=0.05") is None
    assert RescaleFinetune().not_applicable(loot.protector, loot.artifact, Grants(), "f=0.1") is None


def test_the_query_budget_is_respected_and_recorded(factory):
    loot = loot_of(factory(), factory)
    oracle = Oracle(teacher(), budget=50, output="probs")
    out = QueryDistill(max_epochs=1).run(loot, thief(labeled=40, pool=400, oracle=oracle), "stolen/probs/f=0.05")
    # probs: the labeled training split first (30 of 40: the 10 validation samples only score), then 20 of the
    # pool; never past the budget
    assert oracle.used == 50 and oracle.remaining == 0 and out.extra["val_samples"] == 10
    assert out.extra["queries"] == 50 and out.extra["queried_labeled"] == 30 and out.extra["queried_pool"] == 20
    assert out.val_acc is not None and out.budget[0] == 0.05 and out.budget[1] == out.extra["epochs_run"] > 0
    # labels: a device label adds nothing to a true one, so only the pool is queried
    oracle = Oracle(teacher(), budget=30, output="probs")
    out = QueryDistill(max_epochs=1).run(loot, thief(labeled=40, pool=400, oracle=oracle), "fresh/labels/f=0.05")
    assert out.extra["queries"] == 30 and out.extra["queried_labeled"] == 0 and out.extra["queried_pool"] == 30


def test_distilling_a_fixed_teacher_agrees_with_it(factory):
    """Two labeled samples per class and 600 queries: the student learns the device's function from its answers
    (without the queries, the same training on the labeled samples alone stays far below)."""
    loot = loot_of(factory(), factory)
    recipe = ThiefRecipe(lrs=(3e-3,), max_epochs=4, patience=4)
    x, _, _ = separable(500, seed=3)

    def agreement(output: str, pool: int) -> float:
        oracle = Oracle(teacher(), budget=10_000, output=output)
        out = QueryDistill().run(loot, thief(labeled=20, pool=pool, oracle=oracle, recipe=recipe),
                                 f"fresh/{output}/f=0.05")
        assert out.extra["queries"] == oracle.used == pool + (10 if output == "probs" else 0)
        with torch.no_grad():
            return (out.model(x).argmax(1) == teacher()(x).argmax(1)).float().mean().item()

    alone = agreement("labels", pool=0)
    for output in ("labels", "probs"):
        agree = agreement(output, pool=600)
        assert agree > 0.8 and agree > alone + 0.3, (output, agree, alone)  # chance: 0.1


def secretly_scaled(model: nn.Module) -> nn.Module:
    """The copy a per-channel scaling protector would leave: each output channel ×100 or ×0.01 (weight and bias)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                k = torch.where(torch.arange(m.weight.shape[0]) % 2 == 0, 100.0, 0.01)
                m.weight.mul_(k.view(-1, *([1] * (m.weight.dim() - 1))))
                m.bias.mul_(k)
    return out


def channel_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().flatten(1).norm(dim=1) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_normalize_undoes_a_secret_per_channel_scaling(factory):
    clean = models.factory("lenet5", 1, 8, CLASSES, seed=7)()  # "trained" weights: another init than the thief's
    fresh, example = factory(), torch.zeros(1, 1, 8, 8)
    scaled = secretly_scaled(clean)
    stats = normalize(scaled, fresh, example)
    assert stats["layers_normalized"] == 5 and stats["max_abs_log10_scale"] > 1.5
    target = {n: v.pow(2).mean().sqrt() for n, v in channel_norms(fresh).items()}
    for name, norms in channel_norms(scaled).items():
        torch.testing.assert_close(norms, target[name].expand_as(norms), rtol=1e-4, atol=0)
    # positive per-channel factors cancel: the scaled copy normalizes to exactly what the clean one does
    normalize(clean, fresh, example)
    for (n, a), b in zip(clean.state_dict().items(), scaled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_normalize_keeps_a_conv_batchnorm_pair_up_to_positive_scale():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 36, 3))
    with torch.no_grad():
        net[0].weight.mul_(torch.tensor([100.0, 0.01, 3.0, 1.0]).view(-1, 1, 1, 1))
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.copy_(torch.tensor([5.0, -0.2, 1.0, 0.01]))
        net[1].bias.uniform_(-1, 1)
    x = torch.randn(8, 1, 8, 8)
    block = nn.Sequential(*net[:2]).eval()  # conv -> BatchNorm, in eval mode (its running statistics)
    before = block(x).detach()
    fresh = copy.deepcopy(net).apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    normalize(net, fresh, x[:1])
    torch.testing.assert_close(net[1].weight.abs(), torch.ones(4))  # |γ| to the fresh init's
    # each channel of the pair's output is the old one times a positive factor (so ReLU paths keep their function)
    ratio = (block(x).detach() / before).transpose(0, 1).flatten(1)
    assert (ratio > 0).all()
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=0)


def test_rescale_finetune_normalizes_then_trains(factory):
    clean = models.factory("lenet5", 1, 8, CLASSES, seed=7)()
    loot = loot_of(secretly_scaled(clean), factory)
    assert max(v.max() for v in channel_norms(loot.stolen_model()).values()) > 50
    out = RescaleFinetune(fractions=[0.1]).run(loot, thief(pool=0), "f=0.1")
    assert out.extra["layers_normalized"] == 5 and out.extra["max_abs_log10_scale"] > 1.5
    assert out.val_acc is not None and out.budget == (0.1, out.extra["epochs_run"])
    # after normalizing and a short fine-tune, every layer is back near the fresh init's scale
    fresh = {n: v.pow(2).mean().sqrt() for n, v in channel_norms(factory()).items()}
    for name, norms in channel_norms(out.model).items():
        assert 0.3 < norms.pow(2).mean().sqrt() / fresh[name] < 3, name


def test_the_recipe_starts_every_learning_rate_from_the_same_init():
    """An init that hands back one model would chain the learning rates (and return the last one's state whatever
    was selected): refused."""
    from attacks.recipe import fit

    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 10
    model = models.factory("lenet5", 1, 8, 10, seed=0)()
    recipe = ThiefRecipe(lrs=(1e-3, 3e-4), max_epochs=1)
    with pytest.raises(ValueError, match="fresh model on every call"):
        fit(lambda: model, x, y, recipe, seed=0)
    assert fit(lambda: copy.deepcopy(model), x, y, recipe, seed=0).lr in (1e-3, 3e-4)
