"""int8 post-training quantization of deployments: ONNX Runtime static QDQ, PyTorch FX graph mode.

**ONNX Runtime.** :class:`OrtInt8` is a graph rewrite for :func:`protectors.core.onnx_runtime.rewriting`: every
session a protector's own ``onnx_load`` makes inside the block is built from its graph statically quantized
(``quantize_static``, QDQ, per-channel int8 weights, uint8 activations, MinMax calibration on the given data). A
graph with secret initializers is calibrated with the secret applied (:func:`~protectors.core.onnx_runtime.bake`):
the activation ranges downstream of every lock site depend on it, so the owner quantizes at provisioning, holding
the secret. The secret's quantized tensors (``<name>_quantized``, its scale and zero point) are then taken out of
the quantized graph again and supplied at session creation, like the float secret: the int8 graph holds no secret
either (its activation scales are public, as every quantized model's are). A deployment that feeds float tensors
into its graph on every run (AES per-inference) is not applicable: its int8 form would need int8 weights encrypted.

**PyTorch.** :func:`torch_int8` quantizes the deployed module with FX graph mode (``x86`` backend). Modules FX
cannot trace (a protector's lock sites compare tensor ranks) are kept as float islands between dequantize and
quantize; a model FX cannot quantize at all is not applicable, with FX's reason.

:func:`int8_accuracies` is what an accuracy cell calls: authorized and stolen accuracy after quantization.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import os
import tempfile
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from protectors.core import onnx_runtime
from protectors.core.errors import BenchError, NotApplicable

#: the quantizer's suffixes of a quantized initializer ``name``: what derives from a secret tensor
SECRET_SUFFIXES = ("", "_quantized", "_scale", "_zero_point")


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs a pre-processing hint on the root logger for every model."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


class OrtInt8:
    """A graph rewrite ``(graph, secrets) -> (int8 graph, int8 secrets)``, calibrated on ``calib`` (N, C, H, W).

    Results are cached by graph and secret digests, so quantizing ahead of the timed cold start (the profiler's
    ``prepare``) leaves the cold start to load an already quantized graph, as a device would.
    """

    def __init__(self, calib: np.ndarray | torch.Tensor, samples: int = 32):
        x = calib.numpy() if isinstance(calib, torch.Tensor) else np.asarray(calib)
        self.calib = np.ascontiguousarray(x[:samples], dtype=np.float32)
        self.cache: dict[str, tuple[bytes, dict[str, np.ndarray]]] = {}
        self.quantized = 0  # how many graphs went through this rewrite (0 after a load: the protector bypassed it)

    def __call__(self, graph: bytes, secrets: dict[str, np.ndarray]) -> tuple[bytes, dict[str, np.ndarray]]:
        self.quantized += 1
        h = hashlib.sha256(graph)
        for name in sorted(secrets):
            h.update(name.encode() + b"\0" + np.ascontiguousarray(secrets[name]).tobytes())
        key = h.hexdigest()
        if key not in self.cache:
            self.cache[key] = self._quantize(graph, secrets)
        q, values = self.cache[key]
        return q, dict(values)

    def _quantize(self, graph: bytes, secrets: dict[str, np.ndarray]) -> tuple[bytes, dict[str, np.ndarray]]:
        import onnx
        from onnx import numpy_helper

        proto = onnx.load_from_string(onnx_runtime.bake(graph, secrets) if secrets else graph)
        fed = [i.name for i in proto.graph.input if i.name != "x"]
        if fed:
            raise NotApplicable(f"n/a: the deployment feeds {len(fed)} float tensors into its graph on every run "
                                "(per-inference decryption); an int8 form would need its int8 weights encrypted")
        q = onnx.load_from_string(self.quantize_graph(proto.SerializeToString()))
        if not secrets:
            return q.SerializeToString(), {}
        derived = {n + s: n for n in secrets for s in SECRET_SUFFIXES}
        values = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer if i.name in derived}
        missing = set(secrets) - set(derived[n] for n in values)
        if missing:
            raise BenchError(f"int8: the quantizer renamed secret initializer {sorted(missing)[0]!r}; cannot keep it "
                             "out of the quantized graph")
        kept = [i for i in q.graph.initializer if i.name not in values]
        del q.graph.initializer[:]
        q.graph.initializer.extend(kept)
        for name, v in values.items():  # back in as valueless graph inputs, then as secret initializers
            q.graph.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
        out, _ = onnx_runtime.secret_initializers(q.SerializeToString(), list(values))
        return out, values

    def quantize_graph(self, graph: bytes) -> bytes:
        """``graph`` (no secret initializers left) statically quantized to QDQ int8, calibrated on ``self.calib``."""
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        calib = self.calib

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(calib[i:i + 1] for i in range(len(calib)))

            def get_next(self):
                x = next(self.it, None)
                return None if x is None else {"x": x}

        with tempfile.TemporaryDirectory() as d, _quiet():
            out = os.path.join(d, "int8.onnx")
            try:
                quantize_static(onnx.load_from_string(graph), out, Reader(), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            except Exception as exc:  # the quantizer raises many types for graphs it cannot handle
                raise NotApplicable(f"n/a: ONNX Runtime static quantization failed: "
                                    f"{str(exc).splitlines()[0][:160]}") from None
            with open(out, "rb") as fh:
                return fh.read()


def ort_int8_runner(load: Callable[[], Any], quant: OrtInt8):
    """``load()`` (a protector's ``onnx_load``) with every session quantized by ``quant``; not applicable when the
    protector made no session through :mod:`protectors.core.onnx_runtime`."""
    before = quant.quantized
    with onnx_runtime.rewriting(quant):
        run = load()
    if quant.quantized == before:
        raise NotApplicable("n/a: the protector's ONNX deployment does not make its sessions through "
                            "protectors.core.onnx_runtime, so it cannot be quantized here")
    return run


def _leaf_classes(model: nn.Module, packages: tuple[str, ...]) -> list[type]:
    return sorted({type(m) for m in model.modules() if m is not model
                   and type(m).__module__.split(".")[0] in packages}, key=lambda c: c.__qualname__)


def torch_int8(model: nn.Module, calib: torch.Tensor, float_packages: tuple[str, ...] = ("protectors",),
               samples: int = 32) -> nn.Module:
    """``model`` quantized with PyTorch FX graph mode (x86 backend), calibrated on ``calib``; modules of classes from
    ``float_packages`` (a protector's own) stay float where FX cannot trace them."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    mapping = get_default_qconfig_mapping("x86")

    def attempt(custom: dict | None) -> nn.Module:
        prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, (calib[:1],), prepare_custom_config=custom)
        with torch.no_grad():
            for i in range(0, min(samples, len(calib)), 8):
                prepared(calib[i:i + 8])
        q = convert_fx(prepared).eval()
        with torch.no_grad():
            q(calib[:2])  # some patterns fail only when run
        return q

    with _quiet():
        try:
            return attempt(None)
        except Exception:  # e.g. a lock site whose forward branches on tensor ranks: keep the protector's modules float
            leaves = _leaf_classes(model, float_packages)
            try:
                return attempt({"non_traceable_module_class": leaves}) if leaves else attempt(None)
            except Exception as exc:
                raise NotApplicable(f"n/a: PyTorch FX quantization fails on this deployment: "
                                    f"{str(exc).splitlines()[0][:160]}") from None


def _accuracy(run: Callable[[np.ndarray], np.ndarray], x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    pred = np.concatenate([run(np.ascontiguousarray(x[i:i + batch].numpy())).argmax(1)
                           for i in range(0, len(x), batch)])
    return float((pred == y.numpy()).mean())


def int8_accuracies(protector, artifact, key: bytes, model_factory, calib_x: torch.Tensor, test_x: torch.Tensor,
                    test_y: torch.Tensor, example: torch.Tensor | None = None) -> dict[str, Any]:
    """Authorized and stolen accuracy of ``protector``'s ``artifact`` after int8 static quantization (ONNX Runtime
    QDQ, calibrated on ``calib_x``), scored on ``test_x``/``test_y``.

    For every deploy mode: the protector's ONNX deployment built on a copy of ``artifact``, quantized (the secret
    applied while calibrating), its accuracy, and the float ONNX accuracy beside it. The stolen copy (what the thief
    runs) is exported and quantized the same way, calibrated on the same data. Returns::

        {"int8_auth_acc": {mode: acc or None}, "float_auth_acc": {mode: acc or None},
         "int8_stolen_acc": acc or None, "stolen_acc": acc, "int8_notes": {mode or "stolen copy": why it is None}}

    ``example`` is one input for the export (default ``test_x[:1]``). Accuracies are fractions in [0, 1].
    """
    example = test_x[:1] if example is None else example
    quant = OrtInt8(calib_x)
    auth_q, auth_f, notes = {}, {}, {}
    for mode in protector.modes:
        art = copy.deepcopy(artifact)
        try:
            protector.onnx_build(art, key, model_factory, mode, example)
            art.seal(key)
            auth_f[mode] = _accuracy(protector.onnx_load(art, key, mode), test_x, test_y)
            run = ort_int8_runner(lambda art=art, mode=mode: protector.onnx_load(art, key, mode), quant)
            auth_q[mode] = _accuracy(run, test_x, test_y)
        except NotApplicable as exc:
            auth_q[mode] = None
            auth_f.setdefault(mode, None)
            notes[mode] = str(exc)
    stolen = protector.stolen(artifact, model_factory)
    graph = onnx_runtime.export(stolen, example)
    stolen_f = onnx_runtime.bound(onnx_runtime.session(graph, 1))
    try:
        stolen_q = onnx_runtime.bound(onnx_runtime.session(quant.quantize_graph(graph), 1))
        stolen_q_acc = _accuracy(stolen_q, test_x, test_y)
    except NotApplicable as exc:
        stolen_q_acc, notes["stolen copy"] = None, str(exc)
    return {"int8_auth_acc": auth_q, "float_auth_acc": auth_f, "int8_stolen_acc": stolen_q_acc,
            "stolen_acc": _accuracy(stolen_f, test_x, test_y), "int8_notes": notes}
