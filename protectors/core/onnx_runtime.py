"""ONNX Runtime, the common edge runtime: export, sessions, I/O binding, and the generic sealed-graph deployment.

Each protector builds its own ONNX files (:meth:`Protector.onnx_build`) and loads them (:meth:`Protector.onnx_load`)
so that its secret stays a secret on the device; this module holds what they share. Building happens before
deployment and is not timed; loading is the device's cold start and returns the ``run(x)`` the profiler times.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from .errors import NotApplicable

if TYPE_CHECKING:
    from .artifact import Artifact
    from .base import OnnxRunner

SEALED = "model.onnx.enc"
MASKED = "model.onnx"


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


#: the external-data location of a secret initializer: no file, its value is supplied at session creation
IN_MEMORY = "secret-supplied-at-session-creation"
#: how a graph's secret initializers map to the protector's secret tensors (see :func:`put_secret_graph`)
SECRETS = "secret_initializers.json"

#: a rewrite ``(graph, secrets) -> (graph, secrets)`` applied to every session this module makes while it is set
#: (the harness sets it, e.g. to quantize; protectors never do)
_rewrite: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("onnx_graph_rewrite", default=None)


@contextlib.contextmanager
def rewriting(fn: Callable[[bytes, dict[str, np.ndarray]], tuple[bytes, dict[str, np.ndarray]]]):
    """Every session :func:`session` makes inside this block is built from ``fn(graph, secrets)``: a harness uses
    it to deploy every protector's own ONNX graphs differently (e.g. int8) without the protectors knowing."""
    token = _rewrite.set(fn)
    try:
        yield
    finally:
        _rewrite.reset(token)


def session(model_bytes: bytes, threads: int, secrets: dict[str, np.ndarray] | None = None):
    """An ONNX Runtime CPU session; ``secrets`` are the values of the graph's secret initializers (those
    :func:`secret_initializers` left without a value), handed over in memory at session creation: ONNX Runtime
    injects them before optimizing the graph, so a secret costs what a constant costs and is never in a file."""
    import onnxruntime as ort

    fn = _rewrite.get()
    if fn is not None:
        model_bytes, secrets = fn(model_bytes, dict(secrets or {}))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if secrets:
        names = list(secrets)
        # np.require keeps a 0-d scale 0-d (np.ascontiguousarray makes it 1-d); ONNX Runtime copies the values
        so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(np.require(secrets[n], requirements="C"))
                                             for n in names])
    try:
        return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a malformed graph
        from .errors import ArtifactError

        raise ArtifactError(f"ONNX graph rejected by ONNX Runtime: {str(exc).splitlines()[0][:200]}") from None


def bound(sess, constants: dict[str, np.ndarray] | None = None) -> OnnxRunner:
    """``run(x)`` through an I/O binding with the per-run tensors (e.g. weight views) bound once.

    Binding a NumPy array does not copy it, so a bound weight view sees every later decryption into its buffer.
    A secret that does not change between runs belongs in :func:`session`'s ``secrets`` instead: a bound input is
    read on every run, an initializer is a constant.
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


def secret_initializers(model_bytes: bytes, names: list[str]) -> tuple[bytes, dict[str, dict]]:
    """The graph with its inputs ``names`` turned into initializers that hold no value (external data at
    :data:`IN_MEMORY`, which is no file), and each one's shape and dtype. Names the graph does not take are
    skipped (the exporter drops inputs a graph never reads)."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load_from_string(model_bytes)
    keep, specs = [], {}
    for inp in proto.graph.input:
        if inp.name not in names:
            keep.append(inp)
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        if any(d <= 0 for d in shape):
            raise ValueError(f"secret graph input {inp.name!r} has a dynamic shape {shape}")
        init = TensorProto(name=inp.name, data_type=tt.elem_type, dims=shape, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", IN_MEMORY), ("offset", "0"),
                     ("length", str(int(np.prod(shape)) * helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize))):
            entry = init.external_data.add()
            entry.key, entry.value = k, v
        proto.graph.initializer.append(init)
        specs[inp.name] = {"shape": shape, "dtype": str(helper.tensor_dtype_to_np_dtype(tt.elem_type))}
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    return proto.SerializeToString(), specs


