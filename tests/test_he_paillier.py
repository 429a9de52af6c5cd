"""``he-paillier``: EdgePro's own HE baseline (element-wise Paillier, decrypted whole at load), on digits / LeNet-5.

Most tests use a 1024-bit key and a small sample so that they take seconds; one (``slow``) uses phe's default key
(3072 bits) for a real measurement. Measured here with phe 1.5.0 in pure Python (no gmpy2), on 2 loaded cores:
3072 bits — keygen 1.2–13 s (random prime search), encrypt 0.31–0.56 s and decrypt 0.08–0.18 s per weight
(LeNet-5 on digits, 21,386 weights: 1.8–3.3 h to encrypt, 0.5–1.1 h to decrypt, 16.4 MB of ciphertexts);
1024 bits — encrypt 0.033 s, decrypt 0.010 s per weight. Authorized = clean; stolen (random init) 0.100.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load as st_load
from torch import nn

import protectors
import protectors.he_paillier  # noqa: F401  (registers "he-paillier")
from protectors.core.artifact import Artifact
from protectors.core.base import latency_context
from protectors.core.errors import ArtifactError, ConfigError, NotApplicable
from protectors.he_paillier import CIPHERTEXTS, DEFAULT_KEYSIZE, MISSING_PHE, PRIVATE_KEY, REST, security_bits

try:
    from phe import paillier
except ImportError:  # the optional extra (pip install 'edgepro-bench[paillier]') is missing: only its absence is tested
    paillier = None
needs_phe = pytest.mark.skipif(paillier is None, reason="phe not installed (pip install 'edgepro-bench[paillier]')")


def acc(trainer, model, splits):
    return trainer.evaluate(model, splits.test_x, splits.test_y)


@pytest.fixture(scope="module")
def he(clean_lenet, ctx, key):
    if paillier is None:
        pytest.skip("phe not installed (pip install 'edgepro-bench[paillier]')")
    p = protectors.get("he-paillier", keysize=1024, sample=24)
    return p, p.protect(clean_lenet, ctx, key)


def test_bad_params_are_config_errors():
    for bad in ({"sample": 0}, {"sample": -3}, {"keysize": 512}, {"keysize": 1028}, {"sample": "all"},
                {"keysise": 2048}):
        with pytest.raises(ConfigError, match="he-paillier"):
            protectors.get("he-paillier", **bad)
    assert protectors.get("he-paillier").params.keysize == DEFAULT_KEYSIZE == 3072
    if paillier is not None:
        assert paillier.DEFAULT_KEYSIZE == DEFAULT_KEYSIZE
    assert protectors.get("he-paillier").params.sample == 256
    assert protectors.get("he-paillier", sample=None).params.sample is None


@pytest.mark.slow
def test_declarations_and_metadata(he, clean_lenet):
    p, art = he
    assert p.declaration() == {"secret_kind": "encrypted-weights", "holds_weights": False, "claims_chance": True,
                               "modes": ["load"]}
    total = sum(t.numel() for t in clean_lenet.state_dict().values())
    m = art.meta
    assert (m["paillier_keysize"], m["sampled_weights"], m["total_weights"]) == (1024, 24, total)
    assert m["ciphertext_bytes_per_weight"] == 256 and m["extrapolated_ciphertext_bytes"] == 256 * total
    assert p.secret_bytes(art) == 256 * total > art.secret_bytes  # the whole model's ciphertexts, extrapolated
    for what in ("encrypt", "decrypt"):
        per = m[f"{what}_s_per_weight"]
        assert per > 0 and m[f"extrapolated_{what}_s"] == pytest.approx(per * total)
    assert p.keyspace_bits(art) == 80.0 and security_bits(3072) == 128.0 and security_bits(2048) == 112.0


@pytest.mark.slow
def test_authorized_equals_clean_and_stolen_is_a_random_init(he, clean_lenet, key, lenet_factory, digits, trainer,
                                                            tmp_path):
    p, art = he
    art = Artifact.load(art.save(tmp_path / "he"))
    x = digits.test_x[:64]
    for mode in p.modes:
        model = p.deploy(art, key, lenet_factory, mode)
        assert model.paillier_decrypt_s > 0
        with torch.no_grad():
            torch.testing.assert_close(model(x), clean_lenet(x), atol=0, rtol=0)
        assert acc(trainer, model, digits) == acc(trainer, clean_lenet, digits)
    stolen = p.stolen(art, lenet_factory)
    assert all(torch.equal(a, b) for a, b in zip(stolen.state_dict().values(), lenet_factory().state_dict().values()))
    assert acc(trainer, stolen, digits) < 0.2  # measured 0.100
    assert p.authorize(stolen, art, key) is None


@pytest.mark.slow
def test_sample_is_paillier_encrypted_and_the_rest_aes(he, clean_lenet, key, other_key, lenet_factory):
    p, art = he
    assert sorted(art.secret_files) == [PRIVATE_KEY, REST]
    doc = json.loads(art.file(CIPHERTEXTS))
    assert len(doc["ciphertexts"]) == 24 and "p" not in doc and "q" not in doc
    clean = clean_lenet.state_dict()
    rest = st_load(art.decrypt(REST, key))
    priv = json.loads(art.decrypt(PRIVATE_KEY, key))
    n = int(doc["n"], 16)
    assert int(priv["p"]) * int(priv["q"]) == n and n.bit_length() == 1024
    private = paillier.PaillierPrivateKey(paillier.PaillierPublicKey(n), int(priv["p"]), int(priv["q"]))
    for (k, i), c, e in zip(doc["positions"], doc["ciphertexts"], doc["exponents"]):
        name = doc["names"][k]
        value = private.decrypt(paillier.EncryptedNumber(private.public_key, int(c, 16), int(e)))
        assert value == clean[name].view(-1)[i].item()  # the Paillier ciphertext holds the exact weight...
        assert rest[name].view(-1)[i] == 0  # ...and the AES-encrypted rest does not
    with pytest.raises(ArtifactError, match="authentication failed"):
        art.decrypt(PRIVATE_KEY, other_key)
    with pytest.raises(protectors.KeyMaterialError):
        p.deploy(art, other_key, lenet_factory)


@needs_phe
def test_sample_none_encrypts_every_weight_with_paillier(key):
    def factory():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 2))

    ctx = latency_context(factory, torch.zeros(1, 3), num_classes=2, secret_seed=7)
    p = protectors.get("he-paillier", keysize=1024, sample=None)
    model = factory()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -1.25, 3e-3], [7.0, -0.0078125, 1e-7]]))
    art = p.protect(model, ctx, key)
    assert art.meta["sampled_weights"] == art.meta["total_weights"] == 8
    assert all(int((t != 0).sum()) == 0 for t in st_load(art.decrypt(REST, key)).values())  # nothing left to AES
    deployed = p.deploy(art, key, factory)
    assert all(torch.equal(a, b) for a, b in zip(deployed.state_dict().values(), model.state_dict().values()))


@pytest.mark.slow
def test_onnx_default_matches_torch(he, key, lenet_factory, digits):
    pytest.importorskip("onnxruntime")
    import copy

    p, art = he
    art = copy.deepcopy(art)
    x = digits.test_x[:8]
    p.onnx_build(art, key, lenet_factory, "load", x[:1])
    art.seal(key)
    run = p.onnx_load(art, key, "load")
    with torch.no_grad():
        expected = p.deploy(art, key, lenet_factory)(x).numpy()
    assert abs(run(x.numpy()) - expected).max() < 1e-4


@pytest.mark.slow
def test_data_free_inspection_is_not_applicable(he):
    import attacks.inspect_weights  # noqa: F401

    p, art = he
    why = attacks.get("weight-inspection").not_applicable(p, art)
    assert why.startswith("n/a: weight-inspection needs trained weights")


@pytest.mark.slow
@needs_phe
def test_default_key_measures_real_paillier_times(clean_lenet, ctx, key, lenet_factory, digits, trainer):
    """phe's default key (3072 bits) on 2 weights: keygen and per-weight times, extrapolated to the whole model."""
    p = protectors.get("he-paillier", sample=2)
    art = p.protect(clean_lenet, ctx, key)
    m = art.meta
    assert m["paillier_keysize"] == paillier.DEFAULT_KEYSIZE == 3072 and p.keyspace_bits(art) == 128.0
    assert m["ciphertext_bytes_per_weight"] == 768
    # pure-Python phe: ~0.3 s per encryption (a 3072-bit exponent mod n²); decryption (CRT) is cheaper
    assert m["encrypt_s_per_weight"] > m["decrypt_s_per_weight"] > 0
    assert m["extrapolated_encrypt_s"] == pytest.approx(m["encrypt_s_per_weight"] * m["total_weights"])
    assert m["extrapolated_encrypt_s"] > 60  # the whole LeNet-5 (21,386 weights) takes minutes even at 3 ms each
    print("he-paillier 3072:", {k: m[k] for k in ("paillier_gmpy2", "keygen_s", "encrypt_s_per_weight",
                                                  "decrypt_s_per_weight", "extrapolated_encrypt_s",
                                                  "extrapolated_decrypt_s", "extrapolated_ciphertext_bytes")})
    assert acc(trainer, p.deploy(art, key, lenet_factory), digits) == acc(trainer, clean_lenet, digits)


