"""Guards of ``bench run`` before and around a run: usage errors, cluster flags, the config's name, duplicate sweep
values, the run directory's lock, the profiler's machine lock, a dirty tree under results/, broken or missing
plugins. Every refusal is one line on stderr (``error: ...``) and exit status 2; nothing here trains."""

import fcntl
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

from bench import config, provenance
from bench.cli import main, run_dir_lock
from protectors.core.errors import ConfigError

TINY = """
name = "tiny"
datasets = ["digits"]
seeds = [0]
[train]
epochs = 1
[[protectors]]
name = "none"
"""


def assert_one_line(err, *fragments):
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


@pytest.fixture
def no_runner(monkeypatch):
    """Fails the test if the CLI gets as far as building a Runner (that is, could train)."""
    import bench.runner

    def refuse(*args, **kwargs):
        raise AssertionError("the Runner was built: the bad input was not caught up front")

    monkeypatch.setattr(bench.runner, "Runner", refuse)


@pytest.fixture
def fake_run(monkeypatch):
    """``Runner.run`` replaced by a stub (no training) that records each call."""
    import bench.runner

    calls = []

    def run(self, executor=None):
        calls.append(self)
        return {"cells": 0, "ran": 0, "profiled": 0, "superseded": 0}

    monkeypatch.setattr(bench.runner.Runner, "run", run)
    return calls


def run_cli(tmp_path, capsys, *extra, text=TINY, out="out"):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    args = ["run", "--config", str(cfg), "--no-progress", "--no-profile", "--cache-dir", str(tmp_path / "cache")]
    if out is not None:
        args += ["--out", str(tmp_path / out)]
    rc = main(args + list(extra))
    return rc, capsys.readouterr().err


# -- usage errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,fragment", [
    (["run", "--config", "quick", "--workers", "abc"], "argument --workers: invalid int value: 'abc'"),
    ([], "the following arguments are required: command"),
    (["run"], "the following arguments are required: --config"),
    (["run", "--config", "quick", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line_exit_2(capsys, argv, fragment):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert_one_line(captured.err, fragment, "--help")
    assert "usage:" not in captured.err + captured.out


def test_no_command_from_the_shell_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "bench"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert_one_line(r.stderr, "required: command")


# -- cluster flags ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,fragment", [
    (["--workers", "0"], "--workers: must be >= 1 and <= "),
    (["--workers", "-3"], "--workers: must be >= 1"),
    (["--workers", str((os.cpu_count() or 1) * 4 + 1)], "(4 per CPU core here)"),
    (["--scheduler", ""], "--scheduler '': empty address"),
    (["--scheduler", "   "], "empty address"),
    (["--scheduler", "http://[::1"], "not an address (Invalid IPv6 URL"),
    (["--scheduler", "http://example.org:80"], "unknown scheme 'http'"),
    (["--scheduler", "tcp://host"], "expected tcp://HOST:PORT"),
    (["--scheduler", "tcp://host:99999"], "not an address"),
    (["--scheduler", "tcp://host:8786/path"], "expected tcp://HOST:PORT"),
    (["--scheduler", "tcp://a b:1"], "no spaces or control characters"),
])
def test_cluster_flags_are_checked_up_front(tmp_path, capsys, no_runner, flags, fragment):
    rc, err = run_cli(tmp_path, capsys, *flags)
    assert rc == 2
    assert_one_line(err, fragment)
    assert not (tmp_path / "out").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scheduler_that_does_not_answer_is_one_line(tmp_path, capsys, no_runner):
    rc, err = run_cli(tmp_path, capsys, "--scheduler", f"127.0.0.1:{_free_port()}")
    assert rc == 2
    assert_one_line(err, "cannot connect to 127.0.0.1:")


