"""The plugin contract, for every registered protector (built-ins, peers, and the installed example plugin) and
every registered attack.

Fast (the default loop): each protector on a tiny synthetic input through :func:`latency_context` (a trainer that
trains nothing): protect_for_latency → save/load → deploy in every mode → wrong key refused → stolen copy →
authorize (the secret re-applied to the stolen copy gives the deployed model) → secret_bytes / keyspace_bits; every
written file parses as its declared format and none is a pickle. Each attack answers ``not_applicable`` for every
protector, declares its cells, and runs on every protector it applies to with a thief whose trainer trains nothing;
the secret re-applies to every attacked copy.

Slow: one harness run over all of them, as a user's config would run them: protect on digits → deploy in every mode →
stolen copy → every applicable attack (authorize re-applies the secret afterwards) → profile on ``torch-cpu-1t``
and ``onnxruntime-cpu-1t``. Then, per protector: authorized accuracy near clean, stolen accuracy near chance where
the protector claims it, a non-zero secret where there is one, ONNX outputs equal to PyTorch outputs.
"""

import copy
import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_safe_files
from torch import nn

import attacks
import protectors
from attacks import Grants, Loot, Oracle, Outcome, ThiefContext
from attacks.recipe import ThiefRecipe
from bench import config, models
from bench.runner import Runner
from protectors.core.artifact import Artifact
from protectors.core.base import NoTraining, latency_context
from protectors.core.errors import ArtifactError, ConfigError, KeyMaterialError, NotApplicable
from protectors.core.onnx_runtime import NotSupported
from protectors.core.sampling import stratified_subset

#: small budgets for every attack parameter that exists (the contract is what runs, not how well)
FAST = {"epochs": 1, "fractions": [0.05], "fraction": 0.05, "ratios": [0.3], "finetune_epochs": 1, "guesses": 3,
        "scratch_epochs": 1, "stats_samples": 200, "z": [4.0], "steps": 3, "key_guesses": 3}
NAMES = sorted(protectors.protectors.names())
#: the worked external plugin: always a case of its own, skipped (with the reason) where it is not installed
PLUGIN = "advparams"
ATTACKS = sorted(attacks.attacks.names())


def fast_params(registry, name, table=FAST):
    fields = {f.name for f in dataclasses.fields(registry.get(name).Params)}
    return {k: v for k, v in table.items() if k in fields}


def toml_value(v):
    return json.dumps(v)


@pytest.fixture(scope="session")
def contract_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    lines = ['name = "contract"', 'datasets = ["digits"]', "seeds = [0]",
             "[train]", "epochs = 40", "batch_size = 32", "lr = 0.03"]
    for name in NAMES:
        lines += ["[[protectors]]", f'name = "{name}"']
    for name in attacks.attacks.names():
        lines += ["[[attacks]]", f'name = "{name}"']
        lines += [f"{k} = {toml_value(v)}" for k, v in fast_params(attacks.attacks, name).items()]
    lines += ["[profile]", 'targets = ["torch-cpu-1t", "onnxruntime-cpu-1t"]', 'models = ["lenet5"]',
              "min_queries = 5", "min_seconds = 0.0", "warmup = 1", "throughput_batch = 2", "max_seconds = 0.5"]
    path = root / "contract.toml"
    path.write_text("\n".join(lines) + "\n")
    key = root / "k.key"
    key.write_text(bytes(range(32)).hex())
    key.chmod(0o600)
    runner = Runner(config.load(str(path)), root / "run", key_file=str(key), cache_dir=root / "cache",
                    progress=False)
    runner.run()
    records = [json.loads(p.read_text()) for p in (root / "run" / "records").glob("*.json")]
    return runner, records


