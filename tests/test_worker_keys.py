"""A Dask worker uses the run's key or refuses (issue 19), and no child process's environment holds the key.

The run sends each worker the key *id* it expects, never the key. A worker whose key differs, or that finds none
(it never creates one), refuses with one line naming both key ids and where it looked; no record is written.
``$EDGEPRO_BENCH_KEY`` is read once and removed from ``os.environ`` before any child process starts; the workers
of a ``LocalCluster`` get the key through a private key file in the cache, removed after the run.
"""

import json
import os
import subprocess
import sys

import pytest

from bench import config
from bench.cli import main
from protectors.core.crypto import KEY_ENV, KEY_FILE_ENV, forget_env_key, key_id
from protectors.core.errors import KeyMaterialError

RUN_KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))

TINY = """
name = "tiny"
datasets = ["digits"]
seeds = [0]
[train]
epochs = 1
[[protectors]]
name = "none"
"""

CHILD_SEES = "import os, sys; sys.stdout.write(os.environ.get('EDGEPRO_BENCH_KEY', '<absent>'))"


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    forget_env_key()
    yield
    forget_env_key()


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return config.load(str(path))


def records(out):
    return sorted((out / "records").glob("*.json"))


def test_worker_runner_never_creates_a_key(tmp_path, cfg):
    from bench.runner import Runner

    cache = tmp_path / "cache"
    with pytest.raises(KeyMaterialError, match=rf"no device key found \(the run's key id is {key_id(RUN_KEY)}\); "
                                               rf"looked in: .*no {cache / 'device.key'}; a key is never created"):
        Runner(cfg, tmp_path / "out", cache_dir=cache, progress=False, create_key=False,
               expect_key_id=key_id(RUN_KEY))
    assert not (cache / "device.key").exists()


def test_worker_refuses_a_key_whose_id_is_not_the_runs(tmp_path, cfg):
    from bench import executor
    from bench.runner import Runner

    run_key = tmp_path / "run.key"
    run_key.write_text(RUN_KEY.hex())
    run_key.chmod(0o600)
    runner = Runner(cfg, tmp_path / "out", key_file=str(run_key), cache_dir=tmp_path / "cache", progress=False)
    assert runner.spec["key_id"] == key_id(RUN_KEY) and RUN_KEY.hex() not in repr(runner.spec)
    run_key.write_text(OTHER_KEY.hex())  # what this worker finds where the run said the key is
    try:
        with pytest.raises(KeyMaterialError) as info:
            executor._runner("spec", runner.spec)
    finally:
        executor._RUNNERS.clear()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("Dask worker on ")
    assert (f"wrong device key: key id {key_id(OTHER_KEY)} from key file {run_key}, but the run's key id is "
            f"{key_id(RUN_KEY)}") in msg


def test_local_cluster_worker_with_another_key_refuses_and_writes_nothing(tmp_path, cfg):
    """A worker (a real process of a LocalCluster, used as the run's --scheduler) whose own environment holds
    another key: every cell is refused with one line naming both key ids, and no record is written."""
    pytest.importorskip("dask.distributed")
    from dask.distributed import LocalCluster

    from bench.executor import DaskExecutor
    from bench.runner import Runner

    out, cache = tmp_path / "out", tmp_path / "cache"
    runner = Runner(cfg, out, cache_dir=cache, progress=False, profile=False)  # creates cache/device.key
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=50,
                      env={KEY_ENV: OTHER_KEY.hex()}) as cluster:
        with pytest.raises(KeyMaterialError) as info:
            runner.run(DaskExecutor(scheduler=cluster.scheduler_address))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("Dask worker on ")
    assert (f"wrong device key: key id {key_id(OTHER_KEY)} from ${KEY_ENV}, but the run's key id is "
            f"{key_id(runner.key)}") in msg
    assert records(out) == []


def test_cli_takes_the_env_key_before_any_child_starts(tmp_path, capsys, monkeypatch):
    """``bench run`` reads $EDGEPRO_BENCH_KEY once, removes it from os.environ, and still runs with that key; a child
    started from the run (as the git of provenance, a resource tracker or a worker would be) does not see it."""
    import bench.runner

    seen = {}

    def run(self, executor=None):
        seen["key"] = self.key
        seen["env"] = os.environ.get(KEY_ENV)
        seen["child"] = subprocess.run([sys.executable, "-c", CHILD_SEES], capture_output=True, text=True).stdout
        return {"cells": 0, "ran": 0, "profiled": 0, "superseded": 0}

    monkeypatch.setattr(bench.runner.Runner, "run", run)
    monkeypatch.setenv(KEY_ENV, RUN_KEY.hex())
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress", "--no-profile"]) == 0
    assert seen == {"key": RUN_KEY, "env": None, "child": "<absent>"}
    assert not (tmp_path / "c" / "device.key").exists()  # the env key was used, no other key was made


@pytest.mark.slow
def test_local_cluster_gets_the_env_key_through_a_private_file_not_the_environment(tmp_path, cfg, monkeypatch):
    """--workers with the key in $EDGEPRO_BENCH_KEY: the workers' environments hold no key, the cells run under the
    run's key (from a 0600 file in the cache that is gone after the run), and no device.key is created."""
    pytest.importorskip("dask.distributed")
    from bench.executor import DaskExecutor
    from bench.runner import Runner

    seen = {}

    class Watching(DaskExecutor):
        def _client(self):
            client, cluster = super()._client()
            seen["worker_env"] = set(client.run(lambda: __import__("os").environ.get("EDGEPRO_BENCH_KEY")).values())
            return client, cluster

        def _worker_key_file(self, runner):
            cm = DaskExecutor._worker_key_file(runner)

            class Recording:
                def __enter__(self_):
                    path = cm.__enter__()
                    seen["mode"] = os.stat(path).st_mode & 0o777
                    seen["file"] = path
                    return path

                def __exit__(self_, *exc):
                    return cm.__exit__(*exc)

            return Recording()

    monkeypatch.setenv(KEY_ENV, RUN_KEY.hex())
    out, cache = tmp_path / "out", tmp_path / "cache"
    runner = Runner(cfg, out, cache_dir=cache, progress=False, profile=False)
    assert KEY_ENV not in os.environ and runner.key == RUN_KEY
    summary = runner.run(Watching(workers=1))
    assert summary["ran"] == summary["cells"] == 1
    assert seen["worker_env"] == {None} and seen["mode"] == 0o600
    assert not os.path.exists(seen["file"]) and not list(cache.glob(".worker-key.*"))
    assert not (cache / "device.key").exists()
    (rec,) = records(out)
    assert json.loads(rec.read_text())["result"]["auth_acc"] > 0.1
