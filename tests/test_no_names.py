"""Plugins are equals: the harness decides on what a plugin declares, never on its name.

- a protector registered under another name that declares ``secret_kind = "none"`` is the baseline (tables, summary,
  overhead plot, the profiler's ratio), and a protector *labelled* ``none`` that holds a secret is not;
- a relabelled fine-tuning attack still gets its plot, and so does an attack that is not even installed, from the
  declaration its records carry;
- a third-party neuron-mask protector gets the guessing attacks (and the runner records them as for EdgePro).
"""

import json
import types

import pytest
import torch

import attacks
import protectors
from attacks import Loot, ThiefContext
from bench import models, plots, profiler, report, tables
from bench.config import PluginSpec, ThiefConfig
from bench.records import RecordStore, baselines
from bench.runner import Runner
from protectors.core.base import NoTraining, latency_context
from protectors.edgepro import EdgeProProtector
from protectors.none import NoProtection

KEY = bytes(range(32))


class Plain(NoProtection):
    """The unprotected model under a name of its own."""

    name = "plain-baseline"


class ThirdPartyMask(EdgeProProtector):
    """A neuron-mask protector from outside the repository (EdgePro's method under another name)."""

    name = "third-party-mask"


@pytest.fixture()
def plugins(monkeypatch):
    for cls in (Plain, ThirdPartyMask):
        monkeypatch.setitem(protectors.protectors._items, cls.name, cls)


# -- records ------------------------------------------------------------------------------------------------------
def _eff(label, kind, stolen, seed=0):
    return {"schema": 2, "cell": {"kind": "effectiveness", "dataset": "digits", "model": "lenet5", "seed": seed,
                                  "label": label, "protector": {"name": label, "params": {}}},
            "result": {"clean_acc": 0.95, "auth_acc": 0.95, "acc_loss": 0.0, "stolen_acc": stolen,
                       "secret_bytes": 0 if kind == "none" else 10,
                       "declaration": {"secret_kind": kind, "modes": ["default"]}},
            "provenance": {"seed": seed, "git_commit": "abc1234def-dirty"}, "secret_kind": kind}


def _att(label, kind, attack_label, name, param, stolen, declaration=None):
    cell = {"kind": "attack", "dataset": "digits", "model": "lenet5", "seed": 0, "attack_seed": 0, "label": label,
            "protector": {"name": label, "params": {}}, "attack_label": attack_label,
            "attack": {"name": name, "params": {}}, "param": param}
    result = {"applicable": True, "stolen_acc_after": stolen, "auth_acc_after": None, "scratch_acc": 0.3,
              "gain": stolen - 0.3, "extra": {}, "note": ""}
    if declaration is not None:
        result["declaration"] = declaration
    return {"schema": 2 if declaration is not None else 1, "cell": cell, "result": result,
            "provenance": {"seed": 0}, "secret_kind": kind}


def _profile(label, kind, mode, overhead):
    return {"schema": 2, "cell": {"kind": "profile", "model": "lenet5", "protector": label, "mode": mode,
                                  "target": "torch-cpu-1t", "plugin": {"name": label, "params": {}}},
            "result": {"p50_ms": overhead, "overhead": overhead, "note": ""}, "provenance": {}, "secret_kind": kind}


def _run_dir(tmp_path, recs):
    (tmp_path / "records").mkdir()
    for i, r in enumerate(recs):
        (tmp_path / "records" / f"r{i:02d}.json").write_text(json.dumps(r))
    return tmp_path


def test_the_baseline_is_what_declares_no_secret_not_the_label_none(tmp_path):
    recs = [_eff("none", "encrypted-weights", 0.1), _eff("plain", "none", 0.95),
            _att("none", "encrypted-weights", "finetune", "finetune", "f=0.1", 0.95),
            _att("plain", "none", "finetune", "finetune", "f=0.1", 0.95),
            _profile("plain", "none", "default", 1.0), _profile("none", "encrypted-weights", "load", 1.2)]
    assert baselines(recs) == {"plain"}
    eff = tables.effectiveness(recs)
    assert list(eff["protector"]) == ["plain", "none"]  # the baseline first (no record gives the config's order)
    path = report.write(_run_dir(tmp_path, recs))
    text = path.read_text()
    plain = next(line for line in text.splitlines() if line.startswith("- **plain**"))
    none = next(line for line in text.splitlines() if line.startswith("- **none**"))
    assert "breaks the protection" not in plain and "breaks the protection" in none
    overhead = next(line for line in text.splitlines() if line.startswith("- Latency overhead"))
    assert "p50 ratio vs plain" in overhead and "none load ×1.200" in overhead and "plain default" not in overhead
    assert ("**Provenance: 2 of 6 records come from a dirty tree** (uncommitted changes) at abc1234 (2); "
            "4 name no commit.") in text


