"""The Dask executor: a small config on a 2-worker LocalCluster gives the serial run's records."""

import json

import pytest

from bench import config
from bench.executor import DaskExecutor
from bench.runner import Runner
from protectors.core.errors import ConfigError

pytest.importorskip("dask.distributed")

CFG = """
name = "t"
datasets = ["digits"]
seeds = [0]
[train]
epochs = 3
[[protectors]]
name = "none"
[[protectors]]
name = "edgepro"
[[attacks]]
name = "finetune"
fractions = [0.05, 0.1]
epochs = 1
"""

TIMING = {"seconds"}


def results(out):
    out = {p.name: json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))}
    return {name: ({k: v for k, v in r["result"].items() if k not in TIMING}, r["cell"]) for name, r in out.items()}


def serial_run(tmp_path):
    """The config and a key file, and the serial run's records in ``tmp_path/serial`` (cache ``c1``)."""
    path = tmp_path / "t.toml"
    path.write_text(CFG)
    cfg = config.load(str(path))
    key = tmp_path / "k.key"
    key.write_text(bytes(range(32)).hex())
    key.chmod(0o600)
    Runner(cfg, tmp_path / "serial", key_file=str(key), cache_dir=tmp_path / "c1", progress=False,
           profile=False).run()
    return cfg, key


@pytest.mark.slow
def test_two_workers_give_the_serial_records(tmp_path, monkeypatch):
    cfg, key = serial_run(tmp_path)
    summary = Runner(cfg, tmp_path / "dask", key_file=str(key), cache_dir=tmp_path / "c2", progress=False,
                     profile=False).run(DaskExecutor(workers=2))
    assert summary["ran"] == summary["cells"] == 6
    serial, parallel = results(tmp_path / "serial"), results(tmp_path / "dask")
    assert serial.keys() == parallel.keys() and len(serial) == 6
    assert serial == parallel
    # Each model was trained once in the shared cache, although two workers needed it.
    assert len(list((tmp_path / "c2" / "models").glob("*.safetensors"))) == len(
        list((tmp_path / "c1" / "models").glob("*.safetensors")))


def test_executor_arguments_are_checked():
    with pytest.raises(ConfigError, match="exactly one of --workers N and --scheduler"):
        DaskExecutor()
    with pytest.raises(ConfigError, match="--workers: must be >= 1"):
        DaskExecutor(workers=0)


@pytest.mark.slow
def test_worker_killed_mid_cell_loses_only_that_cell(tmp_path):
    """SIGKILL a worker while it computes a cell: its nanny starts a fresh process, the scheduler runs the lost cell
    again, and the run ends with every record, equal to the serial run's."""
    import os
    import signal
    import threading
    import time

    from dask.distributed import Client, LocalCluster

    cfg, key = serial_run(tmp_path)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=50) as cluster, Client(cluster) as client:
        runner = Runner(cfg, tmp_path / "dask", key_file=str(key), cache_dir=tmp_path / "c2", progress=False,
                        profile=False)
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(runner.run(DaskExecutor(
            scheduler=cluster.scheduler_address))))
        thread.start()
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and thread.is_alive():
            busy = {w: tasks for w, tasks in client.processing().items() if any("cell-" in t for t in tasks)}
            if busy:
                worker = next(iter(busy))
                pid = client.run(os.getpid, workers=[worker])[worker]
                os.kill(pid, signal.SIGKILL)
                killed = worker
            time.sleep(0.05)
        thread.join(timeout=300)
    assert killed is not None, "no worker was ever seen computing a cell"
    assert outcome["ran"] == outcome["cells"] == 6
    assert results(tmp_path / "dask") == results(tmp_path / "serial")
