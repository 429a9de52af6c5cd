"""Run configs (TOML), validated at the boundary: every error names the file and the field.

A config names datasets, models, seeds, the training budget, protectors (with parameters and sweeps), attacks (with
parameters) and profiler targets. Shipped configs live in ``bench/configs/`` and are found by name.

A protector entry may sweep parameters: ``sweep = {gamma = [0.05, 0.2]}`` expands into one protector setting per
combination (the Cartesian product), each labelled ``name[gamma=0.05]``; a value listed twice is an error.

A config may say how to get the plugins it names that are not built in: ``[plugins] advparams = "the example
plugin: pip install -e examples/advparams"``. The hint is added to the error when such a plugin is not installed.

``name`` names the run directory (``runs/<name>`` without ``--out``), so it must be a plain name: letters, digits,
``.``, ``_`` and ``-``, never a path.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attacks.base import Grants
from attacks.recipe import ThiefRecipe
from protectors.core.base import build_params
from protectors.core.errors import ConfigError, did_you_mean

from .training import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class PluginSpec:
    """One protector or attack setting: registered name, parameters, and a label for tables."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def key(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params}


@dataclass(frozen=True)
class ProfileConfig:
    targets: list = field(default_factory=list)
    models: list = field(default_factory=lambda: ["lenet5"])
    min_queries: int = 200
    min_seconds: float = 1.0
    warmup: int = 20
    throughput_batch: int = 64
    #: keep measuring until every overhead ratio's 95% interval is within ±1%, at most this long per job
    max_seconds: float = 20.0

    def validate(self) -> None:
        if self.min_queries < 1 or self.warmup < 0 or self.min_seconds < 0 or self.throughput_batch < 1:
            raise ValueError("'min_queries' and 'throughput_batch' must be >= 1, 'warmup' and 'min_seconds' >= 0")
        if self.max_seconds < 0:
            raise ValueError(f"'max_seconds' must be >= 0, got {self.max_seconds}")


@dataclass(frozen=True)
class Experiment:
    """One dataset × model pair with its training budget."""

    dataset: str
    model: str
    train: TrainConfig
    train_subset: int | None = None
    #: the training regime's label when ``[train]`` sweeps (``weight_decay=0,epochs=40``); "" otherwise
    regime: str = ""


@dataclass(frozen=True)
class RunConfig:
    """A validated config: the dataset × model pairs live in ``experiments`` (``[train]`` and ``train_subset``
    are folded into each one)."""

    name: str
    seeds: list[int]
    protectors: list[PluginSpec]
    attacks: list[PluginSpec]
    profile: ProfileConfig
    attack_seeds: list[int] | None = None
    experiments: list[Experiment] = field(default_factory=list)
    thief: ThiefConfig = field(default_factory=lambda: ThiefConfig())
    #: ``int8_accuracy = true``: a ``quantized`` cell per protector and training (authorized and stolen accuracy
    #: after int8 static quantization of the deployed ONNX graph, :func:`bench.quantize.int8_accuracies`)
    int8_accuracy: bool = False


@dataclass(frozen=True)
class ThiefConfig:
    """``[thief]``: the recipe every thief training uses (:class:`attacks.recipe.ThiefRecipe`) and what the run
    grants the thief (:class:`attacks.base.Grants`: an oracle on the device, an unlabeled pool)."""

    recipe: ThiefRecipe = field(default_factory=ThiefRecipe)
    grants: Grants = field(default_factory=Grants)

    def key(self) -> dict[str, Any]:
        return {"recipe": self.recipe.key(), "grants": self.grants.key()}


TOP_KEYS = {"name", "description", "datasets", "models", "seeds", "attack_seeds", "train", "train_subset",
            "protectors", "attacks", "profile", "experiments", "plugins", "thief", "int8_accuracy"}
#: a config's name: one plain path component (no '/', no '..', not hidden), so ``runs/<name>`` stays in ``runs/``
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
EXPERIMENT_KEYS = {"dataset", "model", "train", "train_subset"}


def _unknown(where: str, key: str, allowed) -> ConfigError:
    allowed_list = ", ".join(sorted(allowed))
    return ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, allowed)} (allowed: {allowed_list})")


