"""Command line: ``python -m bench list | run | report | compare | readme`` (also installed as ``edgepro-bench``).

Exit status 0 on success, 2 with a one-line error on bad input (config, data, artifact, key) and on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

from protectors.core.crypto import take_env_key
from protectors.core.errors import BenchError

#: the lock a run holds on its run directory (``--out``) from start to end
RUN_LOCK = ".lock"


class UsageError(BenchError):
    """A command line argparse refuses (unknown option, missing or malformed value)."""


def _list(args: argparse.Namespace) -> int:
    from attacks import attacks
    from protectors import protectors

    from . import config, data, models, targets

    # Import every plugin, so that a broken one is reported here rather than in the middle of a run.
    broken = {f"{reg.kind} {name}": why for reg in (protectors, attacks, targets.targets)
              for name, why in reg.load_all().items()}
    sections = {"datasets": data.datasets.names(), "models": models.models.names(),
                "protectors": [n for n in protectors.names() if f"protector {n}" not in broken],
                "attacks": [n for n in attacks.names() if f"attack {n}" not in broken],
                "targets": [n for n in targets.targets.names() if f"target {n}" not in broken],
                "configs": sorted(p.stem for p in config.CONFIG_DIR.glob("*.toml"))}
    for name, items in sections.items():
        print(f"{name}: {', '.join(items) if items else '(none)'}")
    for what, why in broken.items():
        print(f"failed to load {what}: {why}")
    return 0


def check_writable_dir(path: Path, what: str) -> None:
    """Fail now, naming ``what`` (the flag) and ``path``, if ``path`` cannot be made a directory we can write in.

    Probes by creating the directory and a temporary file, then removes both (a failed run leaves nothing behind),
    so a bad path is reported before hours of training instead of when the first result is written.
    """
    created = []
    try:
        for d in reversed([path, *path.parents]):
            if d.exists():
                if not d.is_dir():
                    where = "" if d == path else f"{d} "
                    raise BenchError(f"{what} {path}: {where}is a file, not a directory")
                continue
            d.mkdir()
            created.append(d)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".edgepro-bench-probe.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise BenchError(f"{what} {path}: not writable ({exc.strerror or exc})") from None
    finally:
        for d in reversed(created):
            with contextlib.suppress(OSError):  # another process may have put something there meanwhile
                d.rmdir()


def check_clean_tree(out: Path, allow_dirty: bool) -> None:
    """Refuse a run into the checkout's committed ``results/`` from a tree with uncommitted changes to tracked
    files (unless ``allow_dirty``): its records would name a commit that does not hold the code that made them."""
    from . import provenance

    root = provenance.repo_root()
    if root is None or allow_dirty:
        return
    results = root / "results"
    try:
        out.resolve().relative_to(results.resolve())
    except ValueError:
        return
    dirty = provenance.git_dirty(root)
    if dirty:
        shown = ", ".join(dirty[:3]) + (f" and {len(dirty) - 3} more" if len(dirty) > 3 else "")
        raise BenchError(f"--out {out}: is under {results}, whose records must name the commit that made them, but "
                         f"the git tree is dirty ({len(dirty)} tracked file(s) modified: {shown}); commit first, "
                         f"or pass --allow-dirty")


@contextlib.contextmanager
def run_dir_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory ``out`` (``out/.lock``, flock) until the block ends, so two runs
    never write one directory's records and report at once; a second run refuses at once, naming the holder."""
    path = out / RUN_LOCK
    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BenchError(f"--out {out}: cannot lock it ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            raise BenchError(f"--out {out}: another run holds it{f' (pid {holder})' if holder.isdigit() else ''}, "
                             f"see {path}; wait for it to finish or give another --out") from None
        try:  # the holder removes the file when it is done: a lock on a removed file locks nothing, so try again
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked, so that no one locks the file being removed
        os.close(fd)


