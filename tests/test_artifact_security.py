"""Deliberate substitution, replay and damage of artifact files, on every load path of every built-in protector."""

import copy
import json
import random

import numpy as np
import pytest
import torch

import protectors
from bench import models
from protectors.core.artifact import FORMAT, Artifact
from protectors.core.base import latency_context
from protectors.core.errors import BenchError
from protectors.core.hashing import sha256_hex

KEY = bytes(range(32))
X1 = torch.zeros(1, 1, 28, 28)
BUILTINS = [("none", "default"), ("aes", "load"), ("aes", "per-inference"), ("edgepro", "mask"), ("edgepro", "fold")]


@pytest.fixture(scope="module")
def lenet():
    return models.factory("lenet5", 1, 28, 10, 0)


def build(name, mode, lenet, seed=7):
    p = protectors.get(name)
    art = p.protect_for_latency(lenet(), latency_context(lenet, X1, 10, secret_seed=seed), KEY)
    p.onnx_build(art, KEY, lenet, mode, X1)
    art.seal(KEY)
    return p, art


def load_paths(p, lenet, mode):
    """Every way the suite reads an artifact: the device (torch and ONNX Runtime), the harness, the thief."""
    return {
        "deploy": lambda a: p.deploy(a, KEY, lenet, None if mode == "default" else mode)(X1),
        "onnx": lambda a: p.onnx_load(a, KEY, mode)(X1.numpy()),
        "authorize": lambda a: p.authorize(lenet(), a, KEY),
        "stolen": lambda a: p.stolen(a, lenet),
    }


def forge(art: Artifact) -> Artifact:
    """Fix up the unkeyed metadata checksum, as an attacker who can write the storage would."""
    art.meta["checksum"] = art._checksum()
    return art


def rewrite(art: Artifact, name: str, data: bytes) -> Artifact:
    """Replace a file *and* fix up its recorded hash and the metadata checksum."""
    out = copy.deepcopy(art)
    out.files[name] = data
    out.meta["files"][name]["sha256"] = sha256_hex(data)
    return forge(out)


@pytest.mark.parametrize("name,mode", BUILTINS)
def test_every_file_damaged_or_truncated_fails_on_every_load_path(name, mode, lenet, tmp_path):
    """A seeded property test: random bit flips and truncations of every file, through disk, on every path."""
    p, art = build(name, mode, lenet)
    path = art.save(tmp_path / "a")
    rng = random.Random(f"{name}{mode}")
    for fname in sorted(art.files) + ["meta.json"]:
        original = (path / fname).read_bytes()
        variants = [original[: rng.randrange(len(original))], b""]
        for _ in range(3):
            b = bytearray(original)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            variants.append(bytes(b))
        for data in variants:
            (path / fname).write_bytes(data)
            for what, run in load_paths(p, lenet, mode).items():
                with pytest.raises(BenchError) as exc:
                    run(Artifact.load(path))
                msg = str(exc.value)
                assert "\n" not in msg and ("a/" in msg or str(path) in msg), (fname, what, msg)
        (path / fname).write_bytes(original)
    for run in load_paths(p, lenet, mode).values():  # and the restored artifact loads again
        run(Artifact.load(path))


@pytest.mark.parametrize("name,mode", BUILTINS)
def test_files_swapped_in_from_another_artifact_are_named(name, mode, lenet):
    """Two artifacts of the same architecture under the same key: any file of one, with its hash, in the other."""
    p, a = build(name, mode, lenet, seed=1)
    _, b = build(name, mode, lenet, seed=2)
    for fname in a.files:
        if a.files[fname] == b.files[fname]:
            continue  # identical bytes (e.g. the same untrained weights): nothing was swapped
        swapped = rewrite(a, fname, b.files[fname])
        swapped.meta["files"][fname]["mac"] = b.meta["files"][fname]["mac"]  # and b's MAC for it
        forge(swapped)
        with pytest.raises(protectors.ArtifactError, match=rf"{fname}: not authenticated by the key"):
            p.deploy(swapped, KEY, lenet, None if mode == "default" else mode)
        with pytest.raises(protectors.ArtifactError, match=rf"{fname}: not authenticated by the key"):
            p.onnx_load(swapped, KEY, mode)


