"""``nnsplitter``: a few hundred conv weights obfuscated, their positions and values held by a TEE.

Zhou, Luo, Ren, Xu, *NNSplitter: An Active Defense Solution for DNN Model via Automated Weight Obfuscation*,
ICML 2023 (PMLR 202:42614–42624), arXiv 2305.00097; official code ``github.com/Tongzhou0101/NNSplitter``. The
model is not retrained: only the weights picked in step 2 move, and the thief's copy is the whole model with those
few weights changed (every one of them inside its layer's normal range).

1. **Layers** — every ``nn.Conv2d`` whose kernel is larger than 1×1 (the code's ResNet rule); a model without one
   uses all its ``nn.Conv2d`` (the code's MobileNet rule). None at all is a :class:`ConfigError`.
2. **Mask** — per layer, ``filters_per_layer`` output filters (k, default 1) drawn uniformly without repeats with
   the key-derived RNG (``ctx.secret_rng()``). c is the mean of those layers' weights (``c`` to fix it). In each
   chosen filter, the ``weights_per_filter`` weights (default 16, all of a smaller filter) nearest to c are masked;
   with ``eps`` given, the paper's rule instead: every weight of the filter with |w − c| < ε.
3. **Obfuscation** — only the masked weights are optimised to *maximise* the cross-entropy (loss = −CE; the code's
   λ = 0, so no L1 term), Adam at ``lr`` 0.05, batch-norm frozen (eval mode, gradients on), gradients multiplied by
   the mask, masked weights clamped to their layer's original [min, max] after every step. After each epoch the
   accuracy on the calibration set is measured; training stops when it has not fallen for ``patience`` (2) checks
   in a row, or after ``epochs`` (5). The masked values of the check with the lowest accuracy are kept (as in the
   code, the first check's are kept whatever they score: never the original values).
4. **Search** — steps 2–3 are run for ``trials`` (5) independent draws of the filters (the same key-derived RNG,
   continued) and the draw whose obfuscated model is least accurate on the calibration set is kept. This stands in
   for the paper's controller, whose reward is the same −accuracy and which keeps the best of its rollouts (5 per
   step). ``max_batches`` (200) is the budget of training batches for the whole search: each epoch of each trial
   is cut at ``max_batches / (trials · epochs)`` batches (8 by default).
5. **Artifact** — the obfuscated weights in plaintext (``weights.safetensors``, the thief's copy); the secret, a
   :class:`~protectors.core.kinds.weight_patch.WeightPatch` (per conv weight its shape, the flat positions and the
   original values; safetensors bytes, no pickle), AES-256-GCM encrypted (``positions.enc``). Plaintext metadata:
   counts, the calibration accuracies and the keyspace only. With the defaults on LeNet-5: 2 layers × 16 weights,
   a secret of under 1 kB.

Defaults: ``filters_per_layer=1, weights_per_filter=16, lr=0.05, epochs=5, max_batches=200, patience=2, trials=5,
c=None`` (mean of the conv weights), ``eps=None`` (per filter, see step 2).

Deploy modes: ``restore`` writes the original values back at load (no cost per inference; the original weights sit
in memory, like AES's decrypt-at-load). ``tee`` keeps the obfuscated weights in every conv and, per inference, adds
the correction a TEE would compute: the input convolved with ΔW = W_orig − W_obf of the affected filters only
(a k-filter conv), added to those output channels (convolution is linear, so this equals the original conv).
On ONNX Runtime ``restore`` is the default sealed graph (decrypted at load); ``tee`` exports the obfuscated model
with ΔW and the affected filters' indices as valueless initializers, supplied from the decrypted secret at session
creation (in memory, as constants), so neither is in the ONNX file.

``authorize`` writes the original values back into an attacked copy. On a structurally pruned copy
(``pruned.kept``) a position is restored only where its output filter survived (``kept[layer]``) and its input
channel survived (the kept channels of the last pruned module with the conv's input width that runs before the
conv, found by one forward pass); indices are remapped to the new shape (:meth:`WeightPatch.remap
<protectors.core.kinds.weight_patch.WeightPatch.remap>`). A layer whose new shape cannot be explained that way is
left as it is.

``keyspace_bits``: log2 of the ways to choose the secret positions knowing the method and its public parameters,
Σ_layers log2 C(filters, k) + Σ_chosen filters log2 C(filter size, masked weights), capped at 256 (the AES key)
where larger. The original values are not counted (they lie within ε of c, which a thief can estimate from the
stolen weights' mean). It is an upper bound: most obfuscated weights end pinned at their layer's min or max
(``pinned_at_bounds`` in the metadata), several equal to the layer's extreme, which stands out; and keeping the
best of ``trials`` draws favours damaging filters.

Deviations from the paper and its code:

- **Filter choice**: random search (``trials`` uniform draws with the key-derived RNG, the least accurate kept)
  instead of the RL controller (an RNN trained with REINFORCE on −accuracy, 5 rollouts per step, up to 20 steps,
  keeping the best rollout); so the filters found are less damaging than the paper's.
- **Layers**: convs only; the code's default (``filter_flag=1``) also obfuscates rows of the linear layers (its
  controller has a decoder for the classifier).
- **ε**: by default per filter, the distance to c of its ``weights_per_filter``-th nearest weight, instead of one
  fixed ε per model (8e-5 with c = −0.0012 for ResNet-18, selecting about 275 of 11M weights): on LeNet-5's 6+16
  filters a fixed ε that small selects almost nothing. ``eps`` restores the paper's rule.
- **c**: the mean of the selected layers' weights, computed per model (the README's suggestion; the code
  hard-codes c per model).
- **Clamp range**: the layer's own original [min, max] instead of one range per model.
- **Budget**: at most ``epochs`` (5; the code: up to 100) epochs per trial and ``max_batches`` training batches in
  all (a CPU budget: about 6k images); early stopping on the harness's calibration set (training images) instead of
  a validation split, with the code's patience of 2.
- **Secret**: the original values themselves, so restoring is exact (the code recovers by writing c back, which
  is off by up to ε per weight).
- **TEE**: simulated in the graph (a PyTorch module / ONNX subgraph), not run in a real enclave.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .core import onnx_runtime
from .core.artifact import Artifact
from .core.base import PluginContext
from .core.errors import ArtifactError, ConfigError
from .core.kinds.weight_patch import Patch, WeightPatch
from .core.plaintext import PlaintextWeightsProtector
from .core.registry_instance import protectors
from .core.weights import WEIGHTS

SECRET = "positions.enc"
ONNX = "model.onnx"


@dataclass(frozen=True)
class NNSplitterParams:
    filters_per_layer: int = 1
    weights_per_filter: int = 16
    lr: float = 0.05
    epochs: int = 5
    max_batches: int = 200
    patience: int = 2
    trials: int = 5
    c: float | None = None
    eps: float | None = None

    def validate(self) -> None:
        for name in ("filters_per_layer", "weights_per_filter", "epochs", "max_batches", "patience", "trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name!r} must be >= 1, got {getattr(self, name)}")
        if self.max_batches < self.trials * self.epochs:
            raise ValueError(f"parameter 'max_batches' must be >= 'trials' × 'epochs' ({self.trials * self.epochs}) "
                             f"so that every epoch of every trial sees a batch, got {self.max_batches}")
        if self.lr <= 0:
            raise ValueError(f"parameter 'lr' must be > 0, got {self.lr}")
        if self.eps is not None and self.eps <= 0:
            raise ValueError(f"parameter 'eps' must be > 0 (or None), got {self.eps}")


def filter_size(p: Patch) -> int:
    """Weights per output filter of a patched conv weight."""
    return math.prod(p.shape[1:])


def keyspace_bits(patch: WeightPatch) -> float:
    """log2 of the position choices with the same counts (filters per layer, weights per filter)."""
    bits = 0.0
    for p in patch.entries.values():
        filters, counts = torch.unique(p.index // filter_size(p), return_counts=True)
        bits += math.log2(math.comb(p.shape[0], len(filters)))
        bits += sum(math.log2(math.comb(filter_size(p), int(m))) for m in counts)
    return bits


def conv_layers(model: nn.Module) -> list[str]:
    """The convs NNSplitter obfuscates: kernels larger than 1×1, else every ``nn.Conv2d``."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"protector 'nnsplitter': model {type(model).__name__} has no nn.Conv2d layer to obfuscate")
    big = [n for n, m in convs if math.prod(m.kernel_size) > 1]
    return big or [n for n, _ in convs]