def _run(args: argparse.Namespace) -> int:
    from . import config, data
    from .executor import DaskExecutor
    from .runner import Runner

    cfg = config.select(config.load(args.config), args.protectors, args.attacks)
    # --workers 0 or --scheduler "" are errors, not a silent serial run; DaskExecutor checks both.
    cluster = args.workers is not None or args.scheduler is not None
    executor = DaskExecutor(args.workers, args.scheduler) if cluster else None
    out = Path(args.out or Path("runs") / cfg.name)  # cfg.name is a plain name: runs/<name> stays in runs/
    # Every check of the command line before the Runner starts anything: a bad path must not cost a training run.
    data.explicit_root(args.data_root, args.download)
    check_writable_dir(out, "--out")
    check_writable_dir(Path(args.cache_dir) if args.cache_dir else data.cache_dir(),
                       "--cache-dir" if args.cache_dir else f"cache directory (${data.CACHE_ENV} or the default)")
    check_clean_tree(out, args.allow_dirty)
    if executor is not None:
        executor.probe()  # the scheduler answers, as a Dask scheduler, within a few seconds
    runner = Runner(cfg, out, data_root=args.data_root, download=args.download, key_file=args.key_file,
                    key_format=args.key_format, cache_dir=args.cache_dir, progress=not args.no_progress,
                    profile=not args.no_profile)
    with run_dir_lock(out):
        summary = runner.run(executor)
    if summary.get("superseded"):
        print(f"{out / 'records'}: {summary['superseded']} records of settings this config no longer has (older plugin "
              f"or harness code, other parameters) were recomputed; the old ones are in records/superseded/")
    print(f"{cfg.name}: {summary['ran']} of {summary['cells']} cells ran (the rest were already recorded); "
          f"report in {out / 'REPORT.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from . import report

    print(report.write(args.dir))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from . import compare

    if not args.summary:
        return compare.main(args.ref, args.run, acc_tol=args.acc_tol, latency_tol=args.latency_tol)
    # The friendly form (tox -e bench): a short summary, a section in RUN/REPORT.md, and exit 0 even on drift.
    result = compare.compare(args.ref, args.run, acc_tol=args.acc_tol, latency_tol=args.latency_tol)
    print(result.text(max_rows=20))
    if args.report:
        compare.append_to_report(args.run, args.ref, acc_tol=args.acc_tol, latency_tol=args.latency_tol)
        print(f"comparison added to {Path(args.run) / 'REPORT.md'}")
    if not result.ok:
        print(f"drift from {args.ref}: see above; 'python -m bench compare {args.ref} {args.run}' lists every value "
              "and exits 1 (the README says what to do)")
    return 0


def _readme(args: argparse.Namespace) -> int:
    from . import readme

    return readme.main(args.path, check=args.check)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: ...``, exit 2) like every other bad input."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgepro-bench", description="Benchmark suite for DNN model protection on edge devices.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered datasets, models, protectors, attacks, targets").set_defaults(func=_list)
    r = sub.add_parser("run", help="run a config (quick, fashion, paper, or a .toml path)")
    r.add_argument("--config", required=True, help="shipped config name or path to a TOML file")
    r.add_argument("--out", help="run directory (default: runs/<config name>)")
    r.add_argument("--data-root", help="dataset root (default: $EDGEPRO_BENCH_DATA, ./data, the cache)")
    r.add_argument("--download", action="store_true", help="download missing datasets (needs internet)")
    r.add_argument("--key-file", help="device key file (default: $EDGEPRO_BENCH_KEY, $EDGEPRO_BENCH_KEY_FILE, "
                   "else a key created once in the cache)")
    r.add_argument("--key-format", choices=["hex", "raw"],
                   help="how the key file is written: 64 hex digits (default) or 32 raw bytes")
    r.add_argument("--cache-dir", help="cache of trained models and artifacts (default: $EDGEPRO_BENCH_CACHE)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--no-profile", action="store_true", help="skip the latency profiler")
    r.add_argument("--protectors", help="only these protector settings of the config (comma-separated)")
    r.add_argument("--attacks", help="only these attacks of the config (comma-separated)")
    ex = r.add_mutually_exclusive_group()
    ex.add_argument("--workers", type=int, help="run cells on a local Dask cluster of N worker processes")
    ex.add_argument("--scheduler", help="run cells on an existing Dask cluster (scheduler address)")
    r.add_argument("--allow-dirty", action="store_true",
                   help="allow --out under the checkout's results/ with uncommitted changes to tracked files")
    r.set_defaults(func=_run)
    rep = sub.add_parser("report", help="rebuild tables, plots and REPORT.md from DIR/records")
    rep.add_argument("dir")
    rep.set_defaults(func=_report)
    c = sub.add_parser("compare", help="compare a run with a reference run; exit 1 on accuracy drift")
    c.add_argument("ref", help="reference run directory (e.g. results/quick)")
    c.add_argument("run", help="run directory to check (e.g. runs/quick)")
    c.add_argument("--acc-tol", type=float, default=0.02, help="least accuracy tolerance (default 0.02)")
    c.add_argument("--latency-tol", type=float, default=0.10,
                   help="relative change of an overhead ratio that is flagged (default 0.10; never fails)")
    c.add_argument("--summary", action="store_true",
                   help="a short summary only, and exit 0 even on drift (what tox -e bench shows)")
    c.add_argument("--report", action="store_true", help="also add the comparison as a section of RUN/REPORT.md")
    c.set_defaults(func=_compare)
    rd = sub.add_parser("readme", help="rewrite the README's generated results tables from the run directories' "
                        "records (between <!-- table: DIR NAME --> and <!-- /table -->)")
    rd.add_argument("path", nargs="?", default="README.md", help="the README (default README.md)")
    rd.add_argument("--check", action="store_true",
                    help="rewrite nothing; exit 1 when a generated table differs from the records")
    rd.set_defaults(func=_readme)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


class _StderrHandler(logging.StreamHandler):
    """Log lines of the suite's own loggers to whatever ``sys.stderr`` is when they are emitted."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    """The suite's library modules log (``logging``); the command line shows their INFO and above as plain lines."""
    for name in ("bench", "protectors", "attacks"):
        log = logging.getLogger(name)
        if not any(isinstance(h, _StderrHandler) for h in log.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    # First of all: the key in $EDGEPRO_BENCH_KEY leaves the environment before any child process can inherit it.
    take_env_key()
    warnings.formatwarning = _one_line_warning
    _setup_logging()
    try:
        args = parser().parse_args(argv)
        return args.func(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished cells are recorded, rerun the same command to resume", file=sys.stderr)
        return 130
