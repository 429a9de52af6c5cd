import json

import numpy as np
import pytest
import torch

import protectors
from bench import models, profiler
from bench.targets import SOFT_AES_MASK, targets
from protectors.core.artifact import Artifact
from protectors.core.base import latency_context
from protectors.core.lock import MaskedSite

KEY = bytes(range(32))
X1 = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def lenet():
    return models.factory("lenet5", 1, 28, 10, 0)


def latency_artifact(p, lenet, mode=None):
    art = p.protect_for_latency(lenet(), latency_context(lenet, X1, 10, secret_seed=7), KEY)
    if mode is not None:
        p.onnx_build(art, KEY, lenet, mode, X1)
        art.seal(KEY)
    return art


@pytest.mark.parametrize("name,mode", [("none", "default"), ("aes", "load"), ("aes", "per-inference"),
                                       ("edgepro", "mask"), ("edgepro", "fold")])
def test_onnx_deployment_matches_torch(lenet, name, mode, tmp_path):
    p = protectors.get(name)
    art = Artifact.load(latency_artifact(p, lenet, mode).save(tmp_path / "a"))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = p.deploy(art, KEY, lenet, None if mode == "default" else mode)(x.clone()).numpy()
    run = p.onnx_load(art, KEY, mode)
    np.testing.assert_allclose(run(x.numpy()), ref, atol=1e-5)
    np.testing.assert_allclose(run(x[:1].numpy()), ref[:1], atol=1e-5)  # batch is dynamic
    if name == "edgepro":
        # The password is not baked into the ONNX file (the mask graph takes the masks as inputs, fold scales the
        # weights at load): no encoding a baked-in password would have is in it, nor in any other plaintext file of
        # the artifact (the control is the test below).
        pw = p.password(art, KEY)
        assert "model.onnx" in art.files
        for fname in sorted(set(art.files) - set(art.secret_files)):
            assert baked_password(art.files[fname], pw) == [], fname
        if mode == "mask":  # one graph input; each site's mask an initializer with no value in the file
            import onnx

            from protectors.core.onnx_runtime import IN_MEMORY

            graph = onnx.load_from_string(art.files["model.onnx"]).graph
            assert [i.name for i in graph.input] == ["x"]
            secret = [i for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
            assert len(secret) == len(pw.neurons) and all(not i.raw_data for i in secret)
            assert all(dict((e.key, e.value) for e in i.external_data)["location"] == IN_MEMORY for i in secret)


def password_encodings(pw) -> dict[str, bytes]:
    """The byte strings a file would hold if the password were in it: each site's mask as a float32 tensor (how ONNX
    stores an initializer or a Constant: raw little-endian) or float64, the authorization neurons' indices as int64 or
    int32 (a Gather/ScatterND constant), and the password's own serialization. Strings under 32 bytes are left out:
    they occur in any graph by chance (a 1-neuron index, a 6-wide mask)."""
    out = {"serialized": pw.to_bytes()}
    for site, neurons in pw.neurons.items():
        mask = pw.mask(site).numpy()
        out |= {f"{site} mask float32": mask.astype("<f4").tobytes(),
                f"{site} mask float64": mask.astype("<f8").tobytes(),
                f"{site} neurons int64": np.asarray(neurons, "<i8").tobytes(),
                f"{site} neurons int32": np.asarray(neurons, "<i4").tobytes()}
    return {k: v for k, v in out.items() if len(v) >= 32}


def baked_password(blob: bytes, pw) -> list[str]:
    """Which of the password's encodings occur in ``blob``."""
    return [k for k, v in password_encodings(pw).items() if v in blob]


def test_the_password_search_finds_a_baked_in_password(lenet):
    """Positive control of the search above: the authorized mask model exported whole (the mistake the mask graph
    avoids) holds the masks as constants, and the search finds them; it finds the serialized password too."""
    from protectors.core import onnx_runtime

    p = protectors.get("edgepro")
    art = latency_artifact(p, lenet)
    pw = p.password(art, KEY)
    assert {"relu3 mask float32", "relu4 mask float32", "relu3 neurons int64"} <= set(password_encodings(pw))
    baked = onnx_runtime.export(p.deploy(art, KEY, lenet, "mask"), X1)
    assert {"relu3 mask float32", "relu4 mask float32"} <= set(baked_password(baked, pw))
    assert baked_password(b"header" + pw.to_bytes() + b"trailer", pw) == ["serialized"]
    assert baked_password(onnx_runtime.export(lenet(), X1), pw) == []  # and nothing in an unrelated graph


def test_onnx_deploy_file_tamper_detected(lenet, tmp_path):
    p = protectors.get("none")
    path = latency_artifact(p, lenet, "default").save(tmp_path / "a")
    data = bytearray((path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(protectors.ArtifactError, match="model.onnx: SHA-256 mismatch"):
        Artifact.load(path)


def test_edgepro_mask_deploy_is_one_inplace_mul_per_site(lenet):
    """Each site is a MaskedSite; after the first call, a call is the activation plus exactly one in-place mul."""
    p = protectors.get("edgepro")
    art = latency_artifact(p, lenet)
    dep = p.deploy(art, KEY, lenet, "mask")
    sites = [mod for mod in dep.modules() if isinstance(mod, MaskedSite)]
    assert len(sites) == 4
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        first = dep(x.clone())
    ops = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            ops.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        out = sites[0](torch.randn(1, 6, 28, 28))
    assert ops.count("mul_") == 1 and not [o for o in ops if o in ("mul", "__mul__", "where", "clone")], ops
    assert out.data_ptr() != 0
    with torch.no_grad():
        torch.testing.assert_close(dep(x.clone()), first)  # the in-place path gives the first call's output
    pw = p.password(art, KEY)
    relu1 = torch.relu(torch.randn(1, 6, 28, 28))
    with torch.no_grad():
        torch.testing.assert_close(sites[0](relu1.clone()), relu1 * pw.mask("relu1").view(1, -1, 1, 1))


def test_targets_registered_and_cuda_skips_cleanly():
    assert {"torch-cpu-1t", "torch-cpu", "onnxruntime-cpu-1t", "cuda", "torch-cpu-1t-soft-aes", "onnxruntime-int8-1t",
            "torch-int8-1t"} <= set(targets.names())
    cuda = targets.get("cuda")()
    if not torch.cuda.is_available():
        assert "no CUDA" in cuda.unavailable()
    assert targets.get("torch-cpu-1t-soft-aes").env == {"OPENSSL_ia32cap": SOFT_AES_MASK}


@pytest.mark.slow
def test_profile_run_writes_overhead_records(tmp_path):
    from bench import config
    from bench.runner import Runner

    cfg_path = tmp_path / "p.toml"
    cfg_path.write_text("""
datasets = ["digits"]
[[protectors]]
name = "edgepro"
[profile]
targets = ["torch-cpu-1t", "cuda"]
models = ["lenet5"]
min_queries = 20
min_seconds = 0.0
warmup = 2
throughput_batch = 4
""")
    cfg = config.load(str(cfg_path))
    runner = Runner(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    assert profiler.run_config(runner) == 6  # 3 variants x 2 targets (cuda: one "skipped" record each)
    recs = [json.loads(p.read_text()) for p in (tmp_path / "run" / "records").glob("*.json")]
    cpu = {(r["cell"]["protector"], r["cell"]["mode"]): r["result"] for r in recs
           if r["cell"]["target"] == "torch-cpu-1t"}
    assert set(cpu) == {("none", "default"), ("edgepro", "mask"), ("edgepro", "fold")}
    for res in cpu.values():
        assert res["queries"] >= 20 and 0 < res["p50_ms"] <= res["p90_ms"] <= res["p99_ms"]
        assert res["cold_start_ms"] > 0 and res["overhead"] > 0
    assert cpu[("none", "default")]["overhead"] == 1.0
    for mode in ("mask", "fold"):  # every ratio carries its bootstrap interval and why measuring stopped
        r = cpu[("edgepro", mode)]
        assert r["overhead_ci_low"] <= r["overhead"] <= r["overhead_ci_high"]
        assert r["overhead_ci_stop"].startswith(("converged", "time cap"))
    if not torch.cuda.is_available():
        assert all("no CUDA" in r["result"]["note"] for r in recs if r["cell"]["target"] == "cuda")


def test_bootstrap_interval_narrows_with_more_rounds():
    rng = np.random.default_rng(0)
    few = profiler.bootstrap_median_ci(1.05 + 0.05 * rng.standard_normal(50))
    many = profiler.bootstrap_median_ci(1.05 + 0.05 * rng.standard_normal(5000))
    assert few[0] < 1.05 < few[1] and many[0] < 1.05 < many[1]
    assert many[1] - many[0] < (few[1] - few[0]) / 4


@pytest.mark.slow
def test_a_mode_that_does_not_apply_to_a_model_is_a_row_that_says_why(tmp_path):
    """EdgePro's fold on ResNet-18 (no foldable producer at a residual stage): an n/a row, not a failed profile."""
    from bench import config
    from bench.runner import Runner

    cfg_path = tmp_path / "p.toml"
    cfg_path.write_text("""
datasets = []
[[protectors]]
name = "edgepro"
[profile]
targets = ["torch-cpu-1t"]
models = ["resnet18"]
min_queries = 5
min_seconds = 0.0
max_seconds = 0.5
warmup = 1
throughput_batch = 2
""")
    runner = Runner(config.load(str(cfg_path)), tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    assert profiler.run_config(runner) == 3
    recs = {r["cell"]["mode"]: r["result"] for r in (json.loads(p.read_text())
                                                     for p in (tmp_path / "run" / "records").glob("*.json"))
            if r["cell"]["protector"] == "edgepro"}
    assert recs["fold"]["note"].startswith("n/a") and "no foldable producer" in recs["fold"]["note"]
    assert recs["mask"]["overhead"] > 0
