"""Running a config's cells on a Dask cluster: ``bench run --workers N`` (a ``LocalCluster``) or
``--scheduler ADDRESS`` (workers started with ``dask worker``, or by ``dask-jobqueue`` on SLURM).

Every cell is a pure function of its config and the cached models it depends on, so any worker may run it. Each
worker builds its own :class:`~bench.runner.Runner` from the runner's spec (config, directories, *where* the key
is and the run's key id, never the key itself) and writes the cell's record atomically into the shared run
directory. A worker whose key differs from the run's, or that finds none (it never creates one), refuses every cell
with one line, so no record is ever written under another key. The workers of a ``LocalCluster`` get the key
through a private key file (mode 0600) in the cache directory, removed when the run ends: ``$EDGEPRO_BENCH_KEY``
is gone from the environment by then (:func:`protectors.core.crypto.take_env_key`) and is never put back into a
child's. Models and
artifacts shared by several cells are built once: the cache takes a per-entry file lock, so the other workers wait
and then read them. A worker that dies mid-cell loses only that cell; the scheduler runs it again elsewhere
(``retries``). Latency is never measured here: the runner profiles after the cluster is gone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from protectors.core.errors import BenchError, ConfigError

log = logging.getLogger(__name__)

#: times the scheduler reruns a cell whose worker died or raised (a bad input raises on every try)
RETRIES = 2
#: workbenches (data and models of one training) a worker keeps: cells of several trainings reach it interleaved
WORKER_BENCHES = 4
#: local worker processes allowed per CPU core (more only thrash: every cell runs on one thread)
WORKERS_PER_CORE = 4
#: schemes of a Dask scheduler address this executor accepts
SCHEDULER_SCHEMES = ("tcp", "tls", "ws", "wss")
#: seconds to reach a scheduler (TCP connect, then the Dask handshake) before the run gives up
CONNECT_TIMEOUT = 10


_RUNNERS: dict[str, Any] = {}


def _runner(spec_key: str, spec: dict[str, Any]):
    """This worker process's runner for ``spec`` (built once: it keeps the workbench of the last cells)."""
    if spec_key not in _RUNNERS:
        import torch

        from .runner import CELL_THREADS, Runner


        torch.set_num_threads(CELL_THREADS)  # the serial runner's arithmetic; one core per worker
        _RUNNERS.clear()
        try:
            # The run's key or nothing: a worker never creates a key, and refuses one whose id is not the run's.
            runner = Runner(spec["cfg"], spec["out"], data_root=spec["data_root"], download=spec["download"],
                            key_file=spec["key_file"], key_format=spec["key_format"], cache_dir=spec["cache_dir"],
                            progress=False, profile=False, create_key=False, expect_key_id=spec["key_id"],
                            isolate=spec.get("isolate", True))
        except BenchError as exc:
            raise type(exc)(f"Dask worker on {socket.gethostname()} (pid {os.getpid()}): {exc}") from None
        _RUNNERS[spec_key] = runner
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


def max_workers() -> int:
    return (os.cpu_count() or 1) * WORKERS_PER_CORE


def parse_scheduler(address: str) -> tuple[str, str, int]:
    """``--scheduler ADDRESS`` as (scheme, host, port); ``HOST:PORT`` means ``tcp://HOST:PORT``. Anything else is
    one line naming the flag, never a silent serial run or an error from deep inside Dask."""
    flag = f"--scheduler {address!r}"
    if not address.strip():
        raise ConfigError(f"{flag}: empty address (e.g. tcp://HOST:8786, as 'dask scheduler' prints it)")
    if any(c.isspace() or not c.isprintable() for c in address):
        raise ConfigError(f"{flag}: an address has no spaces or control characters (e.g. tcp://HOST:8786)")
    try:
        parts = urlsplit(address if "://" in address else f"tcp://{address}")
        scheme, host, port = parts.scheme, parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"{flag}: not an address ({exc}; e.g. tcp://HOST:8786)") from None
    if scheme not in SCHEDULER_SCHEMES:
        raise ConfigError(f"{flag}: unknown scheme {scheme!r} (allowed: {', '.join(SCHEDULER_SCHEMES)})")
    if not host or port is None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{flag}: expected {scheme}://HOST:PORT (e.g. tcp://HOST:8786)")
    if port == 0:
        raise ConfigError(f"{flag}: port 0 is not a scheduler's port")
    return scheme, host, port