def test_aes_ciphertext_swap_between_artifacts_detected(lenet):
    """The reported bypass: model.enc of one AES artifact dropped into another of the same architecture."""
    p, a = build("aes", "load", lenet)
    _, b = build("aes", "load", lenet)
    public = ("artifact_id", "files", "mac", "checksum")
    assert {k: v for k, v in a.meta.items() if k not in public} == {k: v for k, v in b.meta.items() if k not in public}
    whole = copy.deepcopy(a)
    whole.files["model.enc"] = b.files["model.enc"]
    whole.meta["files"]["model.enc"] = b.meta["files"]["model.enc"]
    forge(whole)
    with pytest.raises(protectors.ArtifactError, match="model.enc: not authenticated by the key"):
        p.deploy(whole, KEY, lenet, "load")
    # Even with the manifest bypassed, AES-GCM's associated data binds the blob to its artifact.
    with pytest.raises(protectors.ArtifactError, match="model.enc: authentication failed"):
        whole.decrypt("model.enc", KEY)


def test_replaced_onnx_graphs_are_rejected(lenet):
    """A per-inference graph that just outputs a weight input, and a replaced EdgePro mask graph."""
    from onnx import TensorProto, helper

    p, art = build("aes", "per-inference", lenet)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])
    w = helper.make_tensor_value_info("rest_0", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    leak = helper.make_model(helper.make_graph([helper.make_node("Flatten", ["rest_0"], ["logits"])], "leak",
                                              [x, w], [y]))
    evil = rewrite(art, "graph.onnx", leak.SerializeToString())
    with pytest.raises(protectors.ArtifactError, match="graph.onnx: not authenticated by the key"):
        p.onnx_load(evil, KEY, "per-inference")
    p, art = build("edgepro", "mask", lenet)
    _, other = build("none", "default", lenet)
    evil = rewrite(art, "model.onnx", other.files["model.onnx"])
    with pytest.raises(protectors.ArtifactError, match="model.onnx: not authenticated by the key"):
        p.onnx_load(evil, KEY, "mask")


def test_renamed_added_removed_files_and_metadata(lenet, tmp_path):
    p, art = build("edgepro", "mask", lenet)
    renamed = rewrite(art, "weights.safetensors", art.files["password.enc"])
    with pytest.raises(protectors.ArtifactError, match="weights.safetensors: not authenticated"):
        p.deploy(renamed, KEY, lenet)
    path = art.save(tmp_path / "a")
    (path / "extra.bin").write_bytes(b"x")
    with pytest.raises(protectors.ArtifactError, match="extra.bin: not in the artifact's manifest"):
        Artifact.load(path)
    (path / "extra.bin").unlink()
    (path / "password.enc").unlink()
    with pytest.raises(protectors.ArtifactError, match="password.enc: missing from the artifact"):
        Artifact.load(path)
    gone = copy.deepcopy(art)
    del gone.files["password.enc"], gone.meta["files"]["password.enc"]
    forge(gone)
    with pytest.raises(protectors.ArtifactError, match="meta.json: metadata not authenticated"):
        p.deploy(gone, KEY, lenet)
    public = copy.deepcopy(art)
    public.meta["params"]["gamma"] = 0.9  # what the guessing attacks read
    forge(public)
    with pytest.raises(protectors.ArtifactError, match="meta.json: metadata not authenticated"):
        p.deploy(public, KEY, lenet)


def test_old_format_gets_a_clear_error(lenet, tmp_path):
    _, art = build("none", "default", lenet)
    path = art.save(tmp_path / "a")
    meta = json.loads((path / "meta.json").read_text())
    meta["format"] = "edgepro-bench-artifact/1"
    (path / "meta.json").write_text(json.dumps(meta))
    old = r"format 'edgepro-bench-artifact/1' is not supported"
    with pytest.raises(protectors.ArtifactError, match=rf"{old}.*{FORMAT}"):
        Artifact.load(path)


@pytest.mark.slow
def test_password_not_reproducible_from_public_inputs(clean_lenet, digits, lenet_factory, key, other_key):
    """The public config (seed, parameters) plus the clean model do not give the password; the key does."""
    from conftest import make_context

    from protectors.core.crypto import secret_seed
    from protectors.core.kinds.neuron_mask import rank_neurons, select_neurons

    ep = protectors.get("edgepro")

    def password(k, ctx_key=b"artifact-1"):
        ctx = make_context(digits, lenet_factory, None, seed=0, secret_seed=secret_seed(k, ctx_key))
        return ep.choose_password(clean_lenet, ctx)

    mine = password(key)
    assert password(key) == mine  # reproducible for whoever holds the key
    assert password(other_key).neurons != mine.neurons
    assert password(key, b"artifact-2").neurons != mine.neurons
    # What a thief can compute from the public seed (0) and the clean model, the way the old code drew it:
    ranks = rank_neurons(clean_lenet, mine.neurons, digits.train_x[:200])
    for seed in range(20):
        rng = np.random.default_rng(seed)
        public = {s: select_neurons(ranks[s], 0.1, 0.3, rng) for s in mine.neurons}
        assert public != mine.neurons
