"""``shield``: TEE partial shielding, as benchmarked by TEESlice (Zhang et al., "No Privacy Left Outside",
IEEE S&P 2024, arXiv 2310.07152).

Part of the trained weights is kept inside a trusted execution environment (TEE); the rest is stored in plaintext.
The secret is the shielded values, a :class:`~protectors.core.kinds.weight_patch.WeightPatch` (whole tensors, or
values at flat positions; safetensors, AES-256-GCM encrypted under the device key: the key stands for what only the
TEE can unseal). Two variants (``variant``):

- ``deep`` (DarkneTZ, Mo et al., MobiSys 2020): the parameters *and* buffers (BN running statistics) of the last
  ``blocks`` blocks. A **block** is found by walking the module tree from the top: a plain container (exactly
  ``nn.Sequential``, ``nn.ModuleList`` or ``nn.ModuleDict``) is split into its children, any other module holding
  parameters is one block, and a block with no conv/linear layer (a lone norm layer) joins the block before it.
  Blocks are taken in registration order, which is execution order for the suite's models. This is TEESlice's
  definition (``set_deep_layers``: a conv with its BN for VGG, a residual block for ResNet, the classifier): LeNet-5
  has 5 blocks (conv1, conv2, fc1, fc2, fc3), the suite's ResNet-18 10 (stem conv+BN, 8 residual blocks, fc),
  MobileNetV2 20 (``features.0`` … ``features.18``, ``classifier.1``). In the thief's copy the shielded tensors are
  freshly initialized (:func:`fresh_init`: each module's ``reset_parameters`` under a seed that is not the public
  one, since ``model_factory()`` reproduces the trained model's own starting point). TEESlice puts public
  pretrained weights there; the suite has none.
- ``magnitude`` (Hou et al., TDSC): the global top ``fraction`` of |w| over the ``weight`` of every conv, batch-norm
  and linear layer (biases and BN statistics stay in plaintext). The secret is their flat positions and values; in
  the thief's copy they are zeroed (so the thief sees *where* they were, as in TEESlice; only the values are
  secret). ``fraction`` in [0, 1] is the secret-size dial (TEESlice sweeps {0, .01, .1, .3, .5, .7, .8, .9, .95, 1}).

Deploy modes:

- ``tee`` (default): the restored model with a **modeled** TEE cost. Each module running in the TEE is wrapped in
  :class:`TeeTimed`, which times its own forward pass (``time.perf_counter``; CUDA is synchronized first) and then
  busy-waits ``extra × that time``, so a latency profiler measures the modeled TEE time too. ``deep``: every module
  of a shielded block, ``extra = tee_slowdown − 1`` (the block runs ``tee_slowdown`` times slower). ``magnitude``:
  every layer holding shielded weights, ``extra = (tee_slowdown − 1) × s`` with ``s`` the share of that layer's
  weights that are shielded (its MACs touching shielded weights run in the TEE, the rest at normal speed).
  Not modeled: world switches and copies between normal and secure world, TEE memory limits (paging), and
  parameter-free modules (ReLU, pooling) between shielded blocks (run at normal speed). ``tee_slowdown`` = 10 by
  default; TEESlice notes up to 50×. Since a TEE runs on the CPU, ``tee`` is declared a host-memory mode (n/a on a
  GPU target), and it has no ONNX deployment (a Python busy-wait is no graph op: an export would silently drop the
  modeled cost).
- ``plain``: the restored weights without any cost model (what a device without a TEE would run; its ONNX
  deployment is the default sealed graph, decrypted at load).

The plaintext metadata records the (public) layout: shielded blocks or tensors, shielded value count, and
``tee_mac_fraction``, the share of the model's MACs (conv, linear, BN; one example input) inside the TEE, which is
TEESlice's latency proxy. ``keyspace_bits`` is 256 (the key): the values are continuous, so there is nothing smaller
to enumerate; what the secret is worth is measured by the attacks (fine-tuning the copy), as in TEESlice.

:meth:`~ShieldProtector.authorize` writes the shielded values back into an attacked copy (the TEE runs its part with
the true values whatever the thief changed outside). On a copy that structural pruning reshaped, output channels map
through ``pruned.kept[module]``; input channels through the kept channels of the most recent pruned module, run
before the layer, whose kept count explains the new input width (a linear after a flatten sees each channel
``spatial`` times, channel-major; a ResNet shortcut conv skips its block's own BNs to the block's input; a grouped
conv whose per-group input width changed is not mapped): :meth:`WeightPatch.remap
<protectors.core.kinds.weight_patch.WeightPatch.remap>`. Values
whose channels were pruned are dropped; a tensor whose new shape cannot be explained that way is left as the attacker
made it, and its name is listed in the returned model's ``shield_unmapped`` attribute. Checked on ResNet-18 (both
variants): the authorized pruned copy computes what the clean model computes with the pruned channels zeroed.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .core.artifact import Artifact
from .core.base import ModelFactory, PluginContext
from .core.errors import ArtifactError, ConfigError, NotApplicable
from .core.kinds.weight_patch import WeightPatch
from .core.plaintext import PlaintextWeightsProtector
from .core.registry_instance import protectors

SECRET = "shielded.enc"
VARIANTS = ("deep", "magnitude")
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
MAGNITUDE_LAYERS = (*LAYERS, _BatchNorm)


@dataclass(frozen=True)
class ShieldParams:
    variant: str = "deep"
    blocks: int = 1
    fraction: float = 0.1
    tee_slowdown: float = 10.0

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"parameter 'variant' must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.blocks < 1:
            raise ValueError(f"parameter 'blocks' must be >= 1, got {self.blocks}")
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"parameter 'fraction' must be in [0, 1], got {self.fraction}")
        if self.tee_slowdown < 1:
            raise ValueError(f"parameter 'tee_slowdown' must be >= 1 (a TEE is not faster), got {self.tee_slowdown}")


# -- which weights ----------------------------------------------------------------------------------------------
def model_blocks(model: nn.Module) -> list[list[str]]:
    """The model's blocks in registration order, each a list of module names (see the module docstring)."""
    out: list[list[str]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if next(child.parameters(), None) is None:
                continue
            if type(child) in CONTAINERS:
                walk(full + ".", child)
            elif out and not any(isinstance(m, LAYERS) for m in child.modules()):
                out[-1].append(full)  # a lone norm layer belongs to the layer before it
            else:
                out.append([full])

    walk("", model)
    return out


def fresh_init(model_factory: ModelFactory, seed: int) -> nn.Module:
    """The architecture with every module's default initialization redrawn from ``seed`` (``reset_parameters``);
    modules without one keep ``model_factory()``'s values."""
    with torch.random.fork_rng(devices=[]):
        model = model_factory()
        torch.manual_seed(seed)
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return model


def deep_secret(model: nn.Module, blocks: list[list[str]]) -> WeightPatch:
    """Every parameter and buffer of the given blocks, whole."""
    prefixes = tuple(f"{m}." for b in blocks for m in b)
    state = model.state_dict()
    return WeightPatch.whole(state, [k for k in state if k.startswith(prefixes)])


def magnitude_secret(model: nn.Module, fraction: float) -> WeightPatch:
    """The global top ``fraction`` of |w| over conv, BN and linear weights."""
    names = [f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, MAGNITUDE_LAYERS) and getattr(m, "weight", None) is not None]
    state = model.state_dict()
    flat = [state[n].detach().cpu().reshape(-1) for n in names]
    sizes = [len(f) for f in flat]
    k = round(fraction * sum(sizes))
    chosen = torch.topk(torch.cat(flat).abs(), k).indices if k else torch.empty(0, dtype=torch.long)
    positions, start = {}, 0
    for name, size in zip(names, sizes):
        idx = chosen[(chosen >= start) & (chosen < start + size)] - start
        idx = torch.sort(idx).values
        if len(idx):
            positions[name] = idx
        start += size
    return WeightPatch.gather(state, positions)


