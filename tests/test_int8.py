"""int8 deployments: ONNX Runtime static QDQ quantization of each protector's own graph, PyTorch FX quantization."""

import numpy as np
import onnx
import pytest
import torch

import protectors
from bench import models
from bench.quantize import OrtInt8, int8_accuracies, ort_int8_runner, torch_int8
from bench.targets import targets
from protectors.core.base import latency_context

KEY = bytes(range(32))
X1 = torch.zeros(1, 1, 28, 28)
CALIB = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def lenet():
    return models.factory("lenet5", 1, 28, 10, 0)


def built(name, mode, lenet):
    p = protectors.get(name)
    art = p.protect_for_latency(lenet(), latency_context(lenet, X1, 10, secret_seed=7), KEY)
    p.onnx_build(art, KEY, lenet, mode, X1)
    art.seal(KEY)
    return p, art


def test_edgepro_mask_int8_keeps_the_secret_out_of_the_quantized_graph(lenet):
    p, art = built("edgepro", "mask", lenet)
    quant = OrtInt8(CALIB)
    run = ort_int8_runner(lambda: p.onnx_load(art, KEY, "mask"), quant)
    x = torch.randn(8, 1, 28, 28).numpy()
    float_out = p.onnx_load(art, KEY, "mask")(x)
    out = run(x)
    assert np.corrcoef(out.ravel(), float_out.ravel())[0, 1] > 0.95  # int8 is close to float32
    np.testing.assert_allclose(run.floor()(x), out, atol=1e-6)  # the floor is the same int8 graph, secrets baked
    (graph, secrets), = [v for v in quant.cache.values() if v[1]]
    proto = onnx.load_from_string(graph)
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    assert {"rest_0_quantized", "rest_0_scale"} <= set(secrets)
    for name in secrets:  # the secret's int8 tensors are supplied at session creation, not stored
        assert not [i for i in proto.graph.initializer if i.name == name and i.raw_data]
    pw = p.password(art, KEY)
    for site in pw.neurons:
        mask = pw.mask(site).numpy()
        assert len(mask) < 32 or mask.astype("<f4").tobytes() not in graph


def test_per_inference_decryption_has_no_int8_form(lenet):
    p, art = built("aes", "per-inference", lenet)
    with pytest.raises(protectors.NotApplicable, match="per-inference decryption"):
        ort_int8_runner(lambda: p.onnx_load(art, KEY, "per-inference"), OrtInt8(CALIB))
    target = targets.get("torch-int8-1t")()
    target.prepare(p, art, KEY, lenet, "per-inference", CALIB)
    with pytest.raises(NotImplementedError, match="n/a: aes per-inference"):
        target.load(p, art, KEY, lenet, "per-inference")


def test_torch_int8_quantizes_the_model_and_keeps_lock_sites_float(lenet):
    p, art = built("edgepro", "mask", lenet)
    dep = p.deploy(art, KEY, lenet, "mask")
    q = torch_int8(dep, CALIB)
    assert any("quantized" in type(m).__module__ for m in q.modules())
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        a, b = q(x), dep(x)
    assert np.corrcoef(a.numpy().ravel(), b.numpy().ravel())[0, 1] > 0.95


def test_int8_accuracies_reports_every_mode_and_the_stolen_copy(lenet):
    p = protectors.get("edgepro")
    art = p.protect_for_latency(lenet(), latency_context(lenet, X1, 10, secret_seed=7), KEY)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    out = int8_accuracies(p, art, KEY, lenet, CALIB, x, y)
    assert set(out["int8_auth_acc"]) == {"mask", "fold"} == set(out["float_auth_acc"])
    for v in [*out["int8_auth_acc"].values(), *out["float_auth_acc"].values(), out["int8_stolen_acc"],
              out["stolen_acc"]]:
        assert v is None or 0 <= v <= 1
    assert out["int8_auth_acc"]["mask"] is not None


RUN_CFG = """
name = "q"
datasets = ["digits"]
seeds = [0]
int8_accuracy = true
[train]
epochs = 2
[[protectors]]
name = "none"
[[protectors]]
name = "edgepro"
"""


def test_a_run_with_int8_accuracy_records_a_quantized_cell_per_protector(tmp_path):
    import json

    from bench import config
    from bench.runner import Runner

    p = tmp_path / "q.toml"
    p.write_text(RUN_CFG)
    cfg = config.load(str(p))
    assert cfg.int8_accuracy
    Runner(cfg, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False, profile=False).run()
    recs = [json.loads(f.read_text()) for f in (tmp_path / "out" / "records").glob("*.json")]
    quant = {r["cell"]["label"]: r["result"] for r in recs if r["cell"]["kind"] == "quantized"}
    assert set(quant) == {"none", "edgepro"}
    eff = {r["cell"]["label"]: r["result"] for r in recs if r["cell"]["kind"] == "effectiveness"}
    edge = quant["edgepro"]
    assert edge["mode"] == "mask" and 0 <= edge["int8_auth_acc"] <= 1
    # the float ONNX deployment is the torch one, up to float rounding; the stolen copy is the effectiveness cell's
    assert abs(edge["float_auth_acc"] - eff["edgepro"]["auth_acc_by_mode"]["mask"]) <= 0.01
    assert edge["int8_loss"] == pytest.approx(edge["float_auth_acc"] - edge["int8_auth_acc"])
    table = (tmp_path / "out" / "tables" / "quantized.csv").read_text().splitlines()
    assert table[0].startswith("dataset,model,protector,mode,float_auth_acc,int8_auth_acc,int8_loss")
    assert len(table) == 3


def test_int8_accuracy_must_be_a_boolean(tmp_path):
    from bench import config
    from protectors.core.errors import ConfigError

    p = tmp_path / "q.toml"
    p.write_text(RUN_CFG.replace("int8_accuracy = true", 'int8_accuracy = "yes"'))
    with pytest.raises(ConfigError, match="int8_accuracy: must be true or false"):
        config.load(str(p))