def _connect_client(address: str, timeout: float):
    """A Dask client of the scheduler at ``address``, or one line why not. Whatever answers there that is not a
    Dask scheduler (a web server, SSH) makes Dask fail in any way at all (a frame length read from foreign bytes
    is a 3 EiB allocation: MemoryError), so every exception becomes the one line."""
    from dask.distributed import Client

    try:
        return Client(address, timeout=f"{timeout}s")
    except Exception as exc:  # see above: any failure of the handshake means no scheduler here
        why = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ConfigError(f"--scheduler {address}: no Dask scheduler there (the Dask handshake, allowed "
                          f"{timeout:g} s, failed: {type(exc).__name__}{': ' + why if why else ''})") from None


class DaskExecutor:
    """Submits cells to a Dask cluster: a fresh ``LocalCluster`` of ``workers`` processes, or ``scheduler``.

    The arguments are checked here, before anything runs; :meth:`probe` checks that a scheduler answers."""

    def __init__(self, workers: int | None = None, scheduler: str | None = None):
        if (workers is None) == (scheduler is None):
            raise ConfigError("give exactly one of --workers N and --scheduler ADDRESS")
        if workers is not None and not 1 <= workers <= max_workers():
            raise ConfigError(f"--workers: must be >= 1 and <= {max_workers()} ({WORKERS_PER_CORE} per CPU core "
                              f"here), got {workers}")
        if scheduler is not None:
            parse_scheduler(scheduler)
        self.workers, self.scheduler = workers, scheduler

    def _need_dask(self) -> None:
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            raise ConfigError("--workers/--scheduler need dask.distributed: pip install 'dask[distributed]'") from None

    def probe(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Fail now, in one line, unless Dask is installed and the scheduler (if any) answers as one: a plain TCP
        connect first, then the Dask handshake, each under ``timeout`` seconds."""
        self._need_dask()
        if self.scheduler is None:
            return
        _, host, port = parse_scheduler(self.scheduler)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            raise ConfigError(f"--scheduler {self.scheduler}: cannot connect to {host}:{port} "
                              f"({exc.strerror or type(exc).__name__})") from None
        _connect_client(self._address(), timeout).close()

    def _address(self) -> str:
        return self.scheduler if "://" in self.scheduler else f"tcp://{self.scheduler}"

    def _client(self):
        self._need_dask()
        from dask.distributed import Client, LocalCluster

        if self.scheduler:
            return _connect_client(self._address(), 2 * CONNECT_TIMEOUT), None
        cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=40)
        return Client(cluster), cluster

    @staticmethod
    @contextlib.contextmanager
    def _worker_key_file(runner):
        """The run's key in a private file (mode 0600, in the cache directory beside ``device.key``) for the
        workers of a ``LocalCluster``, removed when the run ends; the key never goes through a child's
        environment or over the cluster."""
        root = Path(runner.cache.root)
        root.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=root, prefix=".worker-key.", suffix=".tmp")  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(runner.key.hex() + "\n")
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def run(self, runner, todo: list[tuple[str, Any, dict[str, Any]]], on_done: Callable[[], None]) -> None:
        from dask.distributed import as_completed

        from protectors.core.hashing import config_hash

        if not todo:
            return
        with contextlib.ExitStack() as stack:
            client, cluster = self._client()
            if cluster is not None:
                stack.callback(cluster.close)
            stack.callback(client.close)  # first the client, then the cluster (last in, first out)
            spec = runner.spec
            if cluster is not None:
                spec = {**spec, "key_file": stack.enter_context(self._worker_key_file(runner)), "key_format": "hex"}
            spec_key = config_hash({k: v for k, v in spec.items() if k != "cfg"} | {"cfg": repr(spec["cfg"])})
            log.info("%d cells on %s (%d workers)", len(todo), self.scheduler or "a local Dask cluster",
                     len(client.nthreads()))
            futures = [client.submit(run_cell, spec_key, spec, kind, exp, cell, retries=RETRIES,
                                     key=f"cell-{runner.store.key(cell)}", pure=False)
                       for kind, exp, cell in interleave(todo)]
            for fut in as_completed(futures):
                fut.result()  # re-raises a cell's error here (BenchError: one line, exit 2)
                on_done()
