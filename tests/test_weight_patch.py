"""The ``weight-correction`` kind's secret (protectors/core/kinds/weight_patch.py) and the plaintext-weights base
class (protectors/core/plaintext.py) that NNSplitter, AdvParams, shield, EdgePro and HPNN build on. Tiny models, no
training."""

import copy

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

from protectors.core import kinds
from protectors.core.artifact import Artifact
from protectors.core.base import Protector, latency_context
from protectors.core.errors import ArtifactError, KeyMaterialError
from protectors.core.kinds import weight_patch
from protectors.core.kinds.weight_patch import Patch, WeightPatch, channel_maps, input_channels
from protectors.core.plaintext import PlaintextWeightsProtector
from protectors.core.pruning import Pruned
from protectors.core.weights import WEIGHTS

KEY = bytes(range(32))


def small_net(seed: int = 0) -> nn.Module:
    """conv(1→4) → conv(4→6) → flatten (6 channels × 2 × 2) → linear(24→5) → linear(5→3), on 6×6 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(24, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


KEPT = {"0": [0, 2, 3], "2": [1, 2, 4, 5], "5": [0, 1, 3, 4]}  # surviving output channels of each pruned module
SPATIAL = 4  # conv "2" gives 2 × 2 positions per channel to the flatten
KEPT_RECORD = Pruned(KEPT, torch.zeros(1, 1, 6, 6))


def sliced(state: dict, kept: dict = KEPT) -> dict:
    """``state`` cut to the kept channels, computed independently of the patch code."""
    cols = {"2": kept["0"], "5": [c * SPATIAL + s for c in kept["2"] for s in range(SPATIAL)], "7": kept["5"]}
    out = {}
    for name, t in state.items():
        module = name.split(".")[0]
        if module in kept:
            t = t[kept[module]]
        if name.endswith("weight") and module in cols:
            t = t[:, cols[module]]
        out[name] = t.clone()
    return out


def pruned_copy(model: nn.Module) -> tuple[nn.Module, Pruned]:
    """What a structural pruning attack leaves: the same architecture with channels removed, and its record."""
    small = copy.deepcopy(model)
    cut = sliced(model.state_dict())
    for name, t in cut.items():
        module, _, attr = name.rpartition(".")
        setattr(small.get_submodule(module), attr, nn.Parameter(t))
    return small, KEPT_RECORD


# -- the kind ---------------------------------------------------------------------------------------------------------
def test_the_kind_is_registered_with_its_public_schema():
    assert kinds.MODULES["weight-correction"] is weight_patch
    kinds.check_public_meta("weight-correction", {"keyspace_bits": 120.5, "obfuscated_weights": 32, "params": {}})
    kinds.check_public_meta("weight-correction", {})
    for bad, match in [({"keyspace_bits": 300.0}, "keyspace_bits"), ({"keyspace_bits": "many"}, "keyspace_bits"),
                       ({"positions": [1, 2]}, "'positions'"), ({"params": {"values": [0.5]}}, "'params.values'")]:
        with pytest.raises(ValueError, match=match):
            kinds.check_public_meta("weight-correction", bad)


def test_bytes_round_trip_sparse_and_whole_entries():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    state = model.state_dict()
    patch = WeightPatch({**WeightPatch.gather(state, {"0.weight": torch.tensor([0, 7, 53])}).entries,
                         **WeightPatch.whole(state, ["1.running_mean", "1.num_batches_tracked"]).entries})
    data = patch.to_bytes()
    assert not data.startswith(b"\x80") and data[8:9] == b"{"  # safetensors: a JSON header, never a pickle
    back = WeightPatch.from_bytes(data, "x")
    assert back.entries.keys() == patch.entries.keys() and back.count == 3 + 3 + 1
    for name, p in patch.entries.items():
        q = back.entries[name]
        assert q.shape == p.shape and torch.equal(q.values, p.values)
        assert (q.index is None) == (p.index is None) and (p.index is None or torch.equal(q.index, p.index))
    assert back.entries["1.num_batches_tracked"].values.dtype == torch.int64
    assert WeightPatch.from_bytes(WeightPatch().to_bytes(), "x").entries == {}


@pytest.mark.parametrize("tensors, shapes, match", [
    (None, None, "not a readable safetensors file"),
    ({"values/w": torch.zeros(2), "colour/w": torch.zeros(1)}, None, "unexpected tensor 'colour/w'"),
    ({"index/w": torch.tensor([0]), "values/w": torch.zeros(1)}, None, "needs values, positions and its shape"),
    ({"index/w": torch.tensor([0]), "values/w": torch.zeros(1)}, "[1", "shapes in the metadata"),
    ({"index/w": torch.tensor([9]), "values/w": torch.zeros(1)}, '{"w":[2,2]}', "out of range"),
    ({"index/w": torch.tensor([0, 1]), "values/w": torch.zeros(1)}, '{"w":[4]}', "one value per position"),
    ({"index/w": torch.tensor([0.0]), "values/w": torch.zeros(1)}, '{"w":[4]}', "out of range"),
])
def test_malformed_bytes_are_artifact_errors_naming_the_file(tensors, shapes, match):
    if tensors is None:
        data = b"\x00\x01garbage"
    else:
        data = st_save(tensors, metadata=None if shapes is None else {"shapes": shapes})
    with pytest.raises(ArtifactError, match=rf"^art/positions\.enc: .*{match}"):
        WeightPatch.from_bytes(data, "art/positions.enc")


# -- writing it back --------------------------------------------------------------------------------------------------
def test_restore_writes_the_values_and_refuses_what_does_not_fit():
    clean, thief = small_net(0), small_net(1)
    positions = {"2.weight": torch.tensor([3, 40, 100]), "5.bias": torch.tensor([4])}
    patch = WeightPatch.gather(clean.state_dict(), positions)
    patch.restore(thief)
    w = thief.state_dict()["2.weight"].view(-1)
    assert torch.equal(w[[3, 40, 100]], clean.state_dict()["2.weight"].view(-1)[[3, 40, 100]])
    assert float(thief.state_dict()["5.bias"][4]) == float(clean.state_dict()["5.bias"][4])
    with pytest.raises(ArtifactError, match=r"^where: patched tensor '2.weight' has shape"):
        patch.restore(pruned_copy(clean)[0], "where")
    with pytest.raises(ArtifactError, match=r"patched tensor '5.bias' is not in the model"):
        patch.restore(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3)))
    zeroed = small_net(0)
    patch.zeroed().restore(zeroed)
    assert float(zeroed.state_dict()["2.weight"].view(-1)[40]) == 0.0


def test_offsets_undo_a_perturbation_bit_for_bit_and_keep_later_changes():
    clean = small_net(0)
    perturbed = copy.deepcopy(clean)
    with torch.no_grad():
        perturbed[5].weight.view(-1)[[2, 9, 31]] += torch.tensor([0.3, -0.25, 0.125])
    names = ["0.weight", "5.weight", "7.weight"]
    patch = WeightPatch.changed(clean.state_dict(), perturbed.state_dict(), names)
    assert list(patch.entries) == ["5.weight"] and patch.entries["5.weight"].index.tolist() == [2, 9, 31]
    delta = patch.offsets(perturbed.state_dict())
    assert delta.entries["5.weight"].values.dtype == torch.float64
    restored = delta.subtract(copy.deepcopy(perturbed))
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), clean.state_dict().values()))
    tuned = copy.deepcopy(perturbed)  # "fine-tuned": every weight moved a little; subtracting keeps the move
    with torch.no_grad():
        tuned[5].weight.add_(0.5)
    out = delta.subtract(copy.deepcopy(tuned)).state_dict()["5.weight"].view(-1)
    expected = tuned[5].weight.detach().view(-1).double()
    expected[[2, 9, 31]] -= torch.tensor([0.3, -0.25, 0.125], dtype=torch.float64)
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=0)


# -- structural pruning -----------------------------------------------------------------------------------------------
def test_remap_on_a_pruned_copy_equals_slicing_the_clean_weights():
    """Pruning is slicing, so patching then pruning must equal pruning then patching (remapped)."""
    state = small_net(0).state_dict()
    whole = WeightPatch.whole(state, list(state))
    sparse = WeightPatch.gather(state, {n: torch.arange(0, t.numel(), 3) for n, t in state.items()})
    for patch in (whole, sparse):
        expected = sliced(patch.restore(small_net(1)).state_dict())
        thief, pruned = pruned_copy(small_net(1))
        moved, unmapped = patch.remap(thief, pruned)
        assert unmapped == []
        got = moved.restore(copy.deepcopy(thief)).state_dict()
        for name, t in expected.items():
            assert torch.equal(got[name], t), name
        assert 0 < moved.count < patch.count  # positions of pruned channels are gone
    assert torch.equal(sliced(state)["5.weight"], whole.remap(pruned_copy(small_net(1))[0], KEPT_RECORD)[0]
                       .entries["5.weight"].values)
    # Unchanged shapes need no record; a shape no record explains is reported, not guessed.
    same, unmapped = whole.remap(small_net(1), None)
    assert unmapped == [] and all(same.entries[n] is p for n, p in whole.entries.items())
    odd = small_net(1)
    odd[7] = nn.Linear(5, 2)
    moved, unmapped = whole.remap(odd, None)
    assert unmapped == ["7.weight", "7.bias"] and "7.weight" not in moved.entries


def test_channel_maps_do_not_guess():
    feeders = [[0, 2, 3]]
    # a linear after a flatten: each kept channel counts `spatial` times, channel-major
    assert input_channels(16, 6, feeders) == [0, 1, 4, 5, 6, 7]
    # a conv's input is never a flatten: no spatial mapping
    assert input_channels(16, 6, feeders, spatial_ok=False) is None
    assert channel_maps((4, 16, 3, 3), (4, 6, 3, 3), None, feeders) is None
    assert channel_maps((4, 4, 3, 3), (4, 3, 3, 3), None, feeders)[1].tolist() == [0, 2, 3]
    # a grouped conv whose per-group input width changed: no single map explains it
    assert channel_maps((4, 4, 3, 3), (4, 3, 3, 3), None, feeders, groups=2) is None
    # output channels need the module's own record
    assert channel_maps((4, 3), (2, 3), None, []) is None
    assert channel_maps((4, 3), (2, 3), [1, 3], [])[0].tolist() == [1, 3]


# -- the plaintext-weights base class ---------------------------------------------------------------------------------
class ToyPatch(PlaintextWeightsProtector):
    """Zeroes a few weights of the last layer; the secret is their original values."""

    name = "toy-patch"
    secret_kind = "weight-correction"
    secret_file = "patch.enc"

    def _protect(self, model, ctx, key):
        patch = WeightPatch.gather(model.state_dict(), {"7.weight": torch.tensor([0, 4, 9])})
        thief = patch.zeroed().restore(copy.deepcopy(model))
        return self.plaintext_artifact(model, key, patch.to_bytes(), weights=thief, keyspace_bits=12.0)

    def parse_secret(self, data, where):
        return WeightPatch.from_bytes(data, where)

    def _deploy(self, artifact, key, model_factory, mode=None):
        return self.secret(artifact, key).restore(self.plaintext_model(artifact, model_factory), artifact.where)

    def _authorize(self, model, artifact, key, pruned=None):
        return self.secret(artifact, key).restore(copy.deepcopy(model), artifact.where)


def test_plaintext_weights_protector_writes_and_reads_its_files(tmp_path):
    clean = small_net(0)
    p = ToyPatch()
    art = p.protect(clean, latency_context(small_net, torch.zeros(1, 1, 6, 6), 3, secret_seed=1), KEY)
    assert set(art.files) == {WEIGHTS, "patch.enc"} and art.secret_files == ["patch.enc"]
    assert art.meta["cipher"] == "AES-256-GCM" and p.secret_bytes(art) == len(art.files["patch.enc"])
    art = Artifact.load(art.save(tmp_path / "toy"))
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(p.deploy(art, KEY, small_net)(x), clean(x))
        stolen = p.stolen(art, small_net)
        assert float(stolen[7].weight.view(-1)[4]) == 0.0 and not torch.equal(stolen(x), clean(x))
    assert set(p.plaintext_state(art)) == set(clean.state_dict())
    assert p.secret(art, KEY).entries["7.weight"].index.tolist() == [0, 4, 9]
    with pytest.raises(KeyMaterialError):
        p.secret(art, bytes(32))  # authenticated before anything is decrypted


def test_plaintext_weights_protector_needs_its_secret_file_and_parser():
    with pytest.raises(TypeError, match="secret_file"):
        type("Broken", (ToyPatch,), {"secret_file": 3})
    with pytest.raises(TypeError):  # parse_secret is abstract
        type("NoParser", (PlaintextWeightsProtector,), {"name": "x", "secret_kind": "none", "secret_file": "s.enc",
                                                        "_protect": None, "_deploy": None, "_authorize": None})()
    assert issubclass(ToyPatch, Protector)


def test_a_secret_in_the_plaintext_metadata_is_refused():
    class Leaky(ToyPatch):
        def _protect(self, model, ctx, key):
            art = super()._protect(model, ctx, key)
            art.meta["positions"] = [0, 4, 9]
            return art

    with pytest.raises(TypeError, match="would disclose the secret"):
        Leaky().protect(small_net(0), latency_context(small_net, torch.zeros(1, 1, 6, 6), 3, secret_seed=1), KEY)


def test_patch_entries_are_plain_data():
    p = Patch((2, 2), torch.tensor([1.0]), torch.tensor([3]))
    assert p.size == 1 and WeightPatch({"w": p}).count == 1
