"""NNSplitter (protectors/nnsplitter.py) on digits/LeNet-5: one protection shared by every test (about 3 s).

Measured at the defaults (key-derived seed 12345; 5 trials, 200 batches): clean 0.978, authorized 0.978 in both
modes, stolen 0.37 (over six secret seeds 0.22–0.49, mean 0.37; one trial instead of five: mean 0.49). The paper
reaches chance (10%) on CIFAR-10 ResNet-18 with an RL controller choosing the filters and 17 conv layers to
obfuscate; LeNet-5 has 2 (32 weights at the defaults), so the stolen bound asserted here is a large drop from clean,
not chance.
"""

import copy
import math
import time

import pytest
import torch
from conftest import make_context
from torch import nn

import protectors
import protectors.nnsplitter  # noqa: F401  (registers the protector)
from attacks.prune import PruneChannel
from protectors.core.errors import ConfigError, KeyMaterialError
from protectors.core.kinds.weight_patch import Patch, WeightPatch
from protectors.nnsplitter import (
    ONNX,
    SECRET,
    NNSplitterProtector,
    TeeConv,
    keyspace_bits,
    layer_correction,
    tee_corrections,
)

MODES = ("restore", "tee")


def acc(trainer, model, splits):
    return trainer.evaluate(model, splits.test_x, splits.test_y)


@pytest.fixture(scope="module")
def protected(clean_lenet, digits, lenet_factory, trainer, key):
    # A context of its own, so the training loader's shuffling does not depend on what other tests drew from it.
    ctx = make_context(digits, lenet_factory, trainer)
    p = protectors.get("nnsplitter")
    start = time.perf_counter()
    art = p.protect(clean_lenet, ctx, key)
    return p, art, time.perf_counter() - start


def test_registered_and_declares():
    assert protectors.protectors.get("nnsplitter") is NNSplitterProtector
    p = protectors.get("nnsplitter")
    assert p.secret_kind == "weight-correction" and p.modes == MODES and p.holds_weights


@pytest.mark.parametrize("mode", MODES)
def test_authorized_equals_clean(protected, clean_lenet, digits, lenet_factory, trainer, key, mode):
    p, art, _ = protected
    dep = p.deploy(art, key, lenet_factory, mode)
    x = digits.test_x[:128]
    with torch.no_grad():
        torch.testing.assert_close(dep(x), clean_lenet(x), atol=1e-4, rtol=1e-5)
    assert abs(acc(trainer, dep, digits) - acc(trainer, clean_lenet, digits)) <= 0.01
    if mode == "tee":  # the convs keep the obfuscated weights: the correction is added per inference
        stolen = p.stolen(art, lenet_factory)
        tees = [m for m in dep.modules() if isinstance(m, TeeConv)]
        assert tees and all(torch.equal(t.conv.weight, stolen.get_submodule(n).weight)
                            for n, t in dep.named_modules() if isinstance(t, TeeConv))
        assert all(len(t.filters) == 1 for t in tees)  # only the affected filter's kernel is convolved


def test_stolen_is_few_weights_in_range_and_much_worse(protected, clean_lenet, digits, lenet_factory, trainer):
    p, art, seconds = protected
    stolen = p.stolen(art, lenet_factory)
    clean_acc, stolen_acc = acc(trainer, clean_lenet, digits), acc(trainer, stolen, digits)
    print(f"nnsplitter digits/lenet5: clean {clean_acc:.3f} stolen {stolen_acc:.3f} protect {seconds:.1f} s "
          f"meta { {k: art.meta[k] for k in ('obfuscated_weights', 'calib_acc_after', 'pinned_at_bounds')} }")
    assert stolen_acc <= clean_acc - 0.4
    changed = 0
    for name, w in clean_lenet.state_dict().items():
        v = stolen.state_dict()[name]
        changed += int((v != w).sum())
        if name.endswith("weight") and w.dim() == 4:  # every obfuscated weight stays inside its layer's range
            assert w.min() <= v.min() and v.max() <= w.max()
        else:
            assert torch.equal(v, w), name  # only conv weights move
    assert 0 < changed <= art.meta["obfuscated_weights"] == 32  # 2 layers × 1 filter × 16 weights


def test_secret_small_encrypted_and_keyed(protected, clean_lenet, lenet_factory, key, other_key):
    p, art, _ = protected
    assert art.secret_files == [SECRET] and 0 < p.secret_bytes(art) < 10_000
    secret = p.secret(art, key)
    assert isinstance(secret, WeightPatch) and sorted(secret.entries) == ["conv1.weight", "conv2.weight"]
    plain = secret.to_bytes()
    assert all(plain not in data for data in art.files.values())
    # The plaintext weights hold obfuscated values at the secret positions, not the originals.
    stolen = p.stolen(art, lenet_factory).state_dict()
    kept = sum(int((stolen[n].view(-1)[s.index] == s.values).sum()) for n, s in secret.entries.items())
    assert kept <= 0.1 * secret.count
    assert "index" not in str(art.meta) and "c" not in art.meta
    with pytest.raises(KeyMaterialError):
        p.deploy(art, other_key, lenet_factory)
    expected = (math.log2(6) + math.log2(math.comb(25, 16)) + math.log2(16) + math.log2(math.comb(150, 16)))
    assert p.keyspace_bits(art) == pytest.approx(expected) == pytest.approx(keyspace_bits(secret))
    assert WeightPatch.from_bytes(plain, "x").entries.keys() == secret.entries.keys()


