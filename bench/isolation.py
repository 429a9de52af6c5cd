"""The attack process: where an attack's :meth:`~attacks.base.Attack.run` executes, away from the harness.

The harness holds the device key, the clean model and the test set. An attack runs in a child process of its own
(:class:`AttackProcess`, one per harness process, started once and reused for every attack cell) that holds none of
them: it is started fresh (``python -m bench.isolation``, not forked, so nothing of the harness's memory is copied),
its environment carries no key, and it receives only what the thief holds:

- the artifact's files and metadata (what the thief copied from the device's storage) and the protector's name and
  parameters (the method is public);
- the model architecture (name, input shape, classes) and the thief's own random initialization seed;
- the thief's recipe and grants, and on request its labeled data (``thief_data(fraction, seed)``: slices of the
  *training* set) and its unlabeled pool;
- the oracle's answers: the attack sends inputs, the harness runs the authorized device in its own process and sends
  back labels or probabilities, counting every query.

The attack process returns what the thief ends with: the attacked model as its weights (safetensors: the
architecture's state dict, with the shapes structured pruning left), the masks installed at lock sites, the pruning
map, the attack's numbers, and its guess of the secret as JSON (a dataclass of :mod:`protectors.core.kinds`). The
harness rebuilds the model from the architecture and scores it on the test set, then applies the real secret.
Nothing crosses in either direction as a pickle (:mod:`bench.wire`).

What this does not guard against: the harness itself imports every attack plugin (to read its cells and
declarations), so a plugin's import-time code runs with the harness; the child can read any file the user can (the
key file too, which is mode 0600 for that user); and the child runs as the harness's user. The harness makes itself
non-dumpable (:func:`harden_harness`), so an unprivileged child cannot ptrace it or read its memory through
``/proc``, but a child running as root can. The isolation keeps the key and the test set out of the *memory* an
attack runs in, so that an honest attack cannot use them by mistake and a curious one cannot find them by walking
its own stack or heap (``tests/test_isolation.py`` plants one that searches its whole process memory); against a
hostile plugin, run the suite as an unprivileged user with the key file out of its reach (another user, a
container).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import subprocess
import sys
import threading
import traceback
from typing import Any, Callable

import torch
from torch import nn

from protectors.core import lock
from protectors.core.errors import ArtifactError, BenchError, ConfigError, DataError, KeyMaterialError, NotApplicable
from protectors.core.pruning import Pruned

from . import wire

#: the module whose ``main`` the attack process runs
CHILD = "bench.isolation"
#: errors of the attack process the harness raises again as themselves (their message only; others: their traceback)
ERRORS = {c.__name__: c for c in (NotApplicable, BenchError, ConfigError, DataError, ArtifactError,
                                  KeyMaterialError)}
#: where a guess of the secret may come from: the secret kinds every protector and attack share
GUESS_MODULES = "protectors.core.kinds."
#: relative tolerance of the attack process's own check that its model survives the trip to the harness
ROUNDTRIP_RTOL = 1e-5


class AttackProcessError(BenchError):
    """The attack process failed (an attack raised, or the process died)."""


ERRORS[AttackProcessError.__name__] = AttackProcessError


# -- the attacked model, its guess and its pruning map, as plain data -----------------------------------------------
def model_payload(model: nn.Module) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The attacked model as the architecture's state dict plus the masks installed at its lock sites."""
    m = copy.deepcopy(model)
    masks = {name: site.mask for name, site in lock.sites_of(m).items() if site.mask is not None}
    lock.remove(m)
    state = m.state_dict()
    return ({"training": bool(model.training), "masks": sorted(masks)},
            {"state": wire.pack(state), "masks": wire.pack(masks)})


def _fix_attributes(mod: nn.Module) -> None:
    """A module's size attributes after its tensors were resized (what structured pruning changes)."""
    if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
        out_c, per_group = mod.weight.shape[:2]
        if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels:  # depthwise stays depthwise
            mod.groups = out_c
        mod.out_channels, mod.in_channels = out_c, per_group * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        ref = mod.weight if mod.weight is not None else mod.running_mean
        if ref is not None:
            mod.num_features = ref.shape[0]


