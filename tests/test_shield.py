"""``shield``: TEE partial shielding (DarkneTZ deep layers, Magnitude top-p), on digits / LeNet-5.

Measured here (clean 0.978): authorized = clean in both modes and both variants; stolen 0.092 (deep, fc3 freshly
initialized) and 0.097 (magnitude, top 10% of |w| zeroed); magnitude at 1% leaves 0.156. After 30% Torch-Pruning
channel pruning of the stolen copy, the deep secret written back gives exactly what the same pruning of the clean
model gives (0.897; the pruner ignores the classifier, so it prunes the same channels). Deep, fine-tuned on 5% of
the training set for 5 epochs: the thief's copy reaches 0.950, and 0.972 with the true fc3 written back.
"""

import copy
import math
import time

import pytest
import torch
from conftest import score_on_test
from torch import nn

import attacks
import protectors
import protectors.shield  # noqa: F401  (registers "shield")
from attacks import Loot, ThiefContext
from attacks.prune import PruneChannel
from protectors import NotSupported
from protectors.core.artifact import Artifact
from protectors.core.errors import ArtifactError, ConfigError
from protectors.core.sampling import stratified_subset
from protectors.core.weights import WEIGHTS, load_state_bytes
from protectors.shield import SECRET, TeeTimed, model_blocks

LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


def acc(trainer, model, splits):
    return trainer.evaluate(model, splits.test_x, splits.test_y)


@pytest.fixture(scope="module")
def arts(clean_lenet, ctx, key):
    out = {}
    for label, params in {"deep": {"variant": "deep"}, "magnitude": {"variant": "magnitude"}}.items():
        p = protectors.get("shield", **params)
        out[label] = (p, p.protect(clean_lenet, ctx, key))
    return out


@pytest.fixture(scope="module")
def thief(digits, trainer):
    from bench import data

    def thief_data(fraction, seed):
        return stratified_subset(digits.train_x, digits.train_y, fraction, seed)

    return ThiefContext(trainer=trainer, thief_data=thief_data,
                        loader=lambda x, y, s: data.BatchLoader(x, y, 32, s), num_classes=10,
                        lock_sites=("relu1", "relu2", "relu3", "relu4"), seed=0)


def test_bad_params_are_config_errors(clean_lenet, ctx, key):
    for bad in ({"variant": "shallow"}, {"blocks": 0}, {"fraction": 1.5}, {"fraction": -0.1}, {"tee_slowdown": 0.5},
                {"blocks": "two"}, {"fractoin": 0.1}):
        with pytest.raises(ConfigError, match="shield"):
            protectors.get("shield", **bad)
    with pytest.raises(ConfigError, match="'blocks' is 6, but the model has only 5 blocks"):
        protectors.get("shield", blocks=6).protect(clean_lenet, ctx, key)