def choose_positions(model: nn.Module, names: list[str], p: NNSplitterParams,
                     rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], float]:
    """Per layer, the sorted flat positions of the masked weights (see module doc, step 2), and c."""
    weights = {n: model.get_submodule(n).weight.detach() for n in names}
    c = float(torch.cat([w.flatten() for w in weights.values()]).double().mean()) if p.c is None else p.c
    out = {}
    for name, w in weights.items():
        per_filter = math.prod(w.shape[1:])
        filters = sorted(int(f) for f in rng.choice(w.shape[0], size=min(p.filters_per_layer, w.shape[0]),
                                                     replace=False))
        picked = []
        for f in filters:
            dist = (w[f].flatten().double() - c).abs().cpu()
            if p.eps is None:
                idx = torch.argsort(dist, stable=True)[: min(p.weights_per_filter, per_filter)]
            else:
                idx = torch.nonzero(dist < p.eps).flatten()
            picked.append(f * per_filter + idx)
        out[name] = torch.sort(torch.cat(picked)).values.to(torch.int64)
    if not sum(len(i) for i in out.values()):
        raise ConfigError(f"protector 'nnsplitter': parameter 'eps' ({p.eps}) selects no weight within eps of "
                          f"c = {c:.3g} in the chosen filters; use a larger eps or leave it unset")
    return out, c