def _hide_phe(monkeypatch):
    for name in ("phe", "phe.paillier", "phe.util"):
        monkeypatch.setitem(sys.modules, name, None)  # ``import phe`` now raises ImportError, as when not installed


@pytest.mark.slow  # clean_lenet trains LeNet-5 (40 epochs); an untrained lenet_factory() would keep it fast
def test_without_phe_protect_and_deploy_say_why(monkeypatch, clean_lenet, ctx, key, lenet_factory):
    """phe is an optional extra: without it the protector still builds, and protect/deploy are n/a with the fix."""
    _hide_phe(monkeypatch)
    p = protectors.get("he-paillier", keysize=1024, sample=4)
    assert p.params.keysize == 1024 and protectors.get("he-paillier").params.keysize == DEFAULT_KEYSIZE
    with pytest.raises(NotApplicable) as exc:
        p.protect(clean_lenet, ctx, key)
    assert str(exc.value) == MISSING_PHE
    assert MISSING_PHE == "n/a: he-paillier needs the 'phe' package: pip install 'edgepro-bench[paillier]'"
    art = Artifact.new("he-paillier", p.public_params(), {}, key).seal(key)  # authenticates; phe is asked first
    with pytest.raises(NotApplicable, match="needs the 'phe' package"):
        p.deploy(art, key, lenet_factory)
    assert isinstance(p.stolen(art, lenet_factory), nn.Module)  # the thief's copy needs no phe


def test_the_suite_imports_without_phe():
    code = ("import sys\n"
            "sys.modules['phe'] = None\n"
            "import protectors, attacks\n"
            "p = protectors.get('he-paillier')\n"
            "assert p.params.keysize == 3072, p.params\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