def _list_of(where: str, value: Any, typ: type, allow_empty: bool = False) -> list:
    if not isinstance(value, list) or not all(isinstance(v, typ) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where}: must be a list of {typ.__name__}, got {value!r}")
    if not value and not allow_empty:
        raise ConfigError(f"{where}: must not be empty")
    return value


def _seeds(where: str, value: Any) -> list[int]:
    """A non-empty list of seeds that NumPy and torch both accept (``[0, 2**32)``), checked before any training."""
    seeds = _list_of(where, value, int)
    bad = next((s for s in seeds if not 0 <= s < 2**32), None)
    if bad is not None:
        raise ConfigError(f"{where}: seeds must be in [0, 2**32), got {bad}")
    return seeds


def _name(src: str, raw: dict[str, Any]) -> str:
    """The config's ``name`` (default: the file's stem), checked to be a plain name: it becomes a directory."""
    name = raw.get("name", Path(src).stem)
    if not isinstance(name, str):
        raise ConfigError(f"{src}: name: must be a string, got {name!r}")
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        origin = "" if "name" in raw else " (taken from the file name; set 'name')"
        raise ConfigError(f"{src}: name: {name!r} is not a plain name{origin}: it names the run directory "
                          f"runs/<name>, so use 1-100 letters, digits, '.', '_' or '-', not starting with '.' or '-', "
                          f"without '/' or '..'")
    return name


def _hints(src: str, raw: Any) -> dict[str, str]:
    """``[plugins]``: plugin name → how to get it (added to the error when that plugin is not installed)."""
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v.strip() for v in raw.values()):
        raise ConfigError(f"{src}: plugins: must map plugin names to how to install them "
                          f"(e.g. advparams = \"pip install -e examples/advparams\"), got {raw!r}")
    return {k: " ".join(v.split()) for k, v in raw.items()}


def _lookup(registry, name: str, where: str, hints: dict[str, str]):
    """``registry.get(name)``; its error (one line) prefixed with ``where``, plus the config's install hint when
    the plugin is not installed at all."""
    try:
        return registry.get(name)
    except ConfigError as exc:
        hint = f"; not installed? {hints[name]}" if name in hints and name not in registry.names() else ""
        raise ConfigError(f"{where}: {exc}{hint}") from None


def _fmt(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _sweep(where: str, sweep: Any, what: str) -> list[tuple[dict[str, Any], str]]:
    """A ``sweep`` table as its combinations (the Cartesian product; one empty combination without a sweep), each
    with its label (``gamma=0.1,scale=2.0``)."""
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        raise ConfigError(f"{where}: must map {what} to non-empty lists")
    for k, values in sweep.items():
        dup = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if dup is not None:
            raise ConfigError(f"{where}: {k!r} lists {dup!r} twice; every value is one setting, so a repeated one "
                              f"would run and count the same cells twice")
    combos = [dict(zip(sweep, vals)) for vals in itertools.product(*sweep.values())] or [{}]
    return [(c, ",".join(f"{k}={_fmt(v)}" for k, v in c.items())) for c in combos]


def _plugins(src: str, section: str, entries: Any, registry, empty_hint: str | None = None,
             hints: dict[str, str] | None = None) -> list[PluginSpec]:
    """``[[section]]`` entries as plugin settings; ``empty_hint`` (the fix to suggest) makes an empty list an error;
    ``hints`` (the config's ``[plugins]``) say how to install a plugin that is not."""
    if not isinstance(entries, list):
        raise ConfigError(f"{src}: '{section}' must be an array of tables ([[{section}]])")
    if not entries and empty_hint:
        raise ConfigError(f"{src}: {section}: must not be empty ({empty_hint})")
    out = []
    for i, entry in enumerate(entries):
        where = f"{src}: {section}[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{where}: needs a 'name' string")
        name = entry["name"]
        where = f"{where} ({name})"
        cls = _lookup(registry, name, f"{src}: {section}[{i}].name", hints or {})
        params = {k: v for k, v in entry.items() if k not in ("name", "label", "sweep")}
        for combo, combo_label in _sweep(f"{where}.sweep", entry.get("sweep", {}), "parameter names"):
            merged = {**params, **combo}
            try:
                cls(**merged)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None
            label = entry.get("label") or name
            if combo:
                label += f"[{combo_label}]"
            out.append(PluginSpec(name, merged, label))
    labels = [p.label for p in out]
    dup = next((lab for lab in labels if labels.count(lab) > 1), None)
    if dup:
        raise ConfigError(f"{src}: {section}: two entries are labelled {dup!r}; give one a distinct 'label'")
    return out