def rebuild(model: nn.Module, header: dict[str, Any], blobs: dict[str, bytes]) -> nn.Module:
    """``model`` (a fresh instance of the architecture) given the weights, shapes and lock-site masks of
    :func:`model_payload`; anything else is an :class:`AttackProcessError`."""
    state = wire.unpack(blobs.get("state", b""), "the attacked model's weights")
    masks = wire.unpack(blobs.get("masks", b""), "the attacked model's lock-site masks")
    own = model.state_dict()
    if not isinstance(header, dict):
        raise AttackProcessError("the attacked model's description is malformed")
    if set(state) != set(own):
        odd = sorted(set(state) ^ set(own))
        raise AttackProcessError(f"the attacked model is not the architecture: tensors {odd[:4]} differ")
    for mname, mod in model.named_modules():
        resized = False
        for table in (mod._parameters, mod._buffers):
            for pname, t in list(table.items()):
                key = f"{mname}.{pname}" if mname else pname
                if t is None or key not in state or state[key].shape == t.shape:
                    continue
                if state[key].dim() != t.dim():
                    raise AttackProcessError(f"the attacked model's {key} has {state[key].dim()} dimensions, "
                                             f"the architecture's {t.dim()}")
                new = torch.empty(state[key].shape, dtype=t.dtype)
                table[pname] = nn.Parameter(new, requires_grad=t.requires_grad) if table is mod._parameters else new
                resized = True
        if resized:
            _fix_attributes(mod)
    try:
        model.load_state_dict(state, strict=True)
        lock.install_masks(model, masks)
    except Exception as exc:  # noqa: BLE001 - whatever the untrusted tensors make torch raise: one line
        raise AttackProcessError(f"the attacked model cannot be rebuilt: {str(exc).splitlines()[0][:160]}") from None
    return model.train(bool(header.get("training", False)))


