"""Running a config's cells on a Dask cluster: ``bench run --workers N`` (a ``LocalCluster``) or
``--scheduler ADDRESS`` (workers started with ``dask worker``, or by ``dask-jobqueue`` on SLURM).

Every cell is a pure function of its config and the cached models it depends on, so any worker may run it. Each
worker builds its own :class:`~bench.runner.Runner` from the runner's spec (config, directories, *where* the key
is, never the key itself) and writes the cell's record atomically into the shared run directory. Models and
artifacts shared by several cells are built once: the cache takes a per-entry file lock, so the other workers wait
and then read them. A worker that dies mid-cell loses only that cell; the scheduler runs it again elsewhere
(``retries``). Latency is never measured here: the runner profiles after the cluster is gone.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

from protectors.core.errors import ConfigError

#: times the scheduler reruns a cell whose worker died or raised (a bad input raises on every try)
RETRIES = 2
#: workbenches (data and models of one training) a worker keeps: cells of several trainings reach it interleaved
WORKER_BENCHES = 4


_RUNNERS: dict[str, Any] = {}


def _runner(spec_key: str, spec: dict[str, Any]):
    """This worker process's runner for ``spec`` (built once: it keeps the workbench of the last cells)."""
    if spec_key not in _RUNNERS:
        import torch

        from .runner import CELL_THREADS, Runner


        torch.set_num_threads(CELL_THREADS)  # the serial runner's arithmetic; one core per worker
        _RUNNERS.clear()
        _RUNNERS[spec_key] = Runner(spec["cfg"], spec["out"], data_root=spec["data_root"], download=spec["download"],
                                    key_file=spec["key_file"], key_format=spec["key_format"],
                                    cache_dir=spec["cache_dir"], progress=False, profile=False)
        _RUNNERS[spec_key].bench_slots = WORKER_BENCHES
    return _RUNNERS[spec_key]


def run_cell(spec_key: str, spec: dict[str, Any], kind: str, exp, cell: dict[str, Any]) -> str:
    """On a worker: compute one cell, write its record, return the record's name."""
    runner = _runner(spec_key, spec)
    if runner.store.has(cell):  # a rerun after a lost worker may find it done
        return runner.store.path(cell).name
    return runner.run_cell(kind, exp, cell)


def interleave(todo: list[tuple[str, Any, dict[str, Any]]]) -> list[tuple[str, Any, dict[str, Any]]]:
    """Cells round-robin over workbenches (dataset, model, training seed): workers start on different trainings
    instead of all waiting for the first one's models, while each workbench's cells keep their order."""
    groups: dict[tuple, list] = {}
    for item in todo:
        groups.setdefault((item[1], item[2]["seed"]), []).append(item)
    return [item for row in itertools.zip_longest(*groups.values()) for item in row if item is not None]


class DaskExecutor:
    """Submits cells to a Dask cluster: a fresh ``LocalCluster`` of ``workers`` processes, or ``scheduler``."""

    def __init__(self, workers: int | None = None, scheduler: str | None = None):
        if (workers is None) == (scheduler is None):
            raise ConfigError("give exactly one of --workers N and --scheduler ADDRESS")
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers: must be >= 1, got {workers}")
        self.workers, self.scheduler = workers, scheduler

    def _client(self):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise ConfigError("--workers/--scheduler need dask.distributed: pip install 'dask[distributed]'") from None
        if self.scheduler:
            try:
                return Client(self.scheduler, timeout="20s"), None
            except OSError as exc:
                raise ConfigError(f"--scheduler {self.scheduler}: cannot connect ({exc})") from None
        cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=40)
        return Client(cluster), cluster

    def run(self, runner, todo: list[tuple[str, Any, dict[str, Any]]], on_done: Callable[[], None]) -> None:
        from dask.distributed import as_completed

        from protectors.core.hashing import config_hash

        if not todo:
            return
        client, cluster = self._client()
        spec_key = config_hash({k: v for k, v in runner.spec.items() if k != "cfg"} | {"cfg": repr(runner.spec["cfg"])})
        try:
            futures = [client.submit(run_cell, spec_key, runner.spec, kind, exp, cell, retries=RETRIES,
                                     key=f"cell-{runner.store.key(cell)}", pure=False)
                       for kind, exp, cell in interleave(todo)]
            for fut in as_completed(futures):
                fut.result()  # re-raises a cell's error here (BenchError: one line, exit 2)
                on_done()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