def parse(raw: dict[str, Any], src: str) -> RunConfig:
    """Validate a parsed TOML document; ``src`` names the file in every error."""
    from attacks import attacks as attack_registry
    from protectors import protectors as protector_registry

    from .data import datasets
    from .models import models

    for k in raw:
        if k not in TOP_KEYS:
            raise _unknown(src, k, TOP_KEYS)
    name = _name(src, raw)
    hints = _hints(src, raw.get("plugins", {}))
    names = {}
    for key, registry, default in (("datasets", datasets, None), ("models", models, ["lenet5"])):
        # A profile-only config (latency needs no data), or one listing [[experiments]], may have no datasets.
        empty_ok = key == "datasets" and (bool(raw.get("profile", {}).get("targets")) or "experiments" in raw)
        if key == "datasets" and "experiments" in raw and key not in raw:
            names[key] = []
            continue
        value = (_list_of(f"{src}: {key}", raw.get(key, default), str, allow_empty=empty_ok)
                 if key in raw or default is None else default)
        for i, n in enumerate(value):
            try:
                registry.get(n)
            except ConfigError as exc:
                raise ConfigError(f"{src}: {key}[{i}]: {exc}") from None
        names[key] = value
    seeds = _seeds(f"{src}: seeds", raw.get("seeds", [0]))
    attack_seeds = _seeds(f"{src}: attack_seeds", raw["attack_seeds"]) if "attack_seeds" in raw else None
    train_raw = raw.get("train", {})
    if not isinstance(train_raw, dict):
        raise ConfigError(f"{src}: 'train' must be a table")
    regimes = _regimes(f"{src}: train", train_raw)
    subset = raw.get("train_subset")
    if subset is not None and (not isinstance(subset, int) or subset < 1):
        raise ConfigError(f"{src}: train_subset: must be a positive integer, got {subset!r}")
    profile_raw = raw.get("profile", {})
    if not isinstance(profile_raw, dict):
        raise ConfigError(f"{src}: 'profile' must be a table")
    profile = build_params(ProfileConfig, profile_raw, f"{src}: profile")
    thief = _thief(src, raw.get("thief", {}))
    int8 = raw.get("int8_accuracy", False)
    if not isinstance(int8, bool):
        raise ConfigError(f"{src}: int8_accuracy: must be true or false, got {int8!r}")
    from .targets import targets as target_registry

    for key, registry in (("targets", target_registry), ("models", models)):
        for i, n in enumerate(_list_of(f"{src}: profile.{key}", getattr(profile, key), str, allow_empty=True)):
            _lookup(registry, n, f"{src}: profile.{key}[{i}]", hints)
    experiments = [Experiment(d, m, train, subset, regime)
                   for d in names["datasets"] for m in names["models"] for train, regime in regimes]
    if "experiments" in raw:
        experiments = _experiments(src, raw["experiments"], train_raw, subset, datasets, models)
    return RunConfig(
        name=name, seeds=seeds, attack_seeds=attack_seeds, profile=profile,
        experiments=experiments, thief=thief, int8_accuracy=int8,
        # Every cell is (protector × ...): with none the run would do nothing and leave no records to report.
        protectors=_plugins(src, "protectors", raw.get("protectors", []), protector_registry,
                            empty_hint="list at least one (`python -m bench list` names them)", hints=hints),
        attacks=_plugins(src, "attacks", raw.get("attacks", []), attack_registry, hints=hints),
    )