@torch.no_grad()
def check_runs(model: nn.Module, example: torch.Tensor) -> None:
    """The rebuilt model runs on ``example`` and gives finite logits (the harness's own check: what the attack
    process sent is untrusted, e.g. a bias of another width than its weight)."""
    was = model.training
    model.eval()
    try:
        out = model(example)
    except Exception as exc:  # noqa: BLE001 - a shape mismatch of untrusted tensors: one line
        raise AttackProcessError(f"the attacked model does not run: {str(exc).splitlines()[0][:160]}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(example):
        raise AttackProcessError("the attacked model does not give one row of logits per input")


def guess_payload(guess: Any) -> dict[str, Any] | None:
    if guess is None:
        return None
    cls = type(guess)
    if not dataclasses.is_dataclass(guess) or not cls.__module__.startswith(GUESS_MODULES):
        raise AttackProcessError(f"a guess of the secret must be a dataclass of {GUESS_MODULES}*, got "
                                 f"{cls.__module__}.{cls.__qualname__}")
    return {"type": f"{cls.__module__}:{cls.__qualname__}",
            "fields": {f.name: getattr(guess, f.name) for f in dataclasses.fields(guess)}}


def guess_from(payload: Any) -> Any:
    if payload is None:
        return None
    try:
        module, _, name = payload["type"].partition(":")
        fields = dict(payload["fields"])
    except (TypeError, KeyError, AttributeError):
        raise AttackProcessError("the attack's guess of the secret is malformed") from None
    if not module.startswith(GUESS_MODULES) or "." in name:
        raise AttackProcessError(f"the attack's guess names {payload['type']!r}, not a secret kind")
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:
        cls = None
    if cls is None or not dataclasses.is_dataclass(cls):
        raise AttackProcessError(f"the attack's guess names {payload['type']!r}, not a secret kind")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise AttackProcessError(f"the attack's guess of {name} is malformed: {exc}") from None


def pruned_payload(pruned: Pruned | None) -> tuple[dict[str, Any] | None, dict[str, bytes]]:
    if pruned is None:
        return None, {}
    return {"kept": {k: [int(i) for i in v] for k, v in pruned.kept.items()}}, \
        {"example": wire.pack({"x": pruned.example})}


def pruned_from(payload: Any, blobs: dict[str, bytes]) -> Pruned | None:
    if payload is None:
        return None
    kept = payload.get("kept") if isinstance(payload, dict) else None
    if not isinstance(kept, dict) or not all(isinstance(k, str) and isinstance(v, list)
                                             and all(isinstance(i, int) for i in v) for k, v in kept.items()):
        raise AttackProcessError("the attack's pruning map is malformed")
    example = wire.unpack(blobs.get("example", b""), "the pruning map's example input").get("x")
    if example is None:
        raise AttackProcessError("the attack's pruning map has no example input")
    return Pruned(kept, example)


# -- the harness's side ------------------------------------------------------------------------------------------
PR_SET_DUMPABLE = 4


def harden_harness() -> bool:
    """Make this (the harness's) process non-dumpable (Linux ``prctl(PR_SET_DUMPABLE, 0)``): a process of the same
    user, such as the attack process, can then neither ptrace it nor read ``/proc/<pid>/mem``. Root keeps that
    power (``CAP_SYS_PTRACE``). Returns whether it took effect (False off Linux)."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class AttackProcess:
    """The child process attacks run in (started on first use, reused, restarted if it dies)."""

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._proc: subprocess.Popen | None = None
        self._to = self._from = None
        #: one cell at a time through the pipes (a Dask worker with several threads shares its runner)
        self._lock = threading.Lock()

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRO_BENCH_KEY")}
        # the harness's import path, so the child finds the same plugins (a test's module, a worktree's code)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["OMP_NUM_THREADS"] = str(self.threads)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", CHILD, str(to_child_r), str(from_child_w), str(self.threads)],
            pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL, close_fds=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._to, self._from = os.fdopen(to_child_w, "wb"), os.fdopen(from_child_r, "rb")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ensure_started(self) -> None:
        """Start the process now if it is not running (so its start-up is not timed as a cell's)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._drop()
                self._start()

    def run(self, job: dict[str, Any], blobs: dict[str, bytes],
            serve: Callable[[dict[str, Any], dict[str, bytes]], tuple[dict[str, Any], dict[str, bytes]]]
            ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Send ``job``, answer the child's requests with ``serve`` until it sends its result; return it."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._drop()
                self._start()
            try:
                wire.send(self._to, job, blobs)
                while True:
                    head, got = wire.recv(self._from)
                    if head.get("op") in ("result", "error"):
                        break
                    wire.send(self._to, *serve(head, got))
            except (wire.WireClosed, BrokenPipeError):
                code = self._drop()
                raise AttackProcessError(f"the attack process died (exit code {code}) while running "
                                         f"{job.get('attack', {}).get('name')} {job.get('cell')}") from None
            except BaseException:  # a malformed message, a harness error, an interrupt: the child may be mid-request
                self._drop()
                raise
        if head["op"] == "error":  # the attack failed; its process is ready for the next cell
            raise self._error(head)
        return head, got

    @staticmethod
    def _error(head: dict[str, Any]) -> Exception:
        kind, message = str(head.get("type")), str(head.get("message", ""))
        if kind in ERRORS:
            return ERRORS[kind](message)
        return AttackProcessError(f"the attack raised {kind}: {message}\n{head.get('traceback', '')}")

    def _drop(self) -> int | None:
        """Close the pipes (the child then reads EOF and exits), reap the child (killed if it lingers); its exit
        code."""
        for f in (self._to, self._from):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._to = self._from = None
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# -- the attack process's side -----------------------------------------------------------------------------------
class _Channel:
    def __init__(self, inp, out):
        self.inp, self.out = inp, out

    def request(self, header: dict[str, Any], blobs: dict[str, bytes] | None = None):
        wire.send(self.out, header, blobs)
        head, got = wire.recv(self.inp)
        if head.get("op") == "error":
            from attacks.base import QueryBudgetExceeded

            kind = head.get("type")
            exc = QueryBudgetExceeded if kind == "QueryBudgetExceeded" else ERRORS.get(kind, RuntimeError)
            raise exc(head.get("message", ""))
        return head, got


def _remote_oracle(chan: _Channel, budget: int, output: str):
    from attacks.base import Oracle

    class RemoteOracle(Oracle):
        """The oracle as the attack process sees it: inputs go to the harness, labels or probabilities come back
        (the harness counts; this copy of the count only answers ``used``/``remaining``)."""

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            n = len(x)
            if n > self.remaining:
                from attacks.base import QueryBudgetExceeded

                raise QueryBudgetExceeded(f"oracle: {n} queries asked, {self.remaining} of {self.budget} left")
            _, got = chan.request({"op": "oracle"}, {"x": wire.pack({"x": x})})
            self.used += n
            return wire.unpack(got["y"], "oracle answer")["y"]

    def unreachable(x):
        raise RuntimeError("the remote oracle answers through the harness")

    return RemoteOracle(unreachable, budget, output)


def _import_plugin(registry, name: str, module: str):
    if name not in registry.names():
        importlib.import_module(module)
    return registry.get(name)


def _attack(job: dict[str, Any], blobs: dict[str, bytes], chan: _Channel) -> tuple[dict[str, Any], dict[str, bytes]]:
    import protectors
    from attacks import Loot, ThiefContext
    from attacks import attacks as attack_registry
    from attacks.base import Grants
    from attacks.recipe import ThiefRecipe
    from protectors.core.artifact import Artifact
    from protectors.core.seeding import seed_everything

    from . import data, models
    from .training import TrainConfig, Trainer

    p, a, m, c = job["protector"], job["attack"], job["model"], job["ctx"]
    protector = _import_plugin(protectors.protectors, p["name"], p["module"])(**p["params"])
    attack = _import_plugin(attack_registry, a["name"], a["module"])(**a["params"])
    artifact = Artifact(meta=job["artifact_meta"], files={k[5:]: v for k, v in blobs.items() if k.startswith("file:")})
    factory = models.factory(m["name"], m["in_channels"], m["image_size"], m["num_classes"], m["init_seed"])
    trainer = Trainer(TrainConfig(**job["train"]), progress=False)
    recipe = ThiefRecipe(**{**c["recipe"], "lrs": tuple(c["recipe"]["lrs"])})
    grants = Grants(**c["grants"])

    def thief_data(fraction: float, seed: int):
        _, got = chan.request({"op": "thief_data", "fraction": float(fraction), "seed": int(seed)})
        t = wire.unpack(got["t"], "thief data")
        return t["x"], t["y"]

    def pool(seed: int):
        _, got = chan.request({"op": "pool", "seed": int(seed)})
        return wire.unpack(got["t"], "unlabeled pool")["x"]

    def loader(x, y, seed):
        return data.BatchLoader(x, y, job["train"]["batch_size"], seed, augment=job["augment"])

    oracle = _remote_oracle(chan, grants.queries, grants.oracle) if c["oracle"] else None
    ctx = ThiefContext(trainer=trainer, thief_data=thief_data, loader=loader, num_classes=c["num_classes"],
                       lock_sites=tuple(c["lock_sites"]), seed=job["seed"], recipe=recipe, grants=grants,
                       oracle=oracle, unlabeled_pool=pool if c["pool"] else None)
    seed_everything(job["seed"])
    o = attack.run(Loot(artifact=artifact, protector=protector, model_factory=factory), ctx, job["cell"])

    head: dict[str, Any] = {"op": "result", "param": o.param, "budget": [float(o.budget[0]), int(o.budget[1])],
                            "extra": o.extra, "val_acc": None if o.val_acc is None else float(o.val_acc),
                            "guess": guess_payload(o.guess), "model": None}
    out: dict[str, bytes] = {}
    if o.model is not None:
        head["model"], out = model_payload(o.model)
        _check_roundtrip(o.model, factory, head["model"], out, m)
    head["pruned"], example = pruned_payload(o.pruned)
    return head, {**out, **example}


@torch.no_grad()
def _check_roundtrip(model: nn.Module, factory, header: dict[str, Any], blobs: dict[str, bytes],
                     m: dict[str, Any]) -> None:
    """The model the harness will rebuild computes what the attack's model computes (else: a module or hook beyond
    the architecture and its lock sites, which cannot cross to the harness)."""
    x = torch.randn(4, m["in_channels"], m["image_size"], m["image_size"],
                    generator=torch.Generator().manual_seed(0))
    rebuilt = rebuild(factory(), header, blobs)
    was = model.training
    model.eval()
    rebuilt.eval()
    try:
        ours, theirs = model(x.clone()), rebuilt(x.clone())
    finally:
        model.train(was)
    if not torch.allclose(ours, theirs, rtol=ROUNDTRIP_RTOL, atol=1e-6):
        raise AttackProcessError("the attacked model cannot be rebuilt from its weights and lock-site masks (it has "
                                 "a module or hook beyond the architecture); return the architecture itself")


def main(argv: list[str]) -> int:
    rfd, wfd, threads = int(argv[0]), int(argv[1]), int(argv[2])
    torch.set_num_threads(threads)
    chan = _Channel(os.fdopen(rfd, "rb"), os.fdopen(wfd, "wb"))
    while True:
        try:
            job, blobs = wire.recv(chan.inp)
        except wire.WireClosed:
            return 0
        try:
            head, out = _attack(job, blobs, chan)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the harness, which decides
            head, out = {"op": "error", "type": type(exc).__name__, "message": str(exc),
                         "traceback": traceback.format_exc()}, {}
        try:
            wire.send(chan.out, head, out)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:  # an extra or guess that is not JSON
            wire.send(chan.out, {"op": "error", "type": "AttackProcessError",
                                 "message": f"the attack's result is not JSON data: {exc}"})
        except BrokenPipeError:
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