def bake(model_bytes: bytes, secrets: dict[str, np.ndarray]) -> bytes:
    """The graph with its secret initializers holding ``secrets`` as plain constants: the design floor of an in-graph
    secret (what it costs at best), and what a quantizer must calibrate. Never written to a device's storage."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model_bytes)
    for init in proto.graph.initializer:
        if init.name in secrets:
            init.CopyFrom(numpy_helper.from_array(np.asarray(secrets[init.name]), init.name))
    return proto.SerializeToString()


def put_secret_graph(artifact: Artifact, name: str, graph: bytes, secrets: dict[str, str]) -> None:
    """Store ``graph`` as ``name`` with its inputs ``secrets`` (graph input → the protector's label for that secret
    tensor, e.g. its lock site) as valueless initializers, and the labels, shapes and dtypes in :data:`SECRETS`."""
    import json

    graph, specs = secret_initializers(graph, list(secrets))
    artifact.put(name, graph)
    artifact.put(SECRETS, json.dumps({"graph": name, "inputs": {n: {"label": secrets[n], **s}
                                                               for n, s in specs.items()}}).encode())


def load_secret_graph(artifact: Artifact, values: Mapping[str, Any], threads: int) -> OnnxRunner:
    """A session over :func:`put_secret_graph`'s graph with each secret (``values[label]``, reshaped to the graph's
    shape) supplied at session creation. The runner's ``floor()`` builds the same deployment with the secrets baked
    in as constants (the profiler's design floor; it holds the secrets as long as the runner lives)."""
    import json

    from .errors import ArtifactError

    where = f"{artifact.where}/{SECRETS}"
    try:
        spec = json.loads(artifact.file(SECRETS))
        graph = artifact.file(spec["graph"])
        secrets = {n: np.asarray(values[s["label"]], dtype=s["dtype"]).reshape(s["shape"])
                   for n, s in spec["inputs"].items()}
    except KeyError as exc:
        raise ArtifactError(f"{where}: names {exc.args[0]!r}, which the deployment does not have") from None
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{where}: a secret does not fit its graph initializer ({exc})") from None
    run = bound(session(graph, threads, secrets))
    rewrite = _rewrite.get()

    def floor() -> OnnxRunner:
        token = _rewrite.set(rewrite)
        try:
            return bound(session(bake(graph, secrets), threads))
        finally:
            _rewrite.reset(token)

    run.floor = floor
    return run


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
    """Add ``model`` (with :class:`~protectors.core.lock.MaskedSite` sites installed) exported with every site's mask
    a valueless initializer: the secret masks are never in the file; :func:`load_masked_graph` supplies them."""
    from .lock import sites_of

    sites = sorted(sites_of(model))
    with torch.no_grad():
        model(example)  # each site learns its activation's rank: the masks are fed already shaped to broadcast
    masks = [model.get_submodule(s).view for s in sites]
    graph = export(_MaskInputs(model, sites), example, masks)
    put_secret_graph(artifact, MASKED, graph, {f"rest_{i}": s for i, s in enumerate(sites)})


def load_masked_graph(artifact: Artifact, mask_of, threads: int) -> OnnxRunner:
    """A session over :func:`put_masked_graph`'s file with each site's mask (``mask_of(site)``) supplied at session
    creation (:func:`load_secret_graph`)."""
    return load_secret_graph(artifact, _Lazy(lambda site: mask_of(site).numpy()), threads)


class _Lazy(Mapping):
    """``values[label]`` computed on demand (a protector's secret by label, e.g. a site's mask)."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, label):
        try:
            return self.fn(label)
        except (KeyError, IndexError):
            raise KeyError(label) from None

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0
