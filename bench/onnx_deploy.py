"""Deploying protected models on ONNX Runtime, the common edge runtime.

Each protector needs its own way onto ONNX so that the secret stays a secret:

- ``none``: the model, exported as it is.
- ``edgepro`` (mask mode): the lock-trained weights, with every lock site's mask a *graph input*; the device feeds
  the decrypted password's masks at each run, so the password is never baked into the ONNX file.
- ``aes`` (load): the whole ONNX file encrypted with AES-256-GCM; decrypted at load, session built from memory.
- ``aes`` (per-inference): the graph exported with every weight a graph input (the file holds no weights); before
  each run the weights are decrypted into one buffer whose NumPy views are fed to the session, then wiped.

Building these files (:func:`build`) happens before deployment and is not timed; :func:`load` is the device's
cold start and returns the callable the profiler times.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from protectors import lock
from protectors.aes import PerInferenceModel
from protectors.artifact import Artifact
from protectors.base import ModelFactory, Protector
from protectors.crypto import GcmDecryptor, decrypt, encrypt, wipe_buffer
from protectors.weights import safetensors_views

Runner = Callable[[np.ndarray], np.ndarray]


class NotSupported(Exception):
    """This protector/mode has no ONNX deployment; the message says why."""


def export(module: nn.Module, x: torch.Tensor, rest: list[torch.Tensor] | None = None) -> bytes:
    """Export with the dynamo exporter (needs onnxscript), quietly, with a dynamic batch dimension on ``x``.

    ``rest`` becomes graph inputs ``rest_0``, ``rest_1``, … (``module.forward(x, rest)`` takes them as a list).
    """
    module.eval()
    if x.shape[0] < 2:  # torch.export specializes sizes 0 and 1: trace with a batch of 2
        x = x.expand(2, *x.shape[1:]).contiguous()
    batch = {0: torch.export.Dim("batch")}
    args, dims = ((x,), (batch,)) if rest is None else ((x, list(rest)), (batch, [None] * len(rest)))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, input_names=["x"] + (
            [f"rest_{i}" for i in range(len(rest))] if rest is not None else []), output_names=["logits"],
            dynamic_shapes=dims, verbose=False)
    return program.model_proto.SerializeToString()


class _MaskInputs(nn.Module):
    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names
        self.sites = [model.get_submodule(n) for n in names]

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        for site, m in zip(self.sites, masks):
            site.external = m
        try:
            return self.model(x)
        finally:
            for site in self.sites:
                site.external = None


class _ParamsAsInputs(nn.Module):
    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.names, tensors)), (x,))


def _session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _bound(sess, constants: dict[str, np.ndarray] | None = None) -> Runner:
    """``run(x)`` through an I/O binding with the constant inputs (masks, weight views) bound once.

    Binding a NumPy array does not copy it, so a bound weight view sees every later decryption into its buffer.
    """
    binding = sess.io_binding()
    for name, array in (constants or {}).items():
        binding.bind_cpu_input(name, array)
    out_name = sess.get_outputs()[0].name
    batch = [None]

    def run(x: np.ndarray) -> np.ndarray:
        if x.shape[0] != batch[0]:  # the bound output is reused while the batch size stays the same
            binding.bind_output(out_name)
            batch[0] = x.shape[0]
        binding.bind_cpu_input("x", x)
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    run.keep = constants  # the bound arrays must outlive the binding
    return run


def _replace_initializers(model_bytes: bytes, values: dict[str, np.ndarray]) -> bytes:
    """The ONNX model with some initializers replaced (ORT's ``add_initializer`` is ignored for prepacked convs)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model_bytes)
    for init in proto.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(numpy_helper.to_array(init).dtype),
                                                  init.name))
    return proto.SerializeToString()