def test_a_baseline_named_otherwise_is_found_from_its_plugin_in_old_records(plugins):
    """A record of schema 1 carries no secret kind: the registered class named in the cell declares it."""
    old = _eff("my-plain", "none", 0.95)
    del old["schema"], old["secret_kind"], old["result"]["declaration"]
    old["cell"]["protector"] = {"name": Plain.name, "params": {}}
    assert baselines([old]) == {"my-plain"}


def test_config_order_beats_the_fallback(tmp_path):
    recs = [_eff("zeta", "neuron-mask", 0.1), _eff("alpha", "neuron-mask", 0.1), _eff("plain", "none", 0.9)]
    for r, pos in zip(recs, (0, 2, 1)):
        r["order"] = {"protector": pos, "dataset": 0, "model": 0}
    assert list(tables.effectiveness(recs)["protector"]) == ["zeta", "plain", "alpha"]


def test_the_profiler_divides_by_the_declared_baseline(plugins):
    cfg = types.SimpleNamespace(protectors=[PluginSpec("aes", {}, "aes"), PluginSpec(Plain.name, {}, "my-plain")])
    runner = types.SimpleNamespace(cfg=cfg)
    assert profiler.baseline_spec(runner).label == "my-plain"
    variants = profiler._variants(runner)
    assert variants[0][0] == "my-plain" and "none" not in {label for label, _, _ in variants}
    cis = profiler.overhead_cis({"my-plain|default": [1.0, 1.1, 0.9], "aes|load": [2.0, 2.2, 1.8]},
                                "my-plain|default")
    assert set(cis) == {"aes|load"} and cis["aes|load"]["low"] == pytest.approx(2.0)
    # no protector of the config declares no secret: the registered one that does, whatever its name
    runner.cfg = types.SimpleNamespace(protectors=[PluginSpec("aes", {}, "aes")])
    base = profiler.baseline_spec(runner)
    assert protectors.protectors.get(base.name).secret_kind == "none"


# -- plots ----------------------------------------------------------------------------------------------------------
def test_a_relabelled_finetune_attack_still_gets_its_plot(tmp_path):
    recs = [_eff("edgepro", "neuron-mask", 0.1),
            _att("edgepro", "neuron-mask", "ft-lr", "finetune", "f=0.05", 0.8),
            _att("edgepro", "neuron-mask", "ft-lr", "finetune", "f=0.1", 0.9)]
    path = report.write(_run_dir(tmp_path, recs))
    assert (tmp_path / "plots" / "finetune.png").stat().st_size > 1000
    assert "## Fine-tuning vs scratch\n\n![finetune](plots/finetune.png)" in path.read_text()


def test_an_uninstalled_attack_is_plotted_from_its_recorded_declaration(tmp_path):
    def spec(x):
        return {"plot": {"figure": "distillation", "title": "Distillation vs queries", "style": "budget",
                         "xlabel": "queries", "x": x, "xscale": "log", "series": "", "curve": None},
                "table": "distillation", "columns": ["queries_used"], "counts": ["queries_used"]}

    recs = [_eff("edgepro", "neuron-mask", 0.1)]
    for q, acc in ((100, 0.5), (1000, 0.7)):
        r = _att("edgepro", "neuron-mask", "distill", "someone-elses-attack", f"q={q}", acc, spec(float(q)))
        r["result"]["extra"] = {"queries_used": q}
        recs.append(r)
    path = report.write(_run_dir(tmp_path, recs))
    text = path.read_text()
    assert (tmp_path / "plots" / "distillation.png").exists() and "## Distillation vs queries" in text
    table = (tmp_path / "tables" / "distillation.md").read_text()
    assert "queries_used" in table and "1,000" in table  # its own table, the declared count as a whole number


def test_plot_panels_come_from_declarations_only(tmp_path):
    """The figures are those the records declare: a pruning attack under any label lands in the pruning plot."""
    decl = attacks.get("prune-channel").declaration("r=0.3")
    recs = [_att("edgepro", "neuron-mask", "my-pruner", "prune-channel", "r=0.3", 0.6, decl),
            _att("edgepro", "neuron-mask", "my-pruner", "prune-channel", "r=0.5", 0.4,
                 attacks.get("prune-channel").declaration("r=0.5"))]
    att = tables.attacks(recs)
    made = plots.attack_figures(recs, att, tmp_path)
    assert set(made) == {"pruning"} and made["pruning"][0] == "Accuracy vs pruning ratio"


