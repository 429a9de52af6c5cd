"""In-graph secrets supplied at session creation, and their design floor (the same graph, secrets as constants)."""

import json

import numpy as np
import onnx
import pytest
import torch

import protectors
from bench import models, profiler
from protectors.core import onnx_runtime
from protectors.core.base import latency_context

KEY = bytes(range(32))
X1 = torch.zeros(1, 1, 28, 28)
IN_GRAPH = [("edgepro", "mask"), ("hpnn", "key"), ("nnsplitter", "tee")]


@pytest.fixture(scope="module")
def lenet():
    return models.factory("lenet5", 1, 28, 10, 0)


def built(name, mode, lenet):
    p = protectors.get(name)
    art = p.protect_for_latency(lenet(), latency_context(lenet, X1, 10, secret_seed=7), KEY)
    p.onnx_build(art, KEY, lenet, mode, X1)
    art.seal(KEY)
    return p, art


@pytest.mark.parametrize("name,mode", IN_GRAPH)
def test_secret_supplied_at_session_creation_equals_its_floor_and_torch(lenet, name, mode):
    p, art = built(name, mode, lenet)
    graph = onnx.load_from_string(art.files["model.onnx"]).graph
    assert [i.name for i in graph.input] == ["x"]  # nothing is fed per run but the input
    spec = json.loads(art.files[onnx_runtime.SECRETS])
    valueless = {i.name for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL and not i.raw_data}
    assert set(spec["inputs"]) == valueless and valueless
    run = p.onnx_load(art, KEY, mode)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        want = p.deploy(art, KEY, lenet, mode)(x.clone()).numpy()
    np.testing.assert_allclose(run(x.numpy()), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(run.floor()(x.numpy()), want, atol=1e-5, rtol=1e-5)


def test_the_graph_file_alone_does_not_run(lenet):
    """Without the secrets ONNX Runtime refuses the graph (the valueless initializers point at no file)."""
    _, art = built("edgepro", "mask", lenet)
    with pytest.raises(protectors.ArtifactError, match="rejected by ONNX Runtime"):
        onnx_runtime.session(art.files["model.onnx"], 1)


def test_a_secret_of_the_wrong_shape_is_one_clear_error(lenet):
    p, art = built("edgepro", "mask", lenet)
    with pytest.raises(protectors.ArtifactError, match="does not fit its graph initializer"):
        onnx_runtime.load_secret_graph(art, {s: np.ones(3, np.float32) for s in ("relu1", "relu2", "relu3", "relu4")},
                                       1)


def test_floor_columns_ratio_and_interval():
    rng = np.random.default_rng(0)
    base = 1 + 0.01 * rng.standard_normal(400)
    floor = 1.1 * base
    cols = profiler._floor_columns(1.1 * floor, floor, base, None)
    assert cols["floor_overhead"] == pytest.approx(1.1) and cols["vs_floor"] == pytest.approx(1.1)
    assert cols["vs_floor_ci_low"] <= cols["vs_floor"] <= cols["vs_floor_ci_high"]


def test_inference_peak_sees_an_allocation_per_call():
    keep = []
    peak = profiler._inference_peak_mb(lambda x: keep.append(np.ones(1 << 20)), None, calls=4)  # 8 MiB each
    if peak is not None:  # Linux only
        assert peak > 16