# -- the modeled TEE ---------------------------------------------------------------------------------------------
def _busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class TeeTimed(nn.Module):
    """A module run "in the TEE": times its own forward pass, then busy-waits ``extra`` × that time."""

    def __init__(self, inner: nn.Module, extra: float):
        super().__init__()
        self.inner = inner
        self.extra = float(extra)

    def forward(self, *args, **kwargs):
        cuda = next((a for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
        if cuda is not None:
            torch.cuda.synchronize(cuda.device)
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        if cuda is not None:
            torch.cuda.synchronize(cuda.device)
        if self.extra > 0:
            _busy_wait(self.extra * (time.perf_counter() - t0))
        return out


def wrap_tee(model: nn.Module, extra: dict[str, float]) -> nn.Module:
    """Replace each named module by :class:`TeeTimed` around it (``extra``: module name → busy-wait factor)."""
    for name, factor in extra.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, TeeTimed(owner.get_submodule(child), factor))
    return model


@torch.no_grad()
def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Multiply-accumulates per conv, linear and BN layer for one input (BN: one per output element)."""
    macs: dict[str, float] = {}

    def count(name: str, m: nn.Module, out: torch.Tensor) -> None:
        per_sample = out.numel() / max(1, out.shape[0])
        if isinstance(m, LAYERS):  # each output element costs in_features (or C_in/groups × kernel) MACs
            per_sample *= m.weight[0].numel()
        macs[name] = macs.get(name, 0.0) + float(per_sample)

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: count(n, m, o))
             for n, m in model.named_modules() if isinstance(m, MAGNITUDE_LAYERS)]
    was = model.training
    try:
        model.eval()(example[:1].to(next(model.parameters()).device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return macs


@protectors.register()
class ShieldProtector(PlaintextWeightsProtector):
    """TEE partial shielding (DarkneTZ deep layers or Magnitude top-p); see the module docstring."""

    name = "shield"
    Params = ShieldParams
    modes = ("tee", "plain")
    secret_kind = "withheld-weights"
    secret_file = SECRET
    host_memory_modes = ("tee",)

    def _protect(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        p = self.params
        model = copy.deepcopy(model).cpu().eval()
        thief = copy.deepcopy(model)
        info: dict = {}
        if p.variant == "deep":
            blocks = model_blocks(model)
            if p.blocks > len(blocks):
                raise ConfigError(f"protector 'shield': parameter 'blocks' is {p.blocks}, but the model has only "
                                  f"{len(blocks)} blocks ({', '.join('+'.join(b) for b in blocks)})")
            shielded = blocks[-p.blocks:]
            secret = deep_secret(model, shielded)
            # What the thief's copy gets instead: a fresh random init. Not model_factory()'s own, which the public
            # seed fixes and which is the trained model's starting point (its classifier barely moves from it: with
            # that init in place of LeNet-5's fc3, the stolen copy kept 0.94 of 0.98 accuracy on digits).
            fresh = fresh_init(ctx.model_factory, int(ctx.secret_rng().integers(2**63))).state_dict()
            with torch.no_grad():
                for name, t in thief.state_dict().items():
                    if name in secret.entries:
                        t.copy_(fresh[name])
            modules = [m for b in shielded for m in b]
            info["shielded_blocks"] = ["+".join(b) for b in shielded]
            info["shielded_modules"] = modules
            macs = layer_macs(model, ctx.example_input)
            tee_macs = sum(v for n, v in macs.items() if any(n == m or n.startswith(m + ".") for m in modules))
        else:
            secret = magnitude_secret(model, p.fraction)
            secret.zeroed().restore(thief, "shield")
            macs = layer_macs(model, ctx.example_input)
            tee_macs = sum(macs.get(n.rsplit(".", 1)[0], 0.0) * len(s.index) / math.prod(s.shape)
                           for n, s in secret.entries.items())
            candidates = sum(m.weight.numel() for m in model.modules()
                             if isinstance(m, MAGNITUDE_LAYERS) and getattr(m, "weight", None) is not None)
            info["candidate_weights"] = candidates
        shielded_values = secret.count
        total = sum(t.numel() for t in model.state_dict().values())
        return self.plaintext_artifact(
            model, key, secret.to_bytes(), weights=thief, shielded_tensors=sorted(secret.entries),
            shielded_values=shielded_values, state_values=total, shielded_fraction=shielded_values / max(1, total),
            tee_mac_fraction=tee_macs / max(1.0, sum(macs.values())), **info)

    def parse_secret(self, data: bytes, where: str) -> WeightPatch:
        """The shielded values: whole tensors (``deep``) or values at positions (``magnitude``)."""
        return WeightPatch.from_bytes(data, where)

    def tee_factors(self, artifact: Artifact, secret: WeightPatch) -> dict[str, float]:
        """Module name → busy-wait factor of its :class:`TeeTimed` wrapper in ``tee`` mode."""
        made = artifact.meta.get("params", {})  # the artifact's own (authenticated) parameters, not this instance's
        extra = float(made.get("tee_slowdown", self.params.tee_slowdown)) - 1.0
        if made.get("variant", self.params.variant) == "deep":  # whole blocks: a residual add and ReLU run there too
            return {str(m): extra for m in artifact.meta.get("shielded_modules", [])}
        return {n.rsplit(".", 1)[0]: extra * len(s.index) / math.prod(s.shape) for n, s in secret.entries.items()}

    def _deploy(self, artifact, key, model_factory: ModelFactory, mode=None):
        mode = self.check_mode(mode)
        secret = self.secret(artifact, key)
        model = secret.restore(self.plaintext_model(artifact, model_factory), artifact.where)
        if mode == "tee":
            try:
                wrap_tee(model, self._outermost(self.tee_factors(artifact, secret)))
            except AttributeError as exc:
                raise ArtifactError(f"{artifact.where}: shielded module not in the model ({exc})") from None
        return model.eval()

    @staticmethod
    def _outermost(factors: dict[str, float]) -> dict[str, float]:
        """Drop modules nested inside another wrapped one (a block's BN inside its wrapped residual block)."""
        names = sorted(factors, key=len)
        keep: dict[str, float] = {}
        for n in names:
            if not any(n.startswith(k + ".") for k in keep):
                keep[n] = factors[n]
        return keep

    def _authorize(self, model, artifact, key, pruned=None):
        secret, unmapped = self.secret(artifact, key).remap(model, pruned)
        model = secret.restore(copy.deepcopy(model), artifact.where).eval()
        model.shield_unmapped = unmapped
        return model

    def _onnx_build(self, artifact, key, model_factory, mode, example):
        if self.check_mode(mode) == "tee":
            raise NotApplicable(self._no_onnx)
        return super()._onnx_build(artifact, key, model_factory, mode, example)

    def _onnx_load(self, artifact, key, mode, threads=1):
        if self.check_mode(mode) == "tee":
            raise NotApplicable(self._no_onnx)
        return super()._onnx_load(artifact, key, mode, threads)

    _no_onnx = ("n/a: shield tee models the TEE's cost by timing each shielded module and busy-waiting in Python; "
                "an ONNX graph cannot express that (the export would drop the cost and measure plain)")
