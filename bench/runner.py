"""The harness: runs a config's protector × attack × parameter matrix and the profiler, one record per cell.

Cells whose record exists are skipped, so a killed run resumes where it stopped. Trained models and protected
artifacts are cached by config hash (:mod:`bench.cache`), so cells that share them never retrain.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

import protectors
from attacks import Loot, Outcome, ThiefContext
from attacks import attacks as attack_registry
from attacks.base import Oracle
from attacks.recipe import fit as thief_fit
from protectors.core.artifact import Artifact
from protectors.core.base import PluginContext, Protector
from protectors.core.crypto import device_key, key_id, secret_seed
from protectors.core.errors import NotApplicable
from protectors.core.hashing import canonical_json
from protectors.core.identity import code_digest, plugin_identity
from protectors.core.model_card import ModelCard
from protectors.core.sampling import stratified_subset
from protectors.core.seeding import seed_everything, stream_seed

from . import data, isolation, models, wire
from .cache import Cache
from .config import Experiment, PluginSpec, RunConfig
from .records import RecordStore
from .training import Trainer

CALIB_SIZE = 200
#: intra-op threads for every accuracy cell, on every executor: the float arithmetic of training depends on the thread
#: count, so pinning it makes serial, ``--workers`` and cluster runs (and machines with other core counts) agree
CELL_THREADS = 1
#: the harness modules a trained model depends on (with what they import from the repository): editing them
#: retrains the clean and scratch models and recomputes every cell
TRAINING_CODE = ("bench.training", "bench.models", "bench.data")


def train_key(train) -> dict[str, Any]:
    """The training config as it enters cache keys and cell hashes (unset options left out, so adding an option
    does not invalidate earlier results)."""
    return {k: v for k, v in asdict(train).items() if v is not None}


class Workbench:
    """Everything about one (dataset, model, seed): data, the clean model, and protected artifacts (lazy, cached)."""

    def __init__(self, runner: Runner, exp: Experiment, seed: int):
        self.runner, self.exp, self.seed = runner, exp, seed
        self.dataset, self.model_name, self.train_cfg = exp.dataset, exp.model, exp.train
        self.trainer = Trainer(exp.train, progress=runner.progress)
        self._scratch: dict[tuple, float] = {}
        self._artifacts: dict[str, tuple[Protector, Artifact]] = {}

    @functools.cached_property
    def splits(self) -> data.Splits:
        return data.load(self.dataset, self.runner.data_root, seed=self.seed, download=self.runner.download,
                         train_subset=self.exp.train_subset)

    @property
    def info(self) -> data.DatasetInfo:
        return self.splits.info

    @functools.cached_property
    def config_key(self) -> dict[str, Any]:
        """What this workbench computes: the config and the digest of the data actually loaded (no code)."""
        return {"dataset": self.dataset, "data": self.splits.digest, "model": self.model_name, "seed": self.seed,
                "train": train_key(self.train_cfg), "train_subset": self.exp.train_subset}

    @functools.cached_property
    def base_key(self) -> dict[str, Any]:
        """What every cached model of this workbench depends on: the config, the data, and the training code."""
        return {**self.config_key, "code": code_digest(*TRAINING_CODE)}

    def factory(self, init_seed: int | None = None):
        i = self.info
        return models.factory(self.model_name, i.in_channels, i.image_size, i.num_classes,
                              self.seed if init_seed is None else init_seed)

    def loader(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> data.BatchLoader:
        return data.BatchLoader(x, y, self.train_cfg.batch_size, seed, augment=self.splits.augment)

    @functools.cached_property
    def clean(self) -> torch.nn.Module:
        def train(m):
            seed_everything(self.seed)
            s = self.splits
            loader = self.loader(s.train_x, s.train_y, stream_seed(self.seed, "device/clean-shuffle"))
            return self.trainer.fit(m, loader, desc=f"clean {self.model_name}")

        return self.runner.cache.model({"kind": "clean", **self.base_key}, self.factory(), train)

    @property
    def card(self) -> ModelCard:
        """What the model declares (input shape, classes, lock sites, foldable producers)."""
        return self.factory().card

    @functools.cached_property
    def calib(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The device's calibration data: a class-stratified sample of the training set (the device's own stream)."""
        s = self.splits
        return stratified_subset(s.train_x, s.train_y, min(1.0, CALIB_SIZE / len(s.train_x)),
                                 stream_seed(self.seed, "device/calib"))

    def context(self, secret_key: dict[str, Any]) -> PluginContext:
        """The protector's context; its secret seed comes from the device key and ``secret_key`` (the config and the
        seed, never a code digest: editing a plugin does not draw it a new secret)."""
        s = self.splits
        calib_x, calib_y = self.calib
        return PluginContext(
            model_factory=self.factory(), trainer=self.trainer,
            train_loader=self.loader(s.train_x, s.train_y, stream_seed(self.seed, "device/shuffle")),
            calib_x=calib_x, calib_y=calib_y, num_classes=self.info.num_classes, epochs=self.train_cfg.epochs,
            lock_sites=self.card.lock_sites, device=self.trainer.device, seed=self.seed,
            secret_seed=secret_seed(self.runner.key, canonical_json(secret_key)), example_input=s.train_x[:1])

    def artifact(self, spec: PluginSpec) -> tuple[Protector, Artifact]:
        """The protector and its artifact for ``spec``, read from the cache once per workbench."""
        if spec.label not in self._artifacts:
            self._artifacts[spec.label] = self._make_artifact(spec)
        return self._artifacts[spec.label]

    def _make_artifact(self, spec: PluginSpec) -> tuple[Protector, Artifact]:
        protector = protectors.get(spec.name, **spec.params)
        key = {"kind": "artifact", **self.base_key, "protector": self.runner.plugin_key(spec),
               "key_id": key_id(self.runner.key)}
        secret_key = {"kind": "artifact", **self.config_key, "protector": spec.key(), "key_id": key_id(self.runner.key)}

        def make() -> Artifact:
            seed_everything(self.seed)
            return protector.protect(self.clean, self.context(secret_key), self.runner.key)

        return protector, self.runner.cache.artifact(key, make)

    def _thief_index(self, fraction: float, seed: int) -> torch.Tensor:
        """Indices into the training set of the thief's labeled fraction (class-stratified, the thief's seed)."""
        s = self.splits
        idx, _ = stratified_subset(torch.arange(len(s.train_y)), s.train_y, fraction, stream_seed(seed, "thief/data"))
        return idx

    def thief_data(self, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._thief_index(fraction, seed)
        return self.splits.train_x[idx], self.splits.train_y[idx]

    def unlabeled_pool(self, fraction: float, seed: int) -> torch.Tensor:
        """The unlabeled pool the run grants: a class-stratified ``fraction`` of the training images without their
        labels (a stream of the thief's own; it may hold images the thief also has labeled)."""
        s = self.splits
        pool, _ = stratified_subset(torch.arange(len(s.train_y)), s.train_y, fraction, stream_seed(seed, "thief/pool"))
        return s.train_x[pool]

    def thief_factory(self, seed: int):
        """The architecture as the thief initializes it: a random stream of the thief's own, never the device's."""
        return self.factory(init_seed=stream_seed(seed, "thief/init"))

    @functools.cached_property
    def clean_acc(self) -> float:
        return self.trainer.evaluate(self.clean, self.splits.test_x, self.splits.test_y)

    def scratch_acc(self, fraction: float, seed: int) -> float:
        """Test accuracy of the thief's own model: its random init, trained with the thief's recipe on its
        ``fraction`` of labeled data (the same recipe every attack trains with: a fair scratch); ``fraction = 0``
        (a data-free attack): the untrained model."""
        key = (fraction, seed)
        if key not in self._scratch:
            self._scratch[key] = self._scratch_acc(fraction, seed)
        return self._scratch[key]

    def _scratch_acc(self, fraction: float, seed: int) -> float:
        recipe = self.runner.cfg.thief.recipe

        def train(m):
            seed_everything(seed)
            x, y = self.thief_data(fraction, seed)
            return thief_fit(lambda: copy.deepcopy(m), x, y, recipe, seed).model  # every lr from the same init

        if fraction == 0:
            model = self.thief_factory(seed)().eval()
        else:
            key = {"kind": "scratch", **self.base_key, "fraction": fraction, "attack_seed": seed,
                   "recipe": recipe.key(), "recipe_code": code_digest("attacks.recipe")}
            model = self.runner.cache.model(key, self.thief_factory(seed), train)
        return self.trainer.evaluate(model, self.splits.test_x, self.splits.test_y)

    def thief_context(self, seed: int, oracle: Oracle | None = None) -> ThiefContext:
        """What the thief holds: its labeled data, the recipe, the run's grants; never the test set or the key."""
        thief = self.runner.cfg.thief
        pool = None
        if thief.grants.unlabeled > 0:
            pool = functools.partial(self.unlabeled_pool, thief.grants.unlabeled)
        return ThiefContext(trainer=self.trainer, thief_data=self.thief_data, loader=self.loader,
                            num_classes=self.info.num_classes, lock_sites=self.card.lock_sites, seed=seed,
                            recipe=thief.recipe, grants=thief.grants, oracle=oracle, unlabeled_pool=pool)

    def attack_isolated(self, process: isolation.AttackProcess, spec: PluginSpec, protector: Protector,
                        artifact: Artifact, aspec: PluginSpec, attack, param: str, aseed: int,
                        oracle: Oracle | None) -> Outcome:
        """Run ``attack`` in the attack process (:mod:`bench.isolation`): it gets the artifact's files, the
        architecture, the thief's recipe and grants; its data, pool and oracle answers on request; never the key, the
        clean model or the test set. Returns its outcome with the attacked model rebuilt here."""
        thief, info = self.runner.cfg.thief, self.info
        job = {"op": "attack", "cell": param, "seed": aseed,
               "protector": {"name": spec.name, "params": spec.params, "module": type(protector).__module__},
               "attack": {"name": aspec.name, "params": aspec.params, "module": type(attack).__module__},
               "model": {"name": self.model_name, "in_channels": info.in_channels, "image_size": info.image_size,
                         "num_classes": info.num_classes, "init_seed": stream_seed(aseed, "thief/init")},
               "train": dataclasses.asdict(self.train_cfg), "augment": bool(self.splits.augment),
               "ctx": {"num_classes": info.num_classes, "lock_sites": list(self.card.lock_sites),
                       "recipe": dataclasses.asdict(thief.recipe), "grants": thief.grants.key(),
                       "oracle": oracle is not None, "pool": thief.grants.unlabeled > 0},
               "artifact_meta": artifact.meta}
        files = {f"file:{name}": data_ for name, data_ in artifact.files.items()}
        head, got = process.run(job, files, functools.partial(self._serve, oracle=oracle))
        model = None
        if head.get("model") is not None:
            model = isolation.rebuild(self.thief_factory(aseed)(), head["model"], got)
            isolation.check_runs(model, self.splits.train_x[:2])
        try:
            fraction, epochs = (float(v) for v in head["budget"])
            extra, val_acc = head["extra"], head["val_acc"]
            if (not isinstance(extra, dict) or not (val_acc is None or isinstance(val_acc, (int, float)))
                    or not 0 <= fraction <= 1 or not 0 <= epochs < 1e9 or epochs != int(epochs)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise isolation.AttackProcessError(
                f"{attack.name} {param}: the attack process's result is malformed (budget, val_acc or "
                "extra)") from None
        return Outcome(str(head.get("param", param)), model, (fraction, int(epochs)), extra=extra,
                       pruned=isolation.pruned_from(head.get("pruned"), got),
                       guess=isolation.guess_from(head.get("guess")), val_acc=val_acc)

    def _serve(self, head: dict[str, Any], blobs: dict[str, bytes], oracle: Oracle | None):
        """Answer one request of the attack process: the thief's data, its pool, or the oracle."""
        from attacks.base import QueryBudgetExceeded

        def error(kind: str, message: str):
            return {"op": "error", "type": kind, "message": message}, {}

        op = head.get("op")
        try:
            if op == "thief_data":
                fraction, seed = float(head["fraction"]), int(head["seed"])
                if not 0 < fraction <= 1:
                    return error("ValueError", f"thief data: fraction {fraction} is not in (0, 1]")
                x, y = self.thief_data(fraction, seed)
                return {"op": "data"}, {"t": wire.pack({"x": x, "y": y})}
            if op == "pool":
                grants = self.runner.cfg.thief.grants
                if grants.unlabeled <= 0:
                    return error("RuntimeError", "the run grants no unlabeled pool")
                return {"op": "data"}, {"t": wire.pack({"x": self.unlabeled_pool(grants.unlabeled,
                                                                                 int(head["seed"]))})}
            if op == "oracle":
                if oracle is None:
                    return error("RuntimeError", "the run grants no oracle")
                x = wire.unpack(blobs.get("x", b""), "oracle query").get("x")
                shape = (self.info.in_channels, self.info.image_size, self.info.image_size)
                if x is None or not x.is_floating_point() or tuple(x.shape[1:]) != shape or len(x) < 1:
                    return error("ValueError", f"oracle query: expected float inputs of shape (n, {shape})")
                return {"op": "answer"}, {"y": wire.pack({"y": oracle(x.float())})}
        except QueryBudgetExceeded as exc:
            return error("QueryBudgetExceeded", str(exc))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            return error("ValueError", f"malformed {op} request: {exc}")
        return error("ValueError", f"unknown request {op!r}")

    def oracle(self, protector: Protector, artifact: Artifact) -> Oracle | None:
        """A counted oracle on the authorized deployment (the device the thief owns), when the run grants one."""
        grants = self.runner.cfg.thief.grants
        if not grants.has_oracle:
            return None
        device = protector.deploy(artifact, self.runner.key, self.factory())
        return Oracle(lambda x: device(x), grants.queries, grants.oracle)


class Runner:
    def __init__(self, cfg: RunConfig, out: str | Path, data_root: str | None = None, download: bool = False,
                 key_file: str | None = None, key_format: str | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True, profile: bool = True, create_key: bool = True,
                 expect_key_id: str | None = None, isolate: bool = True):
        #: how to build this runner again in another process (never the key itself: workers load it themselves)
        self.spec = {"cfg": cfg, "out": str(out), "data_root": data_root, "download": download, "key_file": key_file,
                     "key_format": key_format, "cache_dir": str(cache_dir) if cache_dir else None,
                     "isolate": isolate}
        self.cfg, self.out = cfg, Path(out)
        self.data_root, self.download, self.progress, self.do_profile = data_root, download, progress, profile
        root = Path(cache_dir) if cache_dir else data.cache_dir()
        # No key given anywhere: the suite's own device key, outside any results directory, created once (0600).
        # A Dask worker (create_key=False, expect_key_id: the run's) uses the run's key or refuses, never its own.
        self.key = device_key(key_file, key_format, root / "device.key", create=create_key, expect_id=expect_key_id)
        #: what a worker checks its own key against (the key id reveals nothing about the key)
        self.spec["key_id"] = key_id(self.key)
        self.cache = Cache(root, self.key)
        self.store = RecordStore(self.out)
        self._benches: dict[tuple, Workbench] = {}
        #: attack cells run in a process of their own that holds neither the key, nor the clean model, nor the test
        #: set (:mod:`bench.isolation`); ``False`` runs them here (tests compare both; a debugger can step in)
        self.isolate = isolate
        self.attack_process = isolation.AttackProcess(threads=CELL_THREADS)
        if isolate:
            isolation.harden_harness()
        #: workbenches kept in memory (1 serially, where cells come in workbench order; more on a Dask worker,
        #: which gets cells of several trainings interleaved)
        self.bench_slots = 1

    @staticmethod
    def plugin_key(spec: PluginSpec, registry=None) -> dict[str, Any]:
        """A protector's (or attack's) setting as it enters cache keys and cell hashes: name, parameters, and the
        plugin's identity (package, version, code digest), so editing a plugin's code recomputes its cells."""
        cls = (registry or protectors.protectors).get(spec.name)
        return {**spec.key(), "plugin": plugin_identity(cls)}

    # -- the matrix ---------------------------------------------------------------------------------------------
    def cells(self) -> Iterator[tuple[str, Experiment, dict[str, Any]]]:
        cfg = self.cfg
        attack_seeds = cfg.attack_seeds or [0]
        for exp in cfg.experiments:
            for seed in cfg.seeds:
                base = {"dataset": exp.dataset, "model": exp.model, "seed": seed, "train": train_key(exp.train),
                        "train_subset": exp.train_subset, "code": code_digest(*TRAINING_CODE)}
                if exp.regime:  # only when [train] sweeps, so the cells of other configs keep their hashes
                    base["regime"] = exp.regime
                for p in cfg.protectors:
                    pkey = self.plugin_key(p)
                    yield "effectiveness", exp, {"kind": "effectiveness", **base, "protector": pkey, "label": p.label}
                    if cfg.int8_accuracy:
                        yield "quantized", exp, {"kind": "quantized", **base, "protector": pkey, "label": p.label,
                                                 "quantizer": code_digest("bench.quantize")}
                    for a in cfg.attacks:
                        attack = attack_registry.get(a.name)(**a.params)
                        akey = self.plugin_key(a, attack_registry)
                        for param in attack.cells():
                            for aseed in attack_seeds:
                                yield "attack", exp, {"kind": "attack", **base, "protector": pkey,
                                                      "label": p.label, "attack": akey, "attack_label": a.label,
                                                      "param": param, "attack_seed": aseed,
                                                      "thief": cfg.thief.key()}

    def cell_order(self, cell: dict[str, Any]) -> dict[str, int]:
        """Where ``cell`` comes in this config, per table column (recorded as the record's ``order``, so the tables
        list rows as the config lists them): its experiment (dataset, model), its protector and attack settings,
        and for a latency cell its model and target in ``[profile]``. The cell itself stays as it was, so its hash
        (the record's name) does not depend on the config's order."""
        cfg = self.cfg
        if cell.get("kind") == "profile":
            labels = [p.label for p in cfg.protectors]
            found = {"model": cfg.profile.models.index(cell["model"]) if cell["model"] in cfg.profile.models else None,
                     "target": cfg.profile.targets.index(cell["target"])
                     if cell["target"] in cfg.profile.targets else None,
                     # the baseline the profiler adds when the config has none comes first
                     "protector": labels.index(cell["protector"]) if cell["protector"] in labels else -1}
            return {k: v for k, v in found.items() if v is not None}
        exp = next((i for i, e in enumerate(cfg.experiments) if e.dataset == cell["dataset"]
                    and e.model == cell["model"] and e.regime == cell.get("regime", "")), None)
        found = {"dataset": exp, "model": exp,
                 "protector": next((i for i, p in enumerate(cfg.protectors) if p.label == cell["label"]), None)}
        if cell.get("kind") == "attack":
            found["attack"] = next((i for i, a in enumerate(cfg.attacks) if a.label == cell["attack_label"]), None)
        return {k: v for k, v in found.items() if v is not None}

    def run(self, executor=None) -> dict[str, int]:
        """Run every missing cell (serially, or on ``executor``, e.g. :class:`bench.executor.DaskExecutor`), then
        the latency profiler alone, after all of them, then the report."""
        from . import profiler, report

        cells = list(self.cells())
        self.store.order = self.cell_order
        profiling = self.do_profile and bool(self.cfg.profile.targets)
        # Records of other settings of the rows this config computes (an older version of a plugin's code, other
        # attack or training parameters) are moved aside first, so that every table row holds one setting. Latency
        # rows only when this run measures them again.
        superseded = self.store.retire_superseded([c for _, _, c in cells]
                                                  + (profiler.profile_cells(self) if profiling else []))
        todo = [(k, e, c) for k, e, c in cells if not self.store.has(c)]
        threads = torch.get_num_threads()
        with tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"{self.cfg.name} cells",
                  disable=not self.progress, unit="cell") as bar:
            if executor is None:
                torch.set_num_threads(CELL_THREADS)
                try:
                    for kind, exp, cell in todo:
                        self.run_cell(kind, exp, cell)
                        bar.update(1)
                finally:
                    torch.set_num_threads(threads)
            else:
                executor.run(self, todo, on_done=lambda: bar.update(1))
        self.attack_process.close()
        # Latency only now, with nothing else running on this machine (the executor's workers are gone).
        profiled = profiler.run_config(self) if profiling else 0
        report.write(self.out)
        return {"cells": len(cells), "ran": len(todo), "profiled": profiled, "superseded": superseded}

    def run_cell(self, kind: str, exp: Experiment, cell: dict[str, Any]) -> str:
        """Compute one cell and write its record; returns the record's name. Cells of a workbench share its data
        and models while it is kept (``bench_slots``)."""
        self.store.order = self.cell_order  # a Dask worker's runner runs cells without run()
        wb_key = (exp, cell["seed"])
        if wb_key not in self._benches:
            while len(self._benches) >= self.bench_slots:  # least recently used out
                self._benches.pop(next(iter(self._benches)))
            self._benches[wb_key] = Workbench(self, exp, cell["seed"])
        wb = self._benches.pop(wb_key)
        self._benches[wb_key] = wb
        spec = next(p for p in self.cfg.protectors if p.label == cell["label"])
        if kind == "effectiveness":
            result = self.effectiveness(wb, spec)
        elif kind == "quantized":
            result = self.quantized(wb, spec)
        else:
            aspec = next(a for a in self.cfg.attacks if a.label == cell["attack_label"])
            result = self.attack(wb, spec, aspec, cell["param"], cell["attack_seed"])
        return self.store.write(cell, result, seed=cell["seed"]).name

    # -- cells --------------------------------------------------------------------------------------------------
    def effectiveness(self, wb: Workbench, spec: PluginSpec) -> dict[str, Any]:
        t0 = time.perf_counter()
        protector, artifact = wb.artifact(spec)
        protect_s = time.perf_counter() - t0
        s, fac = wb.splits, wb.factory()
        clean_acc = wb.clean_acc
        modes = {m: wb.trainer.evaluate(protector.deploy(artifact, self.key, fac, m), s.test_x, s.test_y)
                 for m in protector.modes}
        auth_acc = modes[protector.modes[0]]
        # The thief's random init is not the device's: a stream of its own for anything the thief builds.
        stolen_acc = wb.trainer.evaluate(protector.stolen(artifact, wb.thief_factory(wb.seed)), s.test_x, s.test_y)
        return {"clean_acc": clean_acc, "auth_acc": auth_acc, "acc_loss": clean_acc - auth_acc,
                "auth_acc_by_mode": modes, "stolen_acc": stolen_acc,
                "secret_bytes": protector.secret_bytes(artifact), "artifact_bytes": artifact.total_bytes,
                "keyspace_bits": protector.keyspace_bits(artifact), "seconds": protect_s,
                "chance": 1.0 / wb.info.num_classes, "declaration": protector.declaration()}

    def quantized(self, wb: Workbench, spec: PluginSpec) -> dict[str, Any]:
        """What int8 static quantization of the deployed ONNX graph (calibrated on the device's calibration data,
        the secret applied) leaves of the authorized accuracy, and what the stolen copy quantized the same way gives
        (:func:`bench.quantize.int8_accuracies`); the first mode that has an ONNX deployment is the row's."""
        from .quantize import int8_accuracies

        protector, artifact = wb.artifact(spec)
        s = wb.splits
        t0 = time.perf_counter()
        got = int8_accuracies(protector, artifact, self.key, wb.factory(), wb.calib[0], s.test_x, s.test_y,
                              example=s.train_x[:1])
        mode = next((m for m in protector.modes if got["int8_auth_acc"].get(m) is not None), None)
        notes = "; ".join(f"{m}: {why}" for m, why in got["int8_notes"].items())
        out = {"mode": mode or "", "float_stolen_acc": got["stolen_acc"],
               "int8_auth_acc_by_mode": {m: v for m, v in got["int8_auth_acc"].items() if v is not None},
               "seconds": time.perf_counter() - t0, "note": notes}
        if got["int8_stolen_acc"] is not None:
            out["int8_stolen_acc"] = got["int8_stolen_acc"]
        if mode is not None:
            out.update(float_auth_acc=got["float_auth_acc"][mode], int8_auth_acc=got["int8_auth_acc"][mode],
                       int8_loss=got["float_auth_acc"][mode] - got["int8_auth_acc"][mode])
        return out

    def attack(self, wb: Workbench, spec: PluginSpec, aspec: PluginSpec, param: str, aseed: int) -> dict[str, Any]:
        protector, artifact = wb.artifact(spec)
        attack = attack_registry.get(aspec.name)(**aspec.params)
        declaration = attack.declaration(param)  # how the report shows this row (its plot, its table)
        why = attack.not_applicable(protector, artifact, self.cfg.thief.grants, param)
        if why:
            return {"applicable": False, "note": why, "declaration": declaration}
        oracle = wb.oracle(protector, artifact)
        if self.isolate:
            self.attack_process.ensure_started()  # its start-up is not this cell's time
        t0 = time.perf_counter()
        if self.isolate:
            o = wb.attack_isolated(self.attack_process, spec, protector, artifact, aspec, attack, param, aseed,
                                  oracle)
        else:  # in this process (tests compare both; a debugger can step into the attack)
            loot = Loot(artifact=artifact, protector=protector, model_factory=wb.thief_factory(aseed))
            ctx = wb.thief_context(aseed, oracle)
            seed_everything(aseed)
            o = attack.run(loot, ctx, param)
        seconds = time.perf_counter() - t0
        # The harness scores: the test set never reaches the attack.
        s = wb.splits
        stolen_after = wb.trainer.evaluate(o.model, s.test_x, s.test_y)
        extra, note = dict(o.extra), ""
        # Only now, outside the attack, the key: does the real secret still work on the attacked copy?
        try:
            authorized = protector.authorize(o.model, artifact, self.key, pruned=o.pruned)
            auth_after = wb.trainer.evaluate(authorized, s.test_x, s.test_y) if authorized is not None else None
        except NotApplicable as exc:
            auth_after, note = None, f"secret not re-applicable: {str(exc).splitlines()[0][:120]}"
        if o.guess is not None:
            try:
                extra.update(protector.compare_secret(artifact, self.key, o.guess))
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
                note = f"guess not comparable with the secret: {str(exc).splitlines()[0][:120]}"
        # What the attack derives from its own numbers once the clean accuracy is known (the attack never sees it).
        extra.update(attack.derived(extra, wb.clean_acc))
        fraction = float(o.budget[0])
        scratch = wb.scratch_acc(fraction, seed=aseed)
        return {"applicable": True, "stolen_acc_after": stolen_after, "auth_acc_after": auth_after,
                "scratch_acc": scratch, "gain": stolen_after - scratch, "budget": list(o.budget), "extra": extra,
                "fraction": fraction, "val_acc": o.val_acc, "queries": oracle.used if oracle is not None else 0,
                "seconds": seconds, "note": note, "declaration": declaration}