def test_blocks_and_declarations(clean_lenet, arts):
    assert model_blocks(clean_lenet) == [[n] for n in LAYERS]
    p, art = arts["deep"]
    assert p.declaration() == {"secret_kind": "withheld-weights", "holds_weights": True, "claims_chance": True,
                               "modes": ["tee", "plain"]}
    assert p.host_memory_modes == ("tee",) and p.keyspace_bits(art) == 256.0
    assert art.meta["shielded_blocks"] == ["fc3"] and art.meta["shielded_tensors"] == ["fc3.bias", "fc3.weight"]
    assert art.meta["shielded_values"] == 850 and 0 < art.meta["tee_mac_fraction"] < 0.05
    _, mag = arts["magnitude"]
    total = sum(m.weight.numel() for m in clean_lenet.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert mag.meta["candidate_weights"] == total and mag.meta["shielded_values"] == round(0.1 * total)


@pytest.mark.parametrize("variant", ["deep", "magnitude"])
def test_authorized_equals_clean_in_every_mode(arts, variant, clean_lenet, key, lenet_factory, digits, trainer,
                                               tmp_path):
    p, art = arts[variant]
    art = Artifact.load(art.save(tmp_path / variant))
    x = digits.test_x[:64]
    clean_acc = acc(trainer, clean_lenet, digits)
    for mode in p.modes:
        model = p.deploy(art, key, lenet_factory, mode)
        with torch.no_grad():
            torch.testing.assert_close(model(x), clean_lenet(x), atol=0, rtol=0)
        assert acc(trainer, model, digits) == clean_acc


@pytest.mark.parametrize("variant", ["deep", "magnitude"])
def test_stolen_copy_collapses(arts, variant, clean_lenet, lenet_factory, digits, trainer):
    p, art = arts[variant]
    stolen = acc(trainer, p.stolen(art, lenet_factory), digits)
    assert stolen < 0.2 < 0.9 < acc(trainer, clean_lenet, digits)  # measured: 0.092 (deep), 0.097 (magnitude)


def test_secret_is_encrypted_and_withheld(arts, clean_lenet, key, other_key, lenet_factory):
    clean = clean_lenet.state_dict()
    p, art = arts["deep"]
    assert art.secret_files == [SECRET]
    plain = load_state_bytes(lenet_factory(), art.file(WEIGHTS), "weights").state_dict()
    for name in ("fc3.weight", "fc3.bias"):
        assert not torch.equal(plain[name], clean[name])  # freshly initialized...
        assert not torch.equal(plain[name], lenet_factory().state_dict()[name])  # ...not the training's own init
        raw = clean[name].numpy().tobytes()
        assert all(raw[:64] not in blob for blob in art.files.values())
    for name in ("conv1.weight", "fc2.weight"):
        assert torch.equal(plain[name], clean[name])
    with pytest.raises(protectors.KeyMaterialError):
        p.deploy(art, other_key, lenet_factory)

    p, art = arts["magnitude"]
    plain = load_state_bytes(lenet_factory(), art.file(WEIGHTS), "weights").state_dict()
    secret = p.secret(art, key).entries
    for name, s in secret.items():
        flat = plain[name].view(-1)
        assert torch.equal(flat[s.index], torch.zeros(len(s.index)))  # zeroed in the thief's copy
        assert torch.equal(clean[name].view(-1)[s.index], s.values)
    big = max(float(clean[n].abs().max()) for n in secret)
    assert all(float(plain[n].abs().max()) < big for n in secret)  # the largest weights are gone
    with pytest.raises(ArtifactError, match="authentication failed"):
        art.decrypt(SECRET, other_key)  # wrong key: AES-GCM refuses


def test_tee_mode_wraps_shielded_modules(arts, key, lenet_factory):
    p, art = arts["deep"]
    model = p.deploy(art, key, lenet_factory, "tee")
    assert isinstance(model.fc3, TeeTimed) and model.fc3.extra == 9.0
    assert not any(isinstance(getattr(model, n), TeeTimed) for n in LAYERS[:-1])
    assert not any(isinstance(m, TeeTimed) for m in p.deploy(art, key, lenet_factory, "plain").modules())
    p, art = arts["magnitude"]
    model = p.deploy(art, key, lenet_factory, "tee")
    secret = p.secret(art, key).entries
    for name in LAYERS:
        s = secret[f"{name}.weight"]
        assert model.get_submodule(name).extra == pytest.approx(9.0 * len(s.index) / math.prod(s.shape))


def test_tee_timing_adds_the_modeled_slowdown():
    class Sleeper(nn.Module):
        def forward(self, x):
            time.sleep(0.004)
            return x

    wrapped = TeeTimed(Sleeper(), extra=4.0)
    t0 = time.perf_counter()
    wrapped(torch.zeros(1))
    assert time.perf_counter() - t0 >= 5 * 0.004  # 4 ms in the module + 4 × that busy-waiting


def test_onnx_plain_matches_torch_and_tee_is_not_supported(arts, key, lenet_factory, digits):
    pytest.importorskip("onnxruntime")
    p, art = arts["magnitude"]
    art = copy.deepcopy(art)
    x = digits.test_x[:8]
    p.onnx_build(art, key, lenet_factory, "plain", x[:1])
    art.seal(key)
    run = p.onnx_load(art, key, "plain")
    with torch.no_grad():
        expected = p.deploy(art, key, lenet_factory, "plain")(x).numpy()
    assert abs(run(x.numpy()) - expected).max() < 1e-4
    with pytest.raises(NotSupported, match="n/a: shield tee"):
        p.onnx_build(art, key, lenet_factory, "tee", x[:1])
    with pytest.raises(NotSupported, match="n/a: shield tee"):
        p.onnx_load(art, key, "tee")


def test_authorize_on_a_finetuned_copy(arts, clean_lenet, key, lenet_factory, thief):
    p, art = arts["deep"]
    out = attacks.get("finetune", fractions=[0.05], epochs=5).run(Loot(art, p, lenet_factory), thief, "f=0.05")
    tuned = out.model.state_dict()
    authorized = p.authorize(out.model, art, key)
    state = authorized.state_dict()
    assert authorized.shield_unmapped == []
    for name, t in clean_lenet.state_dict().items():  # the TEE's part is the true one, the rest the thief's
        assert torch.equal(state[name], t if name.startswith("fc3.") else tuned[name])
    print("shield deep fine-tuned: stolen_after", score_on_test(out.model), "auth_after", score_on_test(authorized))


def _sliced(clean: dict, kept: dict, spatial: int) -> dict:
    """The clean LeNet-5's weights sliced to the pruned channels, computed independently of the protector."""
    out = {}
    feeds = {"conv2": "conv1", "fc1": "conv2", "fc2": "fc1", "fc3": "fc2"}
    for name in LAYERS:
        w = clean[f"{name}.weight"]
        rows = kept.get(name, list(range(w.shape[0])))
        cols = list(range(w.shape[1]))
        if name in feeds and feeds[name] in kept:
            ch = kept[feeds[name]]
            cols = [c * spatial + s for c in ch for s in range(spatial)] if name == "fc1" else ch
        out[f"{name}.weight"] = w[rows][:, cols]
        out[f"{name}.bias"] = clean[f"{name}.bias"][rows]
    return out


@pytest.mark.parametrize("variant", ["deep", "magnitude"])
def test_authorize_on_a_channel_pruned_copy(arts, variant, clean_lenet, key, lenet_factory, digits, trainer):
    p, art = arts[variant]
    model = p.stolen(art, lenet_factory)
    for w in model.parameters():
        w.requires_grad_(True)
    attacked = model.state_dict()
    extra, pruned = PruneChannel().prune(model, 0.3, digits.test_x[:1])
    assert extra["params_after"] < extra["params_before"] and {"conv1", "conv2", "fc1", "fc2"} <= set(pruned.kept)
    authorized = p.authorize(model, art, key, pruned=pruned)
    assert authorized.shield_unmapped == []
    state = authorized.state_dict()
    expected = _sliced(clean_lenet.state_dict(), pruned.kept, spatial=4)  # digits: 16 channels × 2 × 2 into fc1
    if variant == "magnitude":  # the thief's copy is the clean one with the shielded weights zeroed: all restored
        for name, t in expected.items():
            assert torch.equal(state[name], t), name
    else:  # fc3 is the TEE's: the true one with its pruned inputs dropped; the rest as the pruner left it
        assert torch.equal(state["fc3.weight"], expected["fc3.weight"])
        assert torch.equal(state["fc3.bias"], expected["fc3.bias"])
        assert not torch.equal(attacked["fc3.weight"][:, pruned.kept["fc2"]], expected["fc3.weight"])
        clean_pruned = copy.deepcopy(clean_lenet)
        for w in clean_pruned.parameters():
            w.requires_grad_(True)
        PruneChannel().prune(clean_pruned, 0.3, digits.test_x[:1])  # the pruner ignores fc3: same channels go
        assert acc(trainer, authorized, digits) == acc(trainer, clean_pruned, digits)  # measured 0.897


def test_unmappable_layers_are_left_as_the_attacker_made_them(arts, key, lenet_factory):
    p, art = arts["deep"]
    model = p.stolen(art, lenet_factory)
    model.fc3 = nn.Linear(84, 7)  # a shape no pruning record explains
    authorized = p.authorize(model, art, key)
    assert sorted(authorized.shield_unmapped) == ["fc3.bias", "fc3.weight"]
    assert torch.equal(authorized.fc3.weight, model.fc3.weight)


def test_magnitude_fraction_is_the_secret_size_dial(clean_lenet, ctx, key, lenet_factory, digits, trainer):
    sizes, stolen = [], []
    for fraction in (0.0, 0.01, 1.0):
        p = protectors.get("shield", variant="magnitude", fraction=fraction)
        art = p.protect(clean_lenet, ctx, key)
        sizes.append(p.secret_bytes(art))
        stolen.append(acc(trainer, p.stolen(art, lenet_factory), digits))
        assert acc(trainer, p.deploy(art, key, lenet_factory, "plain"), digits) == acc(trainer, clean_lenet, digits)
    assert sizes[0] < sizes[1] < sizes[2]
    assert stolen[0] == acc(trainer, clean_lenet, digits) and stolen[2] < 0.2  # measured: 0.978, 0.156, 0.097


@pytest.mark.parametrize("params", [{"variant": "magnitude"}, {"variant": "deep", "blocks": 3}])
def test_authorize_on_a_pruned_resnet_equals_the_clean_model_with_those_channels_masked(params, key):
    """Residual stages and shortcut convs: pruning a channel is the same as zeroing its producers' outputs, so the
    authorized pruned copy must compute what the clean model computes with the pruned channels zeroed."""
    from bench import models
    from protectors.core.base import latency_context

    factory = models.factory("resnet18", 3, 32, 10, seed=0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = factory().train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))  # non-trivial BN statistics
    model.eval()
    p = protectors.get("shield", **params)
    art = p.protect(model, latency_context(factory, x[:1], 10, secret_seed=5), key)
    stolen = p.stolen(art, factory)
    for w in stolen.parameters():
        w.requires_grad_(True)
    _, pruned = PruneChannel().prune(stolen, 0.3, x[:1])
    authorized = p.authorize(stolen, art, key, pruned=pruned)
    assert authorized.shield_unmapped == []  # shortcut convs included
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for name, kept in pruned.kept.items():
            gone = torch.ones(modules[name].weight.shape[0], dtype=torch.bool)
            gone[kept] = False
            modules[name].weight[gone] = 0
            if modules[name].bias is not None:
                modules[name].bias[gone] = 0
        torch.testing.assert_close(authorized(x), masked(x), atol=1e-6, rtol=1e-4)