def test_scheduler_address_answering_non_dask_bytes_is_one_line(tmp_path, capsys, no_runner):
    """A server that is not a Dask scheduler (here: an SSH-like banner, then an HTTP reply) makes Dask read a frame
    length out of foreign bytes (a 3 EiB allocation): one line, not a MemoryError traceback, and not a hang."""
    pytest.importorskip("dask.distributed")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n" * 8 + b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    conn.settimeout(1)
                    conn.recv(65536)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        rc, err = run_cli(tmp_path, capsys, "--scheduler", f"tcp://127.0.0.1:{srv.getsockname()[1]}")
        assert time.monotonic() - t0 < 60
    finally:
        stop.set()
        thread.join(5)
        srv.close()
    assert rc == 2
    assert_one_line(err, "no Dask scheduler there")


# -- the config's name ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "a/b", "..", "a..b", ".hidden", "-x", "", "a\\u0000b",
                                  "tab\\tname", "x" * 101])
def test_config_name_must_be_a_plain_name(tmp_path, name):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'name = "{name}"\n' + TINY.replace('name = "tiny"\n', ""))
    with pytest.raises(ConfigError, match=r"c.toml: name: .* is not a plain name: it names the run directory"):
        config.load(str(cfg))


def test_config_name_from_a_file_name_that_is_no_plain_name(tmp_path):
    cfg = tmp_path / "my run.toml"
    cfg.write_text(TINY.replace('name = "tiny"\n', ""))
    with pytest.raises(ConfigError, match=r"my run.toml: name: 'my run' is not a plain name \(taken from the file "
                                          r"name; set 'name'\)"):
        config.load(str(cfg))
    cfg.write_text(TINY.replace('name = "tiny"\n', "name = 7\n"))
    with pytest.raises(ConfigError, match=r"name: must be a string, got 7"):
        config.load(str(cfg))


def test_run_without_out_never_leaves_runs(tmp_path, capsys, no_runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli(tmp_path, capsys, text=TINY.replace('name = "tiny"', 'name = "../../escaped"'), out=None)
    assert rc == 2
    assert_one_line(err, "c.toml: name: '../../escaped' is not a plain name")
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escaped").exists()


def test_plain_names_are_accepted(tmp_path):
    for name in ("quick", "my_run-2.v1", "A1"):
        cfg = tmp_path / "c.toml"
        cfg.write_text(TINY.replace('"tiny"', f'"{name}"'))
        assert config.load(str(cfg)).name == name


# -- duplicate sweep values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,match", [
    (TINY + "\n[train.sweep]\nepochs = [1, 1]\n", r"c.toml: train.sweep: 'epochs' lists 1 twice"),
    (TINY.replace("[train]\nepochs = 1", "[train]\nsweep = {epochs = [1, 2, 1]}"), r"'epochs' lists 1 twice"),
    (TINY + '[[protectors]]\nname = "edgepro"\nsweep = {gamma = [0.1, 0.3, 0.1]}\n',
     r"protectors\[1\] \(edgepro\).sweep: 'gamma' lists 0.1 twice"),
])
def test_duplicate_sweep_values_are_an_error(tmp_path, text, match):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        config.load(str(cfg))


def test_duplicate_sweep_values_from_the_cli(tmp_path, capsys, no_runner):
    rc, err = run_cli(tmp_path, capsys, text=TINY.replace("[train]\nepochs = 1", "[train]\nsweep = {epochs = [1, 1]}"))
    assert rc == 2
    assert_one_line(err, "train.sweep: 'epochs' lists 1 twice")


