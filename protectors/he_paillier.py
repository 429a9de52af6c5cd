"""``he-paillier``: a copy of the EdgePro authors' own "HE" baseline, ``src/HE.py`` in Leon022/EdgePro.

What the authors' script does, and this protector with it: generate a Paillier key pair with ``phe``'s default key
length (``phe.paillier.generate_paillier_keypair()``; :data:`phe.paillier.DEFAULT_KEYSIZE` is 3072 bits in phe
1.5.0), encrypt **every element of every state_dict tensor** (weights, biases, buffers) one at a time with
``public_key.encrypt(value)``, and, on the device, decrypt every element with the private key and rebuild the
tensors before use. **No homomorphic computation happens**: "HE" here means encrypting the whole model element by
element and decrypting it whole before inference, exactly as in the script. Per-inference cost is therefore zero;
the cost is at load, and in the artifact's size (a 3072-bit Paillier ciphertext is 768 bytes per 4-byte weight).

Sampling (the suite's deviation, for time). With ``phe`` in pure Python (no ``gmpy2``), one 3072-bit encryption
takes about 0.3 s and one decryption about 0.1 s on the suite's CPUs, so a whole LeNet-5 (61,706 weights) takes hours
and ResNet-18 (11.2M) months. By default only a random ``sample`` of the weights (256, positions drawn with the
key-derived ``ctx.secret_rng()``) is really encrypted with Paillier; encryption and decryption are timed per weight
(``time.perf_counter`` around the loops only; the script's ``time.time()`` span also held a ``deepcopy``) and
extrapolated to the whole model. The public metadata records: ``paillier_keysize``, ``paillier_gmpy2`` (whether phe
used GMP), ``sampled_weights``, ``total_weights``, ``encrypt_s_per_weight``, ``decrypt_s_per_weight``,
``keygen_s``, ``extrapolated_encrypt_s``, ``extrapolated_decrypt_s``, ``ciphertext_bytes_per_weight`` (the size of
an element of Z*_{n²}) and ``extrapolated_ciphertext_bytes`` (total weights × that size). ``sample=None`` encrypts
every weight with Paillier, as the script does (slow: see above).

So that the authorized device still gets the exact model when sampling, the weights **not** in the sample are stored
AES-256-GCM encrypted under the device key (``rest.enc``, the state with the sampled positions zeroed): that file is
not part of the authors' method. The Paillier ciphertexts (``paillier.json``: the public modulus n, the sampled
positions, each ciphertext as a hex string with its phe exponent) are plaintext, as on the authors' disk; the
Paillier private key (JSON of p and q) is stored AES-256-GCM encrypted under the device key (the authors' script
keeps it in memory). The Paillier key pair comes from phe's own OS CSPRNG, as in the script (the key-derived
``secret_rng`` is a NumPy PCG64, not fit to make a cryptographic key).

Declarations. ``secret_kind = "encrypted-weights"``: the thief holds only ciphertexts, so the stolen copy is the
architecture with a random initialization (only training from scratch is left). :meth:`~HePaillierProtector.
secret_bytes` is the extrapolated Paillier ciphertext size of the whole model (the artifact blow-up the method
implies), not the size of this sampled artifact's encrypted files. :meth:`~HePaillierProtector.keyspace_bits` is the
Paillier key's security level (NIST SP 800-57: 2048 → 112, 3072 → 128 bits), the weakest link: factoring n decrypts
every ciphertext without the device key (the AES-256 files guard the private key and the rest at 256 bits).
:meth:`~HePaillierProtector.authorize` returns ``None``: the secret is the weights themselves. One deploy mode,
``load``; on ONNX Runtime the default (the authorized graph sealed with AES-GCM and decrypted at load).

``phe`` (and ``gmpy2``, which makes it fast) are an optional extra: ``pip install 'edgepro-bench[paillier]'``. The
module imports ``phe`` only when it protects or deploys; without it, ``protect`` and ``deploy`` raise
:class:`~protectors.core.errors.NotApplicable` saying so (:data:`MISSING_PHE`), and the suite runs everything else.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import nn

from .core.artifact import Artifact
from .core.base import ModelFactory, PluginContext, Protector
from .core.errors import ArtifactError, NotApplicable
from .core.registry_instance import protectors
from .core.weights import load_state_bytes

CIPHERTEXTS = "paillier.json"
PRIVATE_KEY = "paillier_key.enc"
REST = "rest.enc"
#: phe's default key length (``phe.paillier.DEFAULT_KEYSIZE`` in phe 1.5.0), known without importing phe
DEFAULT_KEYSIZE = 3072
MISSING_PHE = "n/a: he-paillier needs the 'phe' package: pip install 'edgepro-bench[paillier]'"
#: NIST SP 800-57 Part 1, table 2: bits of security of an RSA-type modulus (factoring) of a given length
SECURITY_BITS = ((15360, 256), (7680, 192), (3072, 128), (2048, 112), (1024, 80))


def _phe() -> tuple[Any, Any]:
    """``(phe.paillier, phe.util)``, imported now; :class:`NotApplicable` when ``phe`` is not installed."""
    try:
        from phe import paillier
        from phe import util as phe_util
    except ImportError:
        raise NotApplicable(MISSING_PHE) from None
    return paillier, phe_util


def security_bits(keysize: int) -> float:
    """Bits of security of a Paillier modulus of ``keysize`` bits (the largest NIST entry not above it)."""
    return float(next((bits for size, bits in SECURITY_BITS if keysize >= size), 0))


@dataclass(frozen=True)
class HePaillierParams:
    sample: int | None = 256
    keysize: int = DEFAULT_KEYSIZE

    def validate(self) -> None:
        if self.sample is not None and self.sample < 1:
            raise ValueError(f"parameter 'sample' must be >= 1 or None (every weight), got {self.sample}")
        if self.keysize < 1024 or self.keysize % 8:
            raise ValueError(f"parameter 'keysize' must be a multiple of 8 bits, at least 1024, got {self.keysize}")


def _positions(state: dict[str, torch.Tensor], flat: np.ndarray) -> list[tuple[str, int]]:
    """Global flat positions over the state's tensors (in order) → (tensor name, flat index in it)."""
    names = list(state)
    ends = np.cumsum([state[n].numel() for n in names])
    which = np.searchsorted(ends, flat, side="right")
    return [(names[w], int(f - (ends[w - 1] if w else 0))) for w, f in zip(which, flat)]