def of(records, kind, label):
    return [r for r in records if r["cell"]["kind"] == kind
            and (r["cell"].get("label") or r["cell"].get("protector")) == label]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_protect_deploy_stolen(contract_run, name):
    _, records = contract_run
    (rec,) = of(records, "effectiveness", name)
    r, decl = rec["result"], rec["result"]["declaration"]
    assert decl["secret_kind"] == protectors.protectors.get(name).secret_kind
    for mode, acc in r["auth_acc_by_mode"].items():
        assert acc >= r["clean_acc"] - 0.03, (mode, acc, r["clean_acc"])
    if decl["claims_chance"]:
        assert r["stolen_acc"] <= 0.3, r["stolen_acc"]
    assert (r["secret_bytes"] > 0) == (decl["secret_kind"] != "none")
    assert r["keyspace_bits"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_applicable_attack_runs_and_the_secret_reapplies(contract_run, name):
    _, records = contract_run
    recs = of(records, "attack", name)
    assert {r["cell"]["attack"]["name"] for r in recs} == set(attacks.attacks.names())
    applicable = [r for r in recs if r["result"]["applicable"]]
    assert {r["cell"]["attack"]["name"] for r in applicable} >= {"finetune", "prune-channel", "prune-unstructured"}
    for r in recs:
        res = r["result"]
        if not res["applicable"]:
            assert res["note"].startswith("n/a: ")
            continue
        assert 0.0 <= res["stolen_acc_after"] <= 1.0 and 0.0 <= res["scratch_acc"] <= 1.0
        assert not res["note"].startswith("secret not re-applicable"), (r["cell"]["attack"]["name"], res["note"])
        if protectors.protectors.get(name).secret_kind != "encrypted-weights":
            assert res["auth_acc_after"] is not None, r["cell"]["attack"]["name"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_profiled_on_torch_and_onnxruntime(contract_run, name):
    _, records = contract_run
    modes = protectors.protectors.get(name).modes
    recs = {(r["cell"]["mode"], r["cell"]["target"]): r["result"] for r in of(records, "profile", name)}
    assert set(recs) == {(m, t) for m in modes for t in ("torch-cpu-1t", "onnxruntime-cpu-1t")}
    for (mode, target), res in recs.items():
        assert res.get("p50_ms", 0) > 0 or res["note"].startswith("n/a"), (mode, target, res)
    assert any(res.get("p50_ms", 0) > 0 for (m, t), res in recs.items() if t == "onnxruntime-cpu-1t"), recs


@pytest.mark.slow
def test_nothing_the_run_wrote_is_a_pickle(contract_run):
    """Records, tables, plots, report; the cache's models and every protector's artifacts (encrypted files decrypted
    with the run's key): each file parses as its declared format, none is a pickle."""
    runner, _ = contract_run
    written = {**assert_safe_files(runner.out), **assert_safe_files(runner.cache.root, runner.key)}
    assert {"json", "safetensors", "aes-gcm/json", "aes-gcm/safetensors"} <= set(written.values()), written


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_onnx_outputs_equal_pytorch_outputs(contract_run, name, digits):
    runner, _ = contract_run
    wb_key = next(iter(runner._benches))
    wb = runner._benches[wb_key]
    spec = next(p for p in runner.cfg.protectors if p.label == name)
    protector, artifact = wb.artifact(spec)
    x = digits.test_x[:5]
    for mode in protector.modes:
        art = Artifact(json.loads(json.dumps(artifact.meta)), dict(artifact.files))
        try:
            protector.onnx_build(art, runner.key, wb.factory(), mode, x[:1])
        except NotSupported as exc:
            assert str(exc).startswith("n/a")
            continue
        art.seal(runner.key)
        with torch.no_grad():
            ref = protector.deploy(art, runner.key, wb.factory(), mode)(x.clone()).numpy()
        got = protector.onnx_load(art, runner.key, mode)(np.ascontiguousarray(x.numpy()))
        np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=f"{name} {mode}")


# -- the fast contract: every protector and every attack on tiny synthetic inputs, nothing trained ------------------

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
#: LeNet-5 on 8×8 inputs (digits' size): every built-in runs on it in milliseconds
FACTORY = models.factory("lenet5", 1, 8, 10, seed=0)
X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
#: small settings where a protector's defaults cost seconds even without training (Paillier keys, NNSplitter's
#: search trials, AdvParams' steps); the layout of what they build is the same
FAST_PROTECTOR = {"he-paillier": {"keysize": 1024, "sample": 8},
                  "nnsplitter": {"trials": 1, "epochs": 1, "max_batches": 1}, "advparams": {"layers": 2, "steps": 2}}
FAST_ATTACK = {**FAST, "guesses": 2, "stats_samples": 20, "passes": 1, "max_evals": 20, "z": [4.0, 8.0]}
#: an attack whose run is too slow for the fast loop goes here (its case is marked slow); none is today
SLOW_ATTACKS: set[str] = set()
PROTECTOR_CASES = sorted(set(NAMES) | {PLUGIN})


def protector_case(name):
    return pytest.param(name, marks=pytest.mark.skipif(
        name not in NAMES, reason=f"the example plugin {name!r} is not installed (pip install -e examples/{name})"))


def attack_case(name):
    return pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_ATTACKS else [])