def build(protector: Protector, artifact: Artifact, key: bytes, factory: ModelFactory, mode: str,
          example: torch.Tensor) -> dict[str, bytes]:
    """The ONNX files a device needs for this protector and mode (added next to the artifact's files)."""
    name = protector.name
    if name == "none":
        return {"model.onnx": export(protector.deploy(artifact, key, factory), example)}
    if name == "edgepro" and mode == "mask":
        model = protector.deploy(artifact, key, factory, "mask")
        sites = sorted(lock.sites_of(model))
        with torch.no_grad():
            model(example)  # each site learns its activation's rank; masks are fed already shaped to broadcast
        masks = [model.get_submodule(s).view for s in sites]
        return {"model.onnx": export(_MaskInputs(model, sites), example, masks),
                "graph_inputs.txt": "\n".join(sites).encode()}
    if name == "edgepro" and mode == "fold":
        model = protector.stolen(artifact, factory)  # the lock-trained weights as stored, without masks
        producers = getattr(model, "fold_producers", {})
        return {"model.onnx": export(model, example), "fold_producers.json": json.dumps(producers).encode()}
    if name == "aes" and mode == "load":
        plain = export(protector.deploy(artifact, key, factory, "load"), example)
        return {"model.onnx.enc": encrypt(key, plain, artifact.aad() + b"|onnx")}
    if name == "aes" and mode == "per-inference":
        model = protector.deploy(artifact, key, factory, "per-inference")
        assert isinstance(model, PerInferenceModel)
        model.decryptor.decrypt()
        try:
            state = model.model.state_dict()
            names = list(state)
            graph = export(_ParamsAsInputs(model.model, names), example, list(state.values()))
        finally:
            wipe_buffer(model.decryptor.buffer)
        return {"graph.onnx": graph, "graph_inputs.txt": "\n".join(names).encode()}
    raise NotSupported(f"n/a: no ONNX deployment for {name} in mode {mode}")


def load(protector: Protector, artifact: Artifact, key: bytes, factory: ModelFactory, mode: str,
         threads: int = 1) -> Runner:
    """Cold start on ONNX Runtime: decrypt what the protector needs, build the session; returns ``run(x)``."""
    name = protector.name
    if name == "none":
        artifact.check_hashes()
        return _bound(_session(artifact.file("model.onnx"), threads))
    if name == "edgepro" and mode == "mask":
        password = protector.password(artifact, key)
        sess = _session(artifact.file("model.onnx"), threads)
        sites = artifact.file("graph_inputs.txt").decode().split("\n")
        shapes = {i.name: i.shape for i in sess.get_inputs()}
        feed = {f"rest_{i}": password.mask(s).numpy().reshape(shapes[f"rest_{i}"])
                for i, s in enumerate(sites) if f"rest_{i}" in shapes}
        return _bound(sess, feed)
    if name == "edgepro" and mode == "fold":
        # Fold at load: the producers' weights, scaled by the password's masks, override the ONNX initializers.
        from safetensors.numpy import load as np_load

        password = protector.password(artifact, key)
        producers = json.loads(artifact.file("fold_producers.json"))
        weights = np_load(artifact.file("weights.safetensors"))
        folded = {}
        for site in password.neurons:
            if site not in producers:
                raise NotSupported(f"n/a: site {site!r} has no foldable producer")
            mask = password.mask(site).numpy()
            for suffix in ("weight", "bias"):
                w = weights.get(f"{producers[site]}.{suffix}")
                if w is not None:
                    folded[f"{producers[site]}.{suffix}"] = np.ascontiguousarray(
                        w * mask.reshape(-1, *([1] * (w.ndim - 1))))
        return _bound(_session(_replace_initializers(artifact.file("model.onnx"), folded), threads))
    if name == "aes" and mode == "load":
        plain = decrypt(key, artifact.file("model.onnx.enc"), artifact.aad() + b"|onnx",
                        f"{artifact.where}/model.onnx.enc")
        return _bound(_session(plain, threads))
    if name == "aes" and mode == "per-inference":
        dec: GcmDecryptor = protector.decryptor(artifact, key)
        views = safetensors_views(dec.decrypt(), f"{artifact.where}/model.enc")
        names = artifact.file("graph_inputs.txt").decode().split("\n")
        sess = _session(artifact.file("graph.onnx"), threads)
        wanted = {i.name for i in sess.get_inputs()}
        arrays = {f"rest_{i}": views[n].numpy() for i, n in enumerate(names) if f"rest_{i}" in wanted}
        wipe_buffer(dec.buffer)
        inner = _bound(sess, arrays)

        def run(x: np.ndarray) -> np.ndarray:
            dec.decrypt()
            try:
                return inner(x)
            finally:
                wipe_buffer(dec.buffer)

        return run
    raise NotSupported(f"n/a: no ONNX deployment for {name} in mode {mode}")