def _decrypt_all(private_key: Any, doc: dict) -> tuple[list, float]:
    """Decrypt every ciphertext of ``doc`` with ``private_key`` (a ``phe.paillier.PaillierPrivateKey``)."""
    paillier, _ = _phe()
    public = private_key.public_key
    numbers = [paillier.EncryptedNumber(public, int(c, 16), int(e)) for c, e in zip(doc["ciphertexts"],
                                                                                      doc["exponents"])]
    t0 = time.perf_counter()
    values = [private_key.decrypt(x) for x in numbers]
    return values, time.perf_counter() - t0


@protectors.register()
class HePaillierProtector(Protector):
    """EdgePro's HE baseline: element-wise Paillier encryption of the weights, decrypted whole at load."""

    name = "he-paillier"
    Params = HePaillierParams
    modes = ("load",)
    secret_kind = "encrypted-weights"

    def _protect(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        paillier, phe_util = _phe()
        p = self.params
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        total = sum(t.numel() for t in state.values())
        if p.sample is None or p.sample >= total:
            flat = np.arange(total)
        else:  # which weights are sampled is not secret, but it is drawn from the key all the same
            flat = np.sort(ctx.secret_rng().choice(total, size=p.sample, replace=False))
        where = _positions(state, flat)
        values = [state[n].view(-1)[i].item() for n, i in where]

        t0 = time.perf_counter()
        public, private = paillier.generate_paillier_keypair(n_length=p.keysize)
        keygen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        encrypted = [public.encrypt(v) for v in values]
        encrypt_s = time.perf_counter() - t0
        names = list(state)
        doc = {"scheme": "paillier (python-paillier)", "n": format(public.n, "x"), "names": names,
               "positions": [[names.index(n), i] for n, i in where],
               "ciphertexts": [format(x.ciphertext(be_secure=False), "x") for x in encrypted],
               "exponents": [x.exponent for x in encrypted]}
        decrypted, decrypt_s = _decrypt_all(private, doc)
        if decrypted != values:
            raise RuntimeError("he-paillier: Paillier round trip changed a value")

        for n, i in where:  # the AES-encrypted rest must not hold the sampled values
            state[n].view(-1)[i] = 0
        n_done = max(1, len(values))
        ct_bytes = (2 * p.keysize + 7) // 8  # an element of Z*_{n^2}
        artifact = self.new_artifact(
            model, key, cipher="Paillier (phe) + AES-256-GCM", paillier_keysize=p.keysize,
            paillier_gmpy2=bool(phe_util.HAVE_GMP), paillier_security_bits=security_bits(p.keysize),
            sampled_weights=len(values), total_weights=total, keygen_s=keygen_s,
            encrypt_s_per_weight=encrypt_s / n_done, decrypt_s_per_weight=decrypt_s / n_done,
            extrapolated_encrypt_s=encrypt_s / n_done * total, extrapolated_decrypt_s=decrypt_s / n_done * total,
            ciphertext_bytes_per_weight=ct_bytes, extrapolated_ciphertext_bytes=ct_bytes * total)
        artifact.put(CIPHERTEXTS, json.dumps(doc, separators=(",", ":")).encode())
        artifact.put_encrypted(PRIVATE_KEY, json.dumps({"p": str(private.p), "q": str(private.q)}).encode(), key)
        artifact.put_encrypted(REST, st_save(state), key)
        return artifact

    def private_key(self, artifact: Artifact, key: bytes, public_n: int) -> Any:
        """The Paillier private key (a ``phe.paillier.PaillierPrivateKey``) decrypted from the artifact."""
        paillier, _ = _phe()
        what = f"{artifact.where}/{PRIVATE_KEY}"
        try:
            d = json.loads(artifact.decrypt(PRIVATE_KEY, key))
            p, q = int(d["p"]), int(d["q"])
        except (ValueError, KeyError, TypeError):
            raise ArtifactError(f"{what}: malformed Paillier private key") from None
        if p * q != public_n:
            raise ArtifactError(f"{what}: the private key does not match the ciphertexts' public key")
        return paillier.PaillierPrivateKey(paillier.PaillierPublicKey(public_n), p, q)

    def _deploy(self, artifact, key, model_factory: ModelFactory, mode=None):
        self.check_mode(mode)
        _phe()  # before any work: without phe there is nothing to decrypt the sample with
        what = f"{artifact.where}/{CIPHERTEXTS}"
        try:
            doc = json.loads(artifact.file(CIPHERTEXTS))
            n = int(doc["n"], 16)
            names = [str(x) for x in doc["names"]]
            where = [(names[int(k)], int(i)) for k, i in doc["positions"]]
            if len(where) != len(doc["ciphertexts"]) or len(where) != len(doc["exponents"]):
                raise ValueError
        except (ValueError, KeyError, TypeError, IndexError):
            raise ArtifactError(f"{what}: malformed Paillier ciphertexts") from None
        model = load_state_bytes(model_factory(), artifact.decrypt(REST, key), f"{artifact.where}/{REST}")
        values, decrypt_s = _decrypt_all(self.private_key(artifact, key, n), doc)
        state = model.state_dict()
        with torch.no_grad():
            for (name, i), v in zip(where, values):
                if name not in state or not 0 <= i < state[name].numel():
                    raise ArtifactError(f"{what}: position {name}[{i}] is not in the model")
                state[name].view(-1)[i] = v
        model.paillier_decrypt_s = decrypt_s  # measured on this load, for whoever wants it
        return model.eval()

    def _stolen(self, artifact, model_factory):
        return model_factory().eval()  # ciphertexts only: the architecture with a random init

    def _authorize(self, model, artifact, key, pruned=None):
        return None  # the secret is the weights themselves: nothing to re-apply to other weights

    def secret_bytes(self, artifact: Artifact) -> int:
        """The whole model's Paillier ciphertexts (extrapolated when sampled): the artifact the method implies."""
        return int(artifact.meta.get("extrapolated_ciphertext_bytes", artifact.secret_bytes))

    def keyspace_bits(self, artifact: Artifact) -> float:
        """The Paillier modulus's security level (128 bits for 3072), below the 256-bit AES key."""
        return min(256.0, float(artifact.meta.get("paillier_security_bits", 256.0)))