# -- a third-party neuron-mask protector gets the guessing attacks ---------------------------------------------------
def _tiny_thief(card, n=40):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *card.input_shape, generator=gen)
    y = torch.arange(n) % card.num_classes

    def thief_data(fraction, seed):
        return x[:20], y[:20]

    return ThiefContext(trainer=NoTraining(), thief_data=thief_data, loader=lambda xs, ys, seed: [(xs, ys)],
                        num_classes=card.num_classes, lock_sites=card.lock_sites, seed=0)


GUESSING = {"guess-random": ({"guesses": 2}, "N=2"),
            "guess-ranked": ({"guesses": 2}, "N=2"),
            "mask-learning": ({"epochs": 1}, "f=0.05")}


def test_a_third_party_neuron_mask_protector_gets_the_guessing_attacks(plugins):
    factory = models.factory("lenet5", 1, 28, 10, seed=0)
    card = factory.card
    protector = protectors.get(ThirdPartyMask.name)
    ctx = latency_context(factory, torch.zeros(1, *card.input_shape), card.num_classes, secret_seed=7)
    artifact = protector.protect_for_latency(factory(), ctx, KEY)
    thief = _tiny_thief(card)
    for name, (params, cell) in GUESSING.items():
        attack = attacks.get(name, **params)
        assert attack.not_applicable(protector, artifact) is None, name
        out = attack.run(Loot(artifact, protector, factory), thief, cell)
        assert "overlap_mean" in protector.compare_secret(artifact, KEY, out.guess), name
    assert attacks.get("key-guess-random").not_applicable(protector, artifact).startswith("n/a")

    # Through the runner, as a config would run it: applicable, its derived counts and its declaration recorded.
    runner = Runner.__new__(Runner)
    runner.key, runner.cfg = KEY, types.SimpleNamespace(thief=ThiefConfig())
    runner.isolate = False  # a stand-in workbench: the attack runs here (tests/test_isolation.py runs it apart)
    test_x, test_y = torch.randn(10, 1, 28, 28), torch.arange(10)
    wb = types.SimpleNamespace(artifact=lambda spec: (protector, artifact), thief_factory=lambda seed: factory,
                               thief_context=lambda seed, oracle=None: thief, clean_acc=0.5,
                               scratch_acc=lambda fraction, seed: 0.1, oracle=lambda protector, artifact: None,
                               splits=types.SimpleNamespace(test_x=test_x, test_y=test_y), trainer=NoTraining())
    spec = PluginSpec(ThirdPartyMask.name, {}, "theirs")
    res = runner.attack(wb, spec, PluginSpec("guess-random", GUESSING["guess-random"][0], "guess-random"), "N=2", 0)
    assert res["applicable"] and {"n_pass50", "n_pass80", "overlap_mean"} <= set(res["extra"])
    assert res["declaration"]["table"] == "guessing" and res["declaration"]["plot"]["figure"] == "guessing"
    rec = {"schema": 2, "cell": {"kind": "attack", "dataset": "digits", "model": "lenet5", "seed": 0,
                                 "attack_seed": 0, "label": "theirs", "attack_label": "guess-random", "param": "N=2"},
           "result": res, "provenance": {}, "secret_kind": "neuron-mask"}
    att = tables.attacks([rec])
    (name, (rows, columns, counts)), = tables.declared_tables([rec], att).items()
    assert name == "guessing" and list(rows["protector"]) == ["theirs"] and "n_pass80" in columns
    assert counts == {"n_pass50", "n_pass80"}


def test_records_store_the_secret_kind_of_a_plugin_named_otherwise(plugins, tmp_path, monkeypatch):
    import bench.records

    monkeypatch.setattr(bench.records, "provenance", lambda seed=None: {"seed": seed})  # not under test here
    store = RecordStore(tmp_path)
    cell = {"kind": "profile", "model": "lenet5", "protector": "mine", "mode": "default", "target": "torch-cpu-1t",
            "plugin": {"name": Plain.name, "params": {}}}
    saved = json.loads(store.write(cell, {"note": ""}).read_text())
    assert saved["secret_kind"] == "none" and baselines(store.load_all()) == {"mine"}
