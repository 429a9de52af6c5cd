"""ONNX Runtime, the common edge runtime: export, sessions, I/O binding, and the generic sealed-graph deployment.

Each protector builds its own ONNX files (:meth:`Protector.onnx_build`) and loads them (:meth:`Protector.onnx_load`)
so that its secret stays a secret on the device; this module holds what they share. Building happens before
deployment and is not timed; loading is the device's cold start and returns the ``run(x)`` the profiler times.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .errors import NotApplicable

if TYPE_CHECKING:
    from .artifact import Artifact
    from .base import OnnxRunner

SEALED = "model.onnx.enc"
MASKED = "model.onnx"
MASK_SITES = "graph_inputs.txt"


#: a protector/mode with no ONNX deployment raises :class:`~protectors.core.errors.NotApplicable` (this name is the
#: same class, kept for plugins written against earlier releases)
NotSupported = NotApplicable


def export(module: nn.Module, x: torch.Tensor, rest: list[torch.Tensor] | None = None) -> bytes:
    """Export with the dynamo exporter (needs onnxscript), quietly, with a dynamic batch dimension on ``x``.

    ``rest`` becomes graph inputs ``rest_0``, ``rest_1``, … (``module.forward(x, rest)`` takes them as a list).
    """
    module.eval()
    if x.shape[0] < 2:  # torch.export specializes sizes 0 and 1: trace with a batch of 2
        x = x.expand(2, *x.shape[1:]).contiguous()
    batch = {0: torch.export.Dim("batch")}
    args, dims = ((x,), (batch,)) if rest is None else ((x, list(rest)), (batch, [None] * len(rest)))
    names = ["x"] + ([f"rest_{i}" for i in range(len(rest))] if rest is not None else [])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=["logits"],
                                    dynamic_shapes=dims, verbose=False)
    return program.model_proto.SerializeToString()


def session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a malformed graph
        from .errors import ArtifactError

        raise ArtifactError(f"ONNX graph rejected by ONNX Runtime: {str(exc).splitlines()[0][:200]}") from None


def bound(sess, constants: dict[str, np.ndarray] | None = None) -> OnnxRunner:
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


def graph_inputs(sess) -> dict[str, list]:
    """The session's inputs other than ``x``, with their shapes."""
    return {i.name: i.shape for i in sess.get_inputs() if i.name != "x"}


def replace_initializers(model_bytes: bytes, values: dict[str, np.ndarray]) -> bytes:
    """The ONNX model with some initializers replaced (ORT's ``add_initializer`` is ignored for prepacked convs)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model_bytes)
    for init in proto.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(numpy_helper.to_array(init).dtype),
                                                  init.name))
    return proto.SerializeToString()


def sealed_graph(model: nn.Module, example: torch.Tensor, artifact: Artifact, key: bytes) -> None:
    """Add the authorized ``model``, exported and encrypted, to the artifact (see :func:`load_sealed_graph`)."""
    artifact.put_encrypted(SEALED, export(model, example), key)


def load_sealed_graph(artifact: Artifact, key: bytes, threads: int) -> OnnxRunner:
    return bound(session(artifact.decrypt(SEALED, key), threads))


class _MaskInputs(nn.Module):
    """A model with masked lock sites, each site's mask a graph input (for export)."""

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


def put_masked_graph(artifact: Artifact, model: nn.Module, example: torch.Tensor) -> None:
    """Add ``model`` (with :class:`~protectors.core.lock.MaskedSite` sites installed) exported with every site's mask a
    graph input: the secret masks are never in the file; :func:`load_masked_graph` feeds them at load."""
    from .lock import sites_of

    sites = sorted(sites_of(model))
    with torch.no_grad():
        model(example)  # each site learns its activation's rank: the masks are fed already shaped to broadcast
    masks = [model.get_submodule(s).view for s in sites]
    artifact.put(MASKED, export(_MaskInputs(model, sites), example, masks))
    artifact.put(MASK_SITES, "\n".join(sites).encode())


def load_masked_graph(artifact: Artifact, mask_of, threads: int) -> OnnxRunner:
    """A session over :func:`put_masked_graph`'s file with each site's mask (``mask_of(site)``) bound once."""
    sess = session(artifact.file(MASKED), threads)
    sites = artifact.file(MASK_SITES).decode().split("\n")
    shapes = graph_inputs(sess)
    feed = {f"rest_{i}": mask_of(s).numpy().reshape(shapes[f"rest_{i}"])
            for i, s in enumerate(sites) if f"rest_{i}" in shapes}
    return bound(sess, feed)