# -- key file that is a named pipe ----------------------------------------------------------------------------------
def test_key_file_fifo_does_not_hang_the_cli(tmp_path):
    fifo = tmp_path / "k.fifo"
    os.mkfifo(fifo)
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY)
    r = subprocess.run([sys.executable, "-m", "bench", "run", "--config", str(cfg), "--out", str(tmp_path / "o"),
                        "--cache-dir", str(tmp_path / "cache"), "--key-file", str(fifo), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert_one_line(r.stderr, "k.fifo: key file must be a regular file, this is a named pipe")


# -- the run directory's lock -------------------------------------------------------------------------------------
def test_second_run_on_the_same_out_refuses_at_once(tmp_path, capsys, fake_run):
    out = tmp_path / "out"
    with run_dir_lock(out):
        holder = (out / ".lock").read_text().strip()
        rc, err = run_cli(tmp_path, capsys)
        assert rc == 2
        assert_one_line(err, f"--out {out}: another run holds it (pid {holder})", "give another --out")
        assert fake_run == []
    assert not (out / ".lock").exists()  # released and removed when the run ends
    rc, _ = run_cli(tmp_path, capsys)
    assert rc == 0 and len(fake_run) == 1
    assert not (out / ".lock").exists()


def test_run_holds_the_out_lock_for_the_whole_run(tmp_path, capsys, monkeypatch):
    import bench.runner

    seen = {}

    def run(self, executor=None):
        fd = os.open(self.out / ".lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen["locked"] = True
        finally:
            os.close(fd)
        return {"cells": 0, "ran": 0, "profiled": 0, "superseded": 0}

    monkeypatch.setattr(bench.runner.Runner, "run", run)
    assert run_cli(tmp_path, capsys)[0] == 0
    assert seen == {"locked": True}


# -- the profiler's machine lock ------------------------------------------------------------------------------------
def test_profiler_waits_for_another_run_profiling_with_the_same_cache(tmp_path, monkeypatch, caplog):
    from bench import profiler

    monkeypatch.setattr(profiler, "profile_cells", lambda runner: [{"kind": "profile"}])
    runner = types.SimpleNamespace(cfg=types.SimpleNamespace(profile=types.SimpleNamespace(models=[], targets=["t"])),
                                   cache=types.SimpleNamespace(root=tmp_path / "cache"),
                                   store=types.SimpleNamespace(has=lambda cell: False), progress=False)
    (tmp_path / "cache").mkdir()
    fd = os.open(tmp_path / "cache" / "profiler.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run is profiling
    done = threading.Event()
    with caplog.at_level(logging.INFO, logger="bench"):
        thread = threading.Thread(target=lambda: (profiler.run_config(runner), done.set()), daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while "waiting for it" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "profiler: another run is measuring latency with this cache" in caplog.text
            assert len([r for r in caplog.records if "waiting" in r.getMessage()]) == 1
            time.sleep(0.3)
            assert not done.is_set()  # it waits, it does not measure beside the other run
        finally:
            os.close(fd)  # the other run is done
        thread.join(30)
    assert done.is_set()


# -- dirty tree under results/ --------------------------------------------------------------------------------------
def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_git_dirty_lists_modified_tracked_files(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "f.py").write_text("x = 1\n")
    _git(repo, "add", "f.py")
    _git(repo, "commit", "-q", "-m", "c")
    assert provenance.git_dirty(repo) == []
    (repo / "untracked.txt").write_text("new")  # untracked files do not make the tree dirty
    assert provenance.git_dirty(repo) == []
    (repo / "f.py").write_text("x = 2\n")
    assert provenance.git_dirty(repo) == ["f.py"]
    assert provenance.repo_root(repo) == repo.resolve()
    (tmp_path / "plain").mkdir()
    assert provenance.git_dirty(tmp_path / "plain") is None  # not a git checkout


def test_out_under_results_refuses_a_dirty_tree(tmp_path, capsys, monkeypatch, fake_run):
    monkeypatch.setattr(provenance, "repo_root", lambda cwd=None: tmp_path)
    monkeypatch.setattr(provenance, "git_dirty", lambda cwd=None: ["bench/runner.py", "bench/cli.py"])
    rc, err = run_cli(tmp_path, capsys, out="results/quick")
    assert rc == 2
    assert_one_line(err, "--out", "results/quick: is under", "the git tree is dirty (2 tracked file(s) modified: "
                    "bench/runner.py, bench/cli.py)", "--allow-dirty")
    assert fake_run == [] and not (tmp_path / "results").exists()
    rc, err = run_cli(tmp_path, capsys, "--allow-dirty", out="results/quick")
    assert rc == 0 and len(fake_run) == 1
    rc, err = run_cli(tmp_path, capsys, out="runs/quick")  # outside results/: no check
    assert rc == 0 and len(fake_run) == 2
    monkeypatch.setattr(provenance, "git_dirty", lambda cwd=None: [])
    assert run_cli(tmp_path, capsys, out="results/quick")[0] == 0  # a clean tree


# -- plugins that fail to import, or are not installed ---------------------------------------------------------------
@pytest.mark.parametrize("source,error", [
    ("def broken(:\n", "SyntaxError"),
    ("x = undefined_name_xyz\n", "NameError: name 'undefined_name_xyz' is not defined"),
    ("raise RuntimeError('plugin setup failed')\n", "RuntimeError: plugin setup failed"),
    ("import no_such_dependency_xyz\n", "ModuleNotFoundError"),
    ("Thing = 42\n", "TypeError: protector 'broken-demo' must be a subclass of Protector"),
])
def test_plugin_that_fails_to_import_is_one_line(tmp_path, capsys, monkeypatch, no_runner, source, error):
    from protectors import protectors

    module = f"edgepro_broken_plugin_{abs(hash(source))}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(protectors._items, "broken-demo", f"{module}:Thing")
    rc, err = run_cli(tmp_path, capsys, text=TINY + '[[protectors]]\nname = "broken-demo"\n')
    assert rc == 2
    assert_one_line(err, "protectors[1].name: protector 'broken-demo': cannot load", error)


def test_plugin_not_installed_gets_the_configs_install_hint(tmp_path, capsys, no_runner):
    text = TINY + '[[protectors]]\nname = "fancy-lock"\n\n[plugins]\nfancy-lock = "pip install -e examples/fancy"\n'
    rc, err = run_cli(tmp_path, capsys, text=text)
    assert rc == 2
    assert_one_line(err, "protectors[1].name: unknown protector 'fancy-lock'",
                    "; not installed? pip install -e examples/fancy")
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY + "[plugins]\nx = 3\n")
    with pytest.raises(ConfigError, match=r"c.toml: plugins: must map plugin names to how to install them"):
        config.load(str(cfg))


def _in_repo(obj) -> bool:
    module = obj.partition(":")[0] if isinstance(obj, str) else obj.__module__
    return module.split(".")[0] in {"protectors", "attacks", "bench"}


@pytest.mark.parametrize("name", sorted(p.stem for p in config.CONFIG_DIR.glob("*.toml")))
def test_shipped_configs_say_how_to_install_every_plugin_not_in_this_package(name, monkeypatch):
    """Every plugin a shipped config names is built in or has a [plugins] install hint, and the hint reaches the
    error when the plugin is not installed."""
    import tomllib

    from attacks import attacks
    from protectors import protectors

    path = config.CONFIG_DIR / f"{name}.toml"
    raw = tomllib.loads(path.read_text())
    hints = raw.get("plugins", {})
    for section, registry in (("protectors", protectors), ("attacks", attacks)):
        registry.names()  # entry points read
        for entry in raw.get(section, []):
            if entry["name"] in registry._items and not _in_repo(registry._items[entry["name"]]):
                assert entry["name"] in hints, f"{path}: {section} {entry['name']!r} needs a [plugins] hint"
    for plugin, hint in hints.items():
        monkeypatch.delitem(protectors._items, plugin, raising=False)
        monkeypatch.delitem(attacks._items, plugin, raising=False)
        with pytest.raises(ConfigError, match=rf"unknown \w+ '{plugin}'.*; not installed\? {hint}"):
            config.load(name)