def fast_protector(name):
    return protectors.get(name, **fast_params(protectors.protectors, name, FAST_PROTECTOR.get(name, {})))


@functools.cache
def latency_artifact(name):
    """The protector and its latency artifact (synthetic data, nothing trained), built once per session."""
    p = fast_protector(name)
    art = p.protect_for_latency(FACTORY(), latency_context(FACTORY, X[:1], 10, secret_seed=7), KEY)
    return p, art


def outputs(model, x=X):
    with torch.no_grad():
        return model(x.clone())


#: what the fast contract's thief is granted: a small oracle (probabilities) and an unlabeled pool
GRANTS = Grants(oracle="probs", queries=40, unlabeled=0.2)


def thief_context(device=None):
    """The thief on synthetic data, with a trainer that trains nothing: the attack's own code is what runs. With
    ``device`` (the authorized model), the run grants a counted oracle on it."""
    gen = torch.Generator().manual_seed(1)
    tx, ty = torch.randn(60, 1, 8, 8, generator=gen), torch.arange(60) % 10
    oracle = Oracle(device, GRANTS.queries, GRANTS.oracle) if device is not None else None
    return ThiefContext(trainer=NoTraining(), thief_data=lambda f, seed: stratified_subset(tx, ty, f, seed),
                        loader=lambda x, y, seed: [(x, y)], num_classes=10,
                        lock_sites=latency_context(FACTORY, X[:1], 10, secret_seed=7).lock_sites, seed=0,
                        recipe=ThiefRecipe(max_epochs=1, lrs=(1e-3,)), grants=GRANTS, oracle=oracle,
                        unlabeled_pool=lambda seed: tx[:12])


@pytest.mark.parametrize("name", [protector_case(n) for n in PROTECTOR_CASES])
def test_fast_protector_contract(name, tmp_path):
    p, built = latency_artifact(name)
    cls = protectors.protectors.get(name)
    assert p.name == name and isinstance(built, Artifact) and built.meta["protector"] == name
    assert isinstance(cls.secret_kind, str) and cls.modes and len(set(cls.modes)) == len(cls.modes)
    decl = p.declaration()
    assert decl["secret_kind"] == cls.secret_kind and decl["modes"] == list(cls.modes)
    assert set(p.host_memory_modes) <= set(p.modes)

    # What is written is what is declared: JSON, safetensors, ONNX or AES-GCM blobs of those; never a pickle.
    path = built.save(tmp_path / name)
    seen = assert_safe_files(path, KEY)
    assert seen["meta.json"] == "json" and len(seen) == len(built.files) + 1
    art = Artifact.load(path)

    # Deploy in every mode: the authorized model, in eval mode, the same function whatever the mode.
    deployed = {}
    for mode in p.modes:
        model = p.deploy(art, KEY, FACTORY, mode)
        assert isinstance(model, nn.Module) and not model.training, mode
        out = outputs(model)
        assert out.shape == (len(X), 10) and torch.isfinite(out).all(), mode
        deployed[mode] = out
    default = deployed[p.modes[0]]
    for mode, out in deployed.items():
        torch.testing.assert_close(out, default, rtol=1e-4, atol=1e-4, msg=f"{name}: mode {mode} vs {p.modes[0]}")
    torch.testing.assert_close(outputs(p.deploy(art, KEY, FACTORY)), default, rtol=0, atol=0)  # None: first mode
    with pytest.raises(ConfigError, match="unknown mode"):
        p.deploy(art, KEY, FACTORY, "no-such-mode")
    with pytest.raises(KeyMaterialError, match="wrong key"):
        p.deploy(art, OTHER_KEY, FACTORY)

    # The thief's copy runs without the key; the secret re-applied to it gives the authorized model back.
    stolen = p.stolen(art, FACTORY)
    assert isinstance(stolen, nn.Module) and not stolen.training
    assert outputs(stolen).shape == (len(X), 10)
    authorized = p.authorize(copy.deepcopy(stolen), art, KEY)
    if authorized is None:
        assert cls.secret_kind == "encrypted-weights", "only whole-model encryption may leave nothing to re-apply"
    else:
        torch.testing.assert_close(outputs(authorized), default, rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyMaterialError, match="wrong key"):
        p.authorize(copy.deepcopy(stolen), art, OTHER_KEY)

    # The secret: bytes under encryption exactly where there is a secret, a finite keyspace.
    secret, bits = p.secret_bytes(art), p.keyspace_bits(art)
    assert isinstance(secret, int) and (secret > 0) == (cls.secret_kind != "none"), secret
    assert math.isfinite(bits) and bits >= 0 and (bits == 0 if cls.secret_kind == "none" else True)

    # A tampered file is refused on the device and on the thief's load path alike.
    victim = sorted(art.files)[0]
    bad = copy.deepcopy(art)
    bad.files[victim] = bytes([bad.files[victim][0] ^ 1]) + bad.files[victim][1:]
    for load in (lambda a: p.deploy(a, KEY, FACTORY), lambda a: p.stolen(a, FACTORY)):
        with pytest.raises(ArtifactError, match=victim):
            load(bad)


