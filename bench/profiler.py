"""Inference-latency profiler: cold start, warm single-stream latency, throughput, memory, per edge target.

For each model × protector setting × deploy mode × target it measures, on the protector's own authorized
inference path:

- **cold start**: read the artifact from disk, decrypt, build, first inference;
- **warm latency** at batch 1 (the edge single-stream scenario) after a warm-up, with a minimum number of queries
  *and* a minimum duration, reported as p50/p90/p99 and mean (MLPerf-style); then more rounds until the 95%
  bootstrap interval of every overhead ratio is within ±1%, or a time cap (``max_seconds``), and the record says
  which;
- **throughput** at a larger batch; **memory**: growth of the peak resident set during the cold start
  (``peak_mem_mb``), what the deployment keeps resident after it (``resident_mb``) and the peak growth over ten
  inferences at batch 1 (``infer_peak_mb``), each after freed heap pages went back to the OS; artifact and secret
  bytes;
- the **design floor** of a deployment whose secret lives in its graph (a runner with a ``floor()``, e.g. EdgePro's
  mask on ONNX Runtime): the same graph with the secret baked in as constants, timed interleaved beside it;
  ``vs_floor`` is the median per-round ratio deployment/floor with its bootstrap interval, ``floor_overhead`` the
  floor's own ratio to ``none``.

A target may *prepare* a deployment before its cold start (untimed: e.g. int8 quantization on synthetic
calibration inputs, as a model owner would at provisioning).

Every variant of a (model, target) pair, ``none`` included, runs in one child process, *interleaved* query by
query, so machine drift hits all of them alike. Each round runs the variants in a fresh random order: with a fixed
cyclic order (even with a rotating start) a variant always ran right after the same neighbour, and the one after
AES per-inference paid for the caches its decryption had flushed (×1.11 on EdgePro's mask on LeNet-5, ONNX Runtime).
``overhead`` is the median of the per-round ratios protected/none. Latency needs no trained weights, so the
profiler builds artifacts from randomly initialized models and needs no dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import protectors
from protectors.core.artifact import Artifact
from protectors.core.base import latency_context
from protectors.core.crypto import GcmDecryptor, encrypt, key_id, parse_key, secret_seed
from protectors.core.errors import BenchError, NotApplicable
from protectors.core.hashing import canonical_json

from . import models
from .config import ProfileConfig
from .records import BASELINE_KIND  # every overhead ratio divides by a protector that declares no secret
from .targets import targets

#: input shapes the profiler uses per model (MNIST-sized for LeNet-5, CIFAR-sized for the others)
PROFILE_SEED = 0
#: measure until every overhead ratio's 95% bootstrap interval is within ±1% of it, or this many seconds
CI_TARGET = 0.01
#: the ONNX files' layout (2: secrets as valueless initializers supplied at session creation)
ONNX_LAYOUT = 2
#: synthetic calibration inputs a target may quantize on (latency needs no dataset)
CALIB_SAMPLES = 32


def profile_card(model: str):
    """The card of the model as profiled: its default input, the card's default number of classes."""
    return models.card(model)


def gcm_gbps(nbytes: int = 16 << 20, reps: int = 5) -> float:
    """AES-256-GCM decryption speed (GB/s) into a preallocated buffer, in this process."""
    key = bytes(range(32))  # a throwaway probe key: only the speed matters
    dec = GcmDecryptor(key, encrypt(key, bytes(nbytes), b""), b"", "gcm probe")
    dec.decrypt()
    best = min(_timed(dec.decrypt) for _ in range(reps))
    return nbytes / best / 1e9