def obfuscate(model: nn.Module, positions: dict[str, torch.Tensor], ctx: PluginContext,
              p: NNSplitterParams) -> tuple[nn.Module, dict[str, float]]:
    """Step 3 on a copy of ``model``: the masked weights moved to maximise the loss; returns the copy and stats."""
    model = copy.deepcopy(model).to(ctx.device).eval()  # eval: batch-norm statistics stay frozen
    for w in model.parameters():
        w.requires_grad_(False)
    weights, masks, bounds = [], [], []
    for name, idx in positions.items():
        w = model.get_submodule(name).weight
        m = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        m[idx.to(w.device)] = True
        weights.append(w.requires_grad_(True))
        masks.append(m.view_as(w))
        bounds.append((float(w.detach().min()), float(w.detach().max())))
    opt = torch.optim.Adam(weights, lr=p.lr)
    per_epoch = max(1, p.max_batches // (p.trials * p.epochs))

    def calib_acc() -> float:
        return ctx.trainer.evaluate(model, ctx.calib_x, ctx.calib_y)

    start, best = calib_acc(), math.inf  # as the code: the first epoch's weights are kept whatever they score
    best_values: list[torch.Tensor] = []
    stale, epochs, batches = 0, 0, 0
    for _ in range(p.epochs):
        for i, (x, y) in enumerate(ctx.train_loader):
            if i >= per_epoch:
                break
            x, y = x.to(ctx.device), y.to(ctx.device)
            loss = -F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for w, m in zip(weights, masks):
                w.grad.mul_(m)
            opt.step()
            with torch.no_grad():
                for w, m, (lo, hi) in zip(weights, masks, bounds):
                    w.copy_(torch.where(m, w.clamp(lo, hi), w))
            batches += 1
        epochs += 1
        acc = calib_acc()
        if acc < best:
            best, stale = acc, 0
            best_values = [w.detach()[m].clone() for w, m in zip(weights, masks)]
        else:
            stale += 1
            if stale >= p.patience:
                break
    pinned = 0
    with torch.no_grad():
        for w, m, v, (lo, hi) in zip(weights, masks, best_values, bounds):
            w[m] = v
            pinned += int(((v == lo) | (v == hi)).sum())
            w.requires_grad_(False)
    stats = {"calib_acc_before": start, "calib_acc_after": best, "epochs_run": epochs, "batches_run": batches,
             "pinned_at_bounds": pinned}
    return model.cpu().eval(), stats


class TeeConv(nn.Module):
    """A conv with obfuscated weights plus the TEE's correction: ``conv(x)`` + the input convolved with ΔW of the
    affected filters only, added to those output channels (``external`` feeds ΔW and the filters as graph inputs)."""

    def __init__(self, conv: nn.Conv2d, filters: torch.Tensor, delta: torch.Tensor):
        super().__init__()
        self.conv = conv
        self.register_buffer("filters", filters.to(torch.int64), persistent=False)
        self.register_buffer("delta", delta, persistent=False)
        per_group_out = conv.out_channels // conv.groups
        per_group_in = conv.in_channels // conv.groups
        # Input channels each affected filter reads (its group's); all of them when groups == 1.
        self.slices = [(int(f) // per_group_out * per_group_in, (int(f) // per_group_out + 1) * per_group_in)
                       for f in filters] if conv.groups > 1 else None
        self.external: tuple[torch.Tensor, torch.Tensor] | None = None

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if c.padding_mode != "zeros":
            return F.conv2d(F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode), w, None, c.stride,
                            0, c.dilation)
        return F.conv2d(x, w, None, c.stride, c.padding, c.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta, filters = self.external if self.external is not None else (self.delta, self.filters)
        if self.slices is None:
            corr = self._conv(x, delta)
        else:
            corr = torch.cat([self._conv(x[:, a:b], delta[j:j + 1]) for j, (a, b) in enumerate(self.slices)], 1)
        return self.conv(x).index_add(1, filters, corr)


def layer_correction(w: torch.Tensor, p: Patch) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔW of the affected filters [k, in/groups, kh, kw], their indices) for obfuscated weight ``w``."""
    w = w.detach()
    if tuple(w.shape) != p.shape:
        raise ArtifactError(f"NNSplitter secret: a layer has shape {tuple(w.shape)}, the secret {p.shape}")
    size = filter_size(p)
    filters = torch.unique(p.index // size)
    delta = torch.zeros(len(filters), size, dtype=w.dtype)
    row = torch.searchsorted(filters, p.index // size)
    delta[row, p.index % size] = p.values.to(w.dtype) - w.reshape(-1)[p.index]
    return delta.view(len(filters), *p.shape[1:]), filters


def tee_corrections(model: nn.Module, patch: WeightPatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per conv (module name), :func:`layer_correction` against ``model``'s (obfuscated) weights."""
    out = {}
    for name, p in patch.entries.items():
        layer = name.removesuffix(".weight")
        try:
            w = model.get_submodule(layer).weight
        except AttributeError:
            raise ArtifactError(f"NNSplitter secret names layer {layer!r}, which the model does not have") from None
        out[layer] = layer_correction(w, p)
    return out


def install_tee(model: nn.Module, corrections: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    for name, (delta, filters) in corrections.items():
        model.set_submodule(name, TeeConv(model.get_submodule(name), filters, delta))
    return model.eval()


class _CorrectionInputs(nn.Module):
    """The tee-mode model with every ΔW and filter index list a graph input (for ONNX export; the inputs then become
    initializers whose values are supplied at session creation)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.tees = model, [model.get_submodule(n) for n in names]

    def forward(self, x: torch.Tensor, rest: list[torch.Tensor]) -> torch.Tensor:
        for j, tee in enumerate(self.tees):
            tee.external = (rest[2 * j], rest[2 * j + 1])
        try:
            return self.model(x)
        finally:
            for tee in self.tees:
                tee.external = None


@protectors.register()
class NNSplitterProtector(PlaintextWeightsProtector):
    """NNSplitter weight obfuscation; see the module docstring."""

    name = "nnsplitter"
    Params = NNSplitterParams
    secret_kind = "weight-correction"
    secret_file = SECRET
    modes = ("restore", "tee")
    # The paper reaches chance on ResNet-18/CIFAR-10 (17 conv layers); on LeNet-5's two conv layers the stolen copy
    # keeps 0.22-0.49 (digits, six key draws): the suite reports it rather than claiming a useless copy.
    claims_stolen_chance = False

    def _protect(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        model = copy.deepcopy(model).cpu().eval()  # the caller's model stays where it is
        names = conv_layers(model)
        rng = ctx.secret_rng()  # which filters is part of the secret: drawn from the key, never from ctx.seed
        best, batches = None, 0
        for _ in range(self.params.trials):  # random search in place of the paper's RL controller: keep the best
            positions, c = choose_positions(model, names, self.params, rng)
            obf, stats = obfuscate(model, positions, ctx, self.params)
            batches += stats["batches_run"]
            if best is None or stats["calib_acc_after"] < best[3]["calib_acc_after"]:
                best = (positions, c, obf, stats)
        positions, _, obf, stats = best  # c is not kept: restoring writes the original values themselves
        stats["batches_total"] = batches
        secret = WeightPatch.gather(model.state_dict(), {f"{n}.weight": i for n, i in positions.items()})
        # Plaintext metadata is the thief's to read: counts and accuracies only, never positions or c.
        return self.plaintext_artifact(obf, key, secret.to_bytes(), keyspace_bits=min(256.0, keyspace_bits(secret)),
                                       obfuscated_weights=secret.count, **stats)

    def parse_secret(self, data: bytes, where: str) -> WeightPatch:
        return WeightPatch.from_bytes(data, where)

    def _deploy(self, artifact, key, model_factory, mode=None):
        mode = self.check_mode(mode)
        secret = self.secret(artifact, key)
        model = self.plaintext_model(artifact, model_factory)
        if mode == "restore":
            return secret.restore(model, artifact.where).eval()
        return install_tee(model, tee_corrections(model, secret))

    def _authorize(self, model, artifact, key, pruned=None):
        secret = self.secret(artifact, key)
        model = copy.deepcopy(model)
        if pruned is not None:  # positions whose filter or input channel was pruned are dropped
            secret, _ = secret.remap(model, pruned)
        return secret.restore(model, artifact.where).eval()

    # -- ONNX Runtime ------------------------------------------------------------------------------------------
    def _onnx_build(self, artifact, key, model_factory, mode, example):
        if self.check_mode(mode) == "restore":
            return super()._onnx_build(artifact, key, model_factory, mode, example)
        model = self.plaintext_model(artifact, model_factory)
        real = tee_corrections(model, self.secret(artifact, key))
        # Placeholders of the right shapes: nothing of the secret (ΔW, which filters) goes into the graph file.
        fake = {n: (torch.zeros_like(d), torch.arange(len(f), dtype=torch.int64)) for n, (d, f) in real.items()}
        names = sorted(fake)
        install_tee(model, fake)
        rest = [t for n in names for t in fake[n]]
        labels = {f"rest_{2 * j + i}": f"{n}.{part}" for j, n in enumerate(names)
                  for i, part in enumerate(("delta", "filters"))}
        graph = onnx_runtime.export(_CorrectionInputs(model, names), example, rest)
        onnx_runtime.put_secret_graph(artifact, ONNX, graph, labels)

    def _onnx_load(self, artifact, key, mode, threads=1):
        if self.check_mode(mode) == "restore":
            return super()._onnx_load(artifact, key, mode, threads)
        from safetensors.numpy import load as np_load

        secret = self.secret(artifact, key)
        weights = np_load(artifact.file(WEIGHTS))
        values = {}
        for name, s in secret.entries.items():
            if name not in weights:
                raise ArtifactError(f"{artifact.where}/{SECRET}: layer {name!r} is not in the weights")
            delta, filters = layer_correction(torch.from_numpy(weights[name].copy()), s)
            layer = name.removesuffix(".weight")
            values[f"{layer}.delta"], values[f"{layer}.filters"] = delta.numpy(), filters.numpy()
        return onnx_runtime.load_secret_graph(artifact, values, threads)