@pytest.mark.parametrize("attack_name", [attack_case(n) for n in ATTACKS])
def test_fast_attack_contract(attack_name):
    """Every attack states for every protector whether it applies, declares its cells, and runs on each protector
    it applies to; the true secret then re-applies to the attacked copy, as the harness asks (auth_acc_after)."""
    cls = attacks.attacks.get(attack_name)
    assert cls().cells() and all(isinstance(c, str) and c for c in cls().cells())
    attack = attacks.get(attack_name, **fast_params(attacks.attacks, attack_name, FAST_ATTACK))
    cells = attack.cells()
    assert cells and len(set(cells)) == len(cells) and all(isinstance(c, str) and c for c in cells)
    ran = []
    for name in NAMES:
        p, art = latency_artifact(name)
        why = attack.not_applicable(p, art, GRANTS)
        assert why is None or (isinstance(why, str) and why.startswith("n/a: ")), (name, why)
        if why is not None:
            continue
        for cell in cells:
            if attack.not_applicable(p, art, GRANTS, cell) is not None:
                continue
            ctx = thief_context(p.deploy(art, KEY, FACTORY))
            torch.manual_seed(0)
            out = attack.run(Loot(art, p, FACTORY), ctx, cell)
            where = f"{attack_name} {cell} on {name}"
            assert isinstance(out, Outcome) and out.param == cell, where
            assert isinstance(out.model, nn.Module), where
            fraction, epochs = out.budget
            assert 0.0 <= fraction <= 1.0 and isinstance(epochs, int) and epochs >= 0, (where, out.budget)
            assert out.val_acc is None or 0.0 <= out.val_acc <= 1.0, where
            assert outputs(out.model).shape == (len(X), 10), where
            try:
                authorized = p.authorize(out.model, art, KEY, pruned=out.pruned)
            except NotApplicable as exc:
                pytest.fail(f"{where}: the secret does not re-apply: {exc}")
            if authorized is None:
                assert p.secret_kind == "encrypted-weights", where
            else:
                assert outputs(authorized).shape == (len(X), 10), where
            if out.guess is not None:
                assert isinstance(p.compare_secret(art, KEY, out.guess), dict), where
            json.dumps(out.extra)  # goes into a JSON record as it is
            assert ctx.oracle.used <= GRANTS.queries, where
        ran.append(name)
    assert ran or attack.secret_kinds, f"{attack_name} applies to no registered protector"