def bootstrap_median_ci(ratios: np.ndarray, resamples: int = 400, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap interval for the median of the per-round ratios protected/none."""
    rng = np.random.default_rng(seed)
    n = len(ratios)
    meds = np.empty(resamples)
    for j in range(0, resamples, 50):  # in blocks: the index matrix stays small
        idx = rng.integers(0, n, size=(min(50, resamples - j), n))
        meds[j:j + len(idx)] = np.median(ratios[idx], axis=1)
    a = (1 - level) / 2
    return float(np.quantile(meds, a)), float(np.quantile(meds, 1 - a))


def overhead_cis(times: dict[str, list[float]], baseline: str | None) -> dict[str, dict[str, float]]:
    """Per variant (not the ``baseline`` variant): the overhead ratio's 95% interval and its half-width relative to
    the median."""
    base = np.asarray(times.get(baseline, []))
    out = {}
    for i, t in times.items():
        if i == baseline or len(t) != len(base) or len(base) < 2:
            continue
        ratios = np.asarray(t) / base
        lo, hi = bootstrap_median_ci(ratios)
        out[i] = {"low": lo, "high": hi, "rel": (hi - lo) / 2 / float(np.median(ratios))}
    return out


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        return True
    except OSError:
        return False


def _settle() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next resident-memory growth is this
    deployment's, not a reuse of what an earlier one freed."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _mb(after: int | None, before: int | None) -> float | None:
    return (after - before) / 1024 if after is not None and before is not None else None


def _inference_peak_mb(run, x, calls: int = 10) -> float | None:
    """Growth of the peak resident set over ``calls`` inferences at batch 1 (e.g. a per-inference decryption
    buffer), from the resident set before them."""
    _settle()
    if not _reset_peak():
        return None
    rss0 = _rss_kb("VmRSS")
    for _ in range(calls):
        run(x)
    return _mb(_rss_kb("VmHWM"), rss0)


def _floor_columns(t: np.ndarray, floor: np.ndarray, base: np.ndarray, floor_ci: dict | None) -> dict[str, float]:
    """The design floor's latency, its own overhead over the baseline, and this variant's ratio to it."""
    out = {"floor_p50_ms": float(np.percentile(floor, 50))}
    if len(base) == len(floor):
        out["floor_overhead"] = float(np.median(floor / base))
    if floor_ci is not None:
        out.update(floor_overhead_ci_low=floor_ci["low"], floor_overhead_ci_high=floor_ci["high"])
    if len(floor) == len(t) and len(t) > 1:
        ratios = t / floor
        lo, hi = bootstrap_median_ci(ratios)
        out.update(vs_floor=float(np.median(ratios)), vs_floor_ci_low=lo, vs_floor_ci_high=hi)
    return out


# -- child process ----------------------------------------------------------------------------------------------
def child(job_path: str) -> None:
    """Measure every variant of one (model, target) job, interleaved; print JSON results."""
    job = json.loads(Path(job_path).read_text())
    target = targets.get(job["target"])()
    target.setup()
    prof = ProfileConfig(**job["profile"])
    # The key comes through the stdin pipe, never the environment (which other processes of the user can read).
    key = parse_key(sys.stdin.buffer.read(), "profiler key pipe")
    spec = job["model_spec"]
    factory = models.factory(spec["name"], spec["in_channels"], spec["image_size"], spec["num_classes"],
                             PROFILE_SEED)
    shape = (spec["in_channels"], spec["image_size"], spec["image_size"])
    gen = torch.Generator().manual_seed(1)
    x1 = target.example(torch.randn(1, *shape, generator=gen))
    xb = target.example(torch.randn(prof.throughput_batch, *shape, generator=gen))
    calib = torch.randn(CALIB_SAMPLES, *shape, generator=gen)  # latency only: synthetic calibration inputs
    results: dict[str, dict[str, Any]] = {}
    runs = {}
    floors: dict[str, str] = {}  # variant id -> the id of its design floor (same graph, secrets as constants)
    for v in job["variants"]:  # untimed provisioning (e.g. int8 quantization) of every variant first
        with contextlib.suppress(NotImplementedError, BenchError):  # its load says why, in the record
            target.prepare(protectors.get(v["protector"], **v["params"]), Artifact.load(v["dir"]), key, factory,
                           v["mode"], calib)
    # One throwaway load first, so that "cold start" is the model's (read, decrypt, build, first inference),
    # not the runtime's own imports and one-time initialization.
    first = job["variants"][0]
    target.load(protectors.get(first["protector"], **first["params"]), Artifact.load(first["dir"]), key, factory,
                first["mode"])(x1)
    for v in job["variants"]:
        protector = protectors.get(v["protector"], **v["params"])
        _settle()
        measure_mem = _reset_peak()
        rss0 = _rss_kb("VmRSS")
        t0 = time.perf_counter()
        try:
            artifact = Artifact.load(v["dir"])
            run = target.load(protector, artifact, key, factory, v["mode"])
            run(x1)
        except NotImplementedError as exc:
            results[v["id"]] = {"note": str(exc)}
            continue
        except (NotApplicable, protectors.ConfigError) as exc:  # e.g. fold mode on a model with no foldable site
            results[v["id"]] = {"note": str(exc) if str(exc).startswith("n/a") else f"n/a: {exc}"}
            continue
        cold = (time.perf_counter() - t0) * 1e3
        peak, rss1 = _rss_kb("VmHWM"), _rss_kb("VmRSS")
        results[v["id"]] = {
            "cold_start_ms": cold,
            "peak_mem_mb": _mb(peak, rss0) if measure_mem else None,
            "resident_mb": _mb(rss1, rss0),
            "artifact_bytes": artifact.total_bytes - sum(len(artifact.files[n]) for n in artifact.meta.get(
                "deploy_files", {})),
            "secret_bytes": protector.secret_bytes(artifact), "note": ""}
        runs[v["id"]] = run
        floor = getattr(run, "floor", None)
        if callable(floor):  # an in-graph secret: time its design floor beside it
            floors[v["id"]] = f"{v['id']}|floor"
            runs[floors[v["id"]]] = floor()
    ids = list(runs)
    for i in ids:
        for _ in range(prof.warmup):
            runs[i](x1)
    times: dict[str, list[float]] = {i: [] for i in ids}
    start, rnd = time.perf_counter(), 0

    shuffle = np.random.default_rng(PROFILE_SEED)  # the order of each round: no variant keeps one predecessor

    def rounds(n: int) -> None:
        nonlocal rnd
        for _ in range(n):
            order = [ids[j] for j in shuffle.permutation(len(ids))]
            for i in order:
                t0 = time.perf_counter_ns()
                runs[i](x1)
                times[i].append((time.perf_counter_ns() - t0) / 1e6)
            rnd += 1

    while ids and (rnd < prof.min_queries or time.perf_counter() - start < prof.min_seconds):
        rounds(1)
    # Then keep measuring until every overhead ratio's 95% interval is within ±CI_TARGET, or the time cap.
    cap = max(prof.min_seconds, prof.max_seconds)
    # The variant every ratio divides by: the one the parent marked (a protector that declares no secret).
    baseline = next((v["id"] for v in job["variants"] if v.get("baseline")), None)
    cis = overhead_cis(times, baseline)
    while baseline in times and not all(c["rel"] <= CI_TARGET for c in cis.values()) \
            and time.perf_counter() - start < cap:
        rounds(max(50, rnd // 4))
        cis = overhead_cis(times, baseline)
    stop = "converged" if all(c["rel"] <= CI_TARGET for c in cis.values()) else "time cap"
    variants = [i for i in ids if i in results]  # the floors are measured, not reported as cells
    through: dict[str, list[float]] = {i: [] for i in variants}
    for _ in range(3):
        for i in variants:
            through[i].append(_timed(runs[i], xb))
    for i in variants:
        results[i]["infer_peak_mb"] = _inference_peak_mb(runs[i], x1)
    base = np.asarray(times.get(baseline, []))
    for i in variants:
        t = np.asarray(times[i])
        r = results[i]
        r.update(p50_ms=float(np.percentile(t, 50)), p90_ms=float(np.percentile(t, 90)),
                 p99_ms=float(np.percentile(t, 99)), mean_ms=float(t.mean()), queries=len(t),
                 throughput_ips=prof.throughput_batch / float(np.median(through[i])))
        r["overhead"] = float(np.median(t / base)) if len(base) == len(t) else None
        if i in cis:
            r.update(overhead_ci_low=cis[i]["low"], overhead_ci_high=cis[i]["high"],
                     overhead_ci_stop=f"{stop} after {rnd} rounds ({time.perf_counter() - start:.1f} s)")
        if i in floors:
            r.update(_floor_columns(t, np.asarray(times[floors[i]]), base, cis.get(floors[i])))
    out = {"results": results, "threads": torch.get_num_threads()}
    if job.get("gcm_probe"):
        out["gcm_gbps"] = gcm_gbps()
    print(json.dumps(out))


# -- parent -----------------------------------------------------------------------------------------------------
def baseline_spec(runner):
    """The protector setting every overhead ratio divides by: the config's first that declares no secret
    (``secret_kind`` :data:`BASELINE_KIND`), else the first registered protector that does (with its defaults)."""
    from .config import PluginSpec

    registry = protectors.protectors
    for spec in runner.cfg.protectors:
        if getattr(registry.get(spec.name), "secret_kind", None) == BASELINE_KIND:
            return spec
    for name in registry.names():
        try:
            cls = registry.get(name)
        except protectors.ConfigError:  # a broken third-party plugin: not a baseline
            continue
        if getattr(cls, "secret_kind", None) == BASELINE_KIND:
            return PluginSpec(name, {}, name)
    raise protectors.ConfigError(f"no registered protector declares secret_kind {BASELINE_KIND!r}: the latency "
                                 "overhead has no baseline to divide by")


def _variants(runner) -> list[tuple[str, Any, str]]:
    """(label, spec, mode) for the baseline (first) and every other protector setting × mode in the config."""
    base = baseline_spec(runner)
    specs = [base] + [p for p in runner.cfg.protectors if p.label != base.label]
    return [(s.label, s, m) for s in specs for m in protectors.protectors.get(s.name).modes]


def build_deployments(runner, model_name: str, onnx: bool) -> dict[str, dict[str, Any]]:
    """Artifacts (and ONNX files) for every variant of ``model_name``, cached by what determines them."""
    card = profile_card(model_name)
    shape = card.input_shape
    factory = models.factory(model_name, card.in_channels, card.image_size, card.num_classes, PROFILE_SEED)
    out = {}
    for label, spec, mode in _variants(runner):
        vid = f"{label}|{mode}"
        key = {"kind": "deploy", "model": model_name, "protector": runner.plugin_key(spec), "mode": mode,
               "onnx": onnx, "key_id": key_id(runner.key), "onnx_layout": ONNX_LAYOUT}

        def make(spec=spec, mode=mode, key=key) -> Artifact:
            protector = protectors.get(spec.name, **spec.params)
            example = torch.zeros(1, *shape)
            ctx = latency_context(factory, example, card.num_classes,
                                  secret_seed(runner.key, canonical_json({**key, "protector": spec.key()})))
            artifact = protector.protect_for_latency(factory(), ctx, runner.key)
            if onnx:
                try:
                    protector.onnx_build(artifact, runner.key, factory, mode, example)
                except NotApplicable as exc:
                    artifact.meta["onnx_unsupported"] = str(exc)  # the ONNX target reports it as n/a
                artifact.seal(runner.key)
            return artifact

        path = runner.cache.artifact_dir(key, make)
        out[vid] = {"id": vid, "label": label, "protector": spec.name, "params": spec.params, "mode": mode,
                    "dir": str(path), "spec": spec, "baseline": not out}  # _variants lists the baseline first
    return out


def run_target(runner, model_name: str, target_name: str, variants: dict[str, dict]) -> dict[str, Any]:
    """Run one (model, target) job in a child process; return its parsed JSON output."""
    target = targets.get(target_name)()
    job = {"target": target_name, "profile": asdict(runner.cfg.profile), "model_spec": profile_card(model_name).spec(),
           "variants": [{k: v for k, v in var.items() if k != "spec"} for var in variants.values()],
           "gcm_probe": bool(target.env)}
    env = {**os.environ, **target.env, "PYTHONWARNINGS": "ignore"}
    for name in ("EDGEPRO_BENCH_KEY", "EDGEPRO_BENCH_KEY_FILE"):
        env.pop(name, None)
    if target.threads == 1:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(job, fh)
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.profiler", fh.name], env=env, capture_output=True,
                              input=runner.key.hex(), text=True, timeout=3600)
    finally:
        os.unlink(fh.name)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"profiler child for {model_name} on {target_name} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile_cells(runner) -> list[dict[str, Any]]:
    """The config's latency cells: models × protector settings × modes × targets."""
    prof = runner.cfg.profile
    return [{"kind": "profile", "model": model_name, "protector": label, "plugin": runner.plugin_key(spec),
             "mode": mode, "target": target_name, "profile": asdict(prof)}
            for model_name in prof.models for target_name in prof.targets for label, spec, mode in _variants(runner)]


def run_config(runner) -> int:
    """Profile the config's latency cells; write one record per cell.

    Holds the machine's profiler lock (``profiler.lock`` in the cache root) meanwhile, so two runs sharing a cache
    never measure latency at the same time: the second logs one line and waits."""
    import contextlib
    import fcntl
    import logging

    @contextlib.contextmanager
    def machine_lock():
        path = Path(runner.cache.root) / "profiler.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logging.getLogger(__name__).warning(
                    "profiler: another run is measuring latency with this cache (%s); waiting for it to finish", path)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    prof = runner.cfg.profile
    cells = profile_cells(runner)
    todo = [c for c in cells if not runner.store.has(c)]
    if not todo:
        return 0
    host_gcm = None
    done = 0
    with machine_lock(), tqdm(total=len(cells), initial=len(cells) - len(todo), desc="profile",
                              disable=not runner.progress, unit="cell") as bar:
        for model_name in prof.models:
            deployments = None
            for target_name in prof.targets:
                mine = [c for c in todo if c["model"] == model_name and c["target"] == target_name]
                if not mine:
                    continue
                target = targets.get(target_name)()
                why = target.unavailable()
                if why:
                    for c in mine:
                        runner.store.write(c, {"note": why})
                        done += 1
                        bar.update(1)
                    continue
                if deployments is None:
                    onnx = any(targets.get(t).needs_onnx for t in prof.targets)
                    deployments = build_deployments(runner, model_name, onnx)
                out = run_target(runner, model_name, target_name, deployments)
                extra_note = ""
                if "gcm_gbps" in out:
                    host_gcm = host_gcm or gcm_gbps()
                    ok = out["gcm_gbps"] < 0.5 * host_gcm
                    extra_note = (f"software AES {'verified' if ok else 'NOT in effect'}: AES-GCM "
                                  f"{out['gcm_gbps']:.2f} GB/s vs {host_gcm:.2f} GB/s with AES-NI")
                for c in mine:
                    res = dict(out["results"].get(f"{c['protector']}|{c['mode']}", {"note": "not measured"}))
                    res["note"] = "; ".join(n for n in (res.get("note", ""), extra_note) if n)
                    res["threads"] = out.get("threads")
                    res["schedule"] = "alone: after every accuracy cell, one (model, target) job at a time"
                    runner.store.write(c, res)
                    done += 1
                    bar.update(1)
    return done


if __name__ == "__main__":
    child(sys.argv[1])