def _thief(src: str, raw: Any) -> ThiefConfig:
    """``[thief]``: recipe fields and grants in one table."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: 'thief' must be a table")
    grant_keys = {f.name for f in dataclasses.fields(Grants)}
    recipe_keys = {f.name for f in dataclasses.fields(ThiefRecipe)}
    for k in raw:
        if k not in grant_keys | recipe_keys:
            raise _unknown(f"{src}: thief", k, grant_keys | recipe_keys)
    recipe_raw = {k: v for k, v in raw.items() if k in recipe_keys}
    if "lrs" in recipe_raw:
        lrs = recipe_raw["lrs"]
        if not isinstance(lrs, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lrs):
            raise ConfigError(f"{src}: thief.lrs: must be a list of numbers, got {lrs!r}")
        recipe_raw["lrs"] = tuple(float(v) for v in lrs)
    recipe = build_params(ThiefRecipe, recipe_raw, f"{src}: thief")
    grants = build_params(Grants, {k: v for k, v in raw.items() if k in grant_keys}, f"{src}: thief")
    return ThiefConfig(recipe, grants)


def _experiments(src: str, entries: Any, train_raw: dict, subset: int | None, datasets, models) -> list[Experiment]:
    """``[[experiments]]``: explicit dataset/model pairs, each with training overrides on top of ``[train]``."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{src}: 'experiments' must be a non-empty array of tables ([[experiments]])")
    out = []
    for i, e in enumerate(entries):
        where = f"{src}: experiments[{i}]"
        if not isinstance(e, dict):
            raise ConfigError(f"{where}: must be a table")
        for k in e:
            if k not in EXPERIMENT_KEYS:
                raise _unknown(where, k, EXPERIMENT_KEYS)
        for k, registry in (("dataset", datasets), ("model", models)):
            if not isinstance(e.get(k), str):
                raise ConfigError(f"{where}.{k}: required, a string")
            try:
                registry.get(e[k])
            except ConfigError as exc:
                raise ConfigError(f"{where}.{k}: {exc}") from None
        over = e.get("train", {})
        if not isinstance(over, dict):
            raise ConfigError(f"{where}.train: must be a table")
        regimes = _regimes(f"{where}.train", {**train_raw, **over})
        sub = e.get("train_subset", subset)
        if sub is not None and (not isinstance(sub, int) or sub < 1):
            raise ConfigError(f"{where}.train_subset: must be a positive integer, got {sub!r}")
        out.extend(Experiment(e["dataset"], e["model"], train, sub, regime) for train, regime in regimes)
    return out


def _regimes(where: str, train_raw: dict) -> list[tuple[TrainConfig, str]]:
    """A ``[train]`` table as training regimes: one, or with ``sweep = {weight_decay = [0, 5e-4], ...}`` one per
    combination (Cartesian), each with its label (``weight_decay=0,epochs=40``)."""
    params = {k: v for k, v in train_raw.items() if k != "sweep"}
    return [(build_params(TrainConfig, {**params, **combo}, f"{where}.sweep" if combo else where), label)
            for combo, label in _sweep(f"{where}.sweep", train_raw.get("sweep", {}), "training options")]


def resolve(name_or_path: str) -> Path:
    """A shipped config's name (``quick``) or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    raise ConfigError(f"unknown config {name_or_path!r}{did_you_mean(name_or_path, names)} "
                      f"(shipped: {', '.join(names)}; or give a .toml path)")


def load(name_or_path: str) -> RunConfig:
    path = resolve(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    return parse(raw, str(path))


def select(cfg: RunConfig, protectors: str | None = None, attacks: str | None = None) -> RunConfig:
    """The config with only the protector and attack settings named (comma-separated labels or registered names),
    for ``bench run --protectors ... --attacks ...``."""

    def pick(specs: list[PluginSpec], wanted: str | None, flag: str) -> list[PluginSpec]:
        if wanted is None:
            return specs
        names = [w.strip() for w in wanted.split(",") if w.strip()]
        if not names:
            raise ConfigError(f"{flag}: give at least one name")
        known = sorted({s.label for s in specs} | {s.name for s in specs})
        for n in names:
            if n not in known:
                raise ConfigError(f"{flag}: {n!r} is not in config {cfg.name!r}{did_you_mean(n, known)} "
                                  f"(there: {', '.join(known) or 'none'})")
        return [s for s in specs if s.label in names or s.name in names]

    return dataclasses.replace(cfg, protectors=pick(cfg.protectors, protectors, "--protectors"),
                               attacks=pick(cfg.attacks, attacks, "--attacks"))
