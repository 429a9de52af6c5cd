"""The plugin contract, for every registered protector (built-ins, peers, and the installed example plugin).

One harness run over all of them, as a user's config would run them: protect on digits → deploy in every mode →
stolen copy → every applicable attack (authorize re-applies the secret afterwards) → profile on ``torch-cpu-1t``
and ``onnxruntime-cpu-1t``. Then, per protector: authorized accuracy near clean, stolen accuracy near chance where
the protector claims it, a non-zero secret where there is one, ONNX outputs equal to PyTorch outputs.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

import attacks
import protectors
from bench import config
from bench.runner import Runner
from protectors.core.artifact import Artifact
from protectors.core.onnx_runtime import NotSupported

pytestmark = pytest.mark.slow

#: small budgets for every attack parameter that exists (the contract is what runs, not how well)
FAST = {"epochs": 1, "fractions": [0.05], "fraction": 0.05, "ratios": [0.3], "finetune_epochs": 1, "guesses": 3,
        "scratch_epochs": 1, "stats_samples": 200, "z": [4.0], "steps": 3, "key_guesses": 3}
NAMES = sorted(protectors.protectors.names())


def fast_params(registry, name):
    fields = {f.name for f in dataclasses.fields(registry.get(name).Params)}
    return {k: v for k, v in FAST.items() if k in fields}


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


@pytest.mark.parametrize("name", NAMES)
def test_profiled_on_torch_and_onnxruntime(contract_run, name):
    _, records = contract_run
    modes = protectors.protectors.get(name).modes
    recs = {(r["cell"]["mode"], r["cell"]["target"]): r["result"] for r in of(records, "profile", name)}
    assert set(recs) == {(m, t) for m in modes for t in ("torch-cpu-1t", "onnxruntime-cpu-1t")}
    for (mode, target), res in recs.items():
        assert res.get("p50_ms", 0) > 0 or res["note"].startswith("n/a"), (mode, target, res)
    assert any(res.get("p50_ms", 0) > 0 for (m, t), res in recs.items() if t == "onnxruntime-cpu-1t"), recs


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