def test_authorize_fine_tuned_copy(protected, clean_lenet, digits, lenet_factory, trainer, key):
    from bench import data

    p, art, _ = protected
    stolen = p.stolen(art, lenet_factory)
    with torch.no_grad():  # the untouched stolen copy is restored exactly
        torch.testing.assert_close(p.authorize(stolen, art, key)(digits.test_x), clean_lenet(digits.test_x))
    tuned = trainer.fit(copy.deepcopy(stolen), data.BatchLoader(digits.train_x[:300], digits.train_y[:300], 32, 3),
                        epochs=1)
    auth = p.authorize(tuned, art, key)
    assert isinstance(auth, nn.Module) and auth is not tuned
    state = auth.state_dict()
    for name, s in p.secret(art, key).entries.items():
        assert torch.equal(state[name].view(-1)[s.index], s.values)


def test_authorize_channel_pruned_copy(protected, clean_lenet, digits, lenet_factory, trainer, key):
    p, art, _ = protected
    model = p.stolen(art, lenet_factory)
    for w in model.parameters():
        w.requires_grad_(True)
    _, pruned = PruneChannel().prune(model, 0.3, digits.test_x[:1])
    assert model.conv2.weight.shape[:2] != clean_lenet.conv2.weight.shape[:2]
    auth = p.authorize(model, art, key, pruned=pruned)
    assert isinstance(auth, nn.Module)
    # Pruning keeps values: every surviving weight of each conv, obfuscated ones included, is the clean one again.
    out1, out2 = pruned.kept["conv1"], pruned.kept["conv2"]
    torch.testing.assert_close(auth.conv1.weight, clean_lenet.conv1.weight[out1], atol=0, rtol=0)
    torch.testing.assert_close(auth.conv2.weight, clean_lenet.conv2.weight[out2][:, out1], atol=0, rtol=0)
    assert acc(trainer, auth, digits) > acc(trainer, model, digits)


@pytest.mark.parametrize("mode", MODES)
def test_onnx_matches_torch(protected, digits, lenet_factory, key, mode):
    p, art, _ = protected
    art = copy.deepcopy(art)
    x = digits.test_x[:16]
    p.onnx_build(art, key, lenet_factory, mode, x[:1])
    art.seal(key)
    run = p.onnx_load(art, key, mode)
    with torch.no_grad():
        expected = p.deploy(art, key, lenet_factory, mode)(x).numpy()
    torch.testing.assert_close(torch.from_numpy(run(x.numpy())), torch.from_numpy(expected), atol=1e-4, rtol=1e-4)
    if mode == "tee":  # the graph holds the obfuscated weights; ΔW is fed at load, never stored in it
        assert ONNX not in art.secret_files
        for delta, _ in tee_corrections(p.stolen(art, lenet_factory), p.secret(art, key)).values():
            assert delta[delta != 0].numpy().tobytes() not in art.files[ONNX]


@pytest.mark.parametrize("kw", [dict(groups=2, stride=2, padding=1, padding_mode="reflect"),
                                dict(dilation=2, padding=2), dict(groups=6, padding=1)])
def test_tee_conv_equals_the_original_conv(kw):
    """The TEE's correction for grouped, strided, dilated and reflect-padded convs (MobileNet's depthwise ones)."""
    torch.manual_seed(0)
    orig = nn.Conv2d(6, 6, 3, **kw).eval()
    shape = tuple(orig.weight.shape)
    per = math.prod(shape[1:])
    index = torch.tensor([1 * per, 1 * per + 2, 4 * per + per - 1], dtype=torch.int64)
    obf = copy.deepcopy(orig)
    with torch.no_grad():
        obf.weight.view(-1)[index] += torch.tensor([0.5, -0.7, 0.3])
    s = Patch(shape, orig.weight.detach().view(-1)[index].clone(), index)
    delta, filters = layer_correction(obf.weight, s)
    assert filters.tolist() == [1, 4] and delta.shape == (2, *shape[1:])
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(TeeConv(obf, filters, delta)(x), orig(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(obf(x), orig(x))


def test_latency_artifact_has_the_same_layout(clean_lenet, lenet_factory, digits, key):
    ctx = protectors.latency_context(lenet_factory, digits.test_x[:1], 10, secret_seed=7)
    art = protectors.get("nnsplitter").protect_for_latency(clean_lenet, ctx, key)
    assert set(art.files) == {"weights.safetensors", SECRET}


@pytest.mark.parametrize("params, match", [
    ({"filters_per_layer": 0}, r"'filters_per_layer' must be >= 1"),
    ({"weights_per_filter": 0}, r"'weights_per_filter' must be >= 1"),
    ({"lr": -0.1}, r"'lr' must be > 0"),
    ({"eps": 0.0}, r"'eps' must be > 0"),
    ({"trials": 5, "epochs": 5, "max_batches": 10}, r"'max_batches' must be >= 'trials' × 'epochs' \(25\)"),
    ({"epochs": "5"}, r"'epochs' must be int"),
    ({"filter": 1}, r"unknown parameter 'filter'"),
])
def test_bad_params(params, match):
    with pytest.raises(ConfigError, match=match):
        protectors.get("nnsplitter", **params)


def test_eps_selecting_nothing_is_a_config_error(clean_lenet, digits, lenet_factory, trainer, key):
    ctx = make_context(digits, lenet_factory, trainer)
    with pytest.raises(ConfigError, match=r"'eps' \(1e-12\) selects no weight"):
        protectors.get("nnsplitter", eps=1e-12).protect(clean_lenet, ctx, key)


def test_model_without_conv_is_a_config_error(digits, lenet_factory, trainer, key):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ConfigError, match=r"no nn.Conv2d layer"):
        protectors.get("nnsplitter").protect(mlp, make_context(digits, lenet_factory, trainer), key)
