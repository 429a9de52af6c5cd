"""Key input is strict: a malformed key from any source is an error, never a fallback; weak keys are refused."""

import contextlib
import os
import threading
import time
import warnings

import pytest

from protectors.core.crypto import (
    KEY_ENV,
    KEY_FILE_ENV,
    KEY_FORMAT_ENV,
    KeyFileWarning,
    create_key_file,
    device_key,
    forget_env_key,
    key_id,
    load_key,
)
from protectors.core.errors import KeyMaterialError

GOOD = bytes(range(32))


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch):
    for name in (KEY_ENV, KEY_FILE_ENV, KEY_FORMAT_ENV):
        monkeypatch.delenv(name, raising=False)
    forget_env_key()  # a key an earlier test put in $EDGEPRO_BENCH_KEY is held in memory once read
    yield
    forget_env_key()


def key_file(tmp_path, data: bytes, mode: int = 0o600):
    path = tmp_path / "k.key"
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def test_no_source_gives_none_and_a_good_hex_key_loads(tmp_path, monkeypatch):
    assert load_key() is None
    assert load_key(key_file(tmp_path, GOOD.hex().encode() + b"\n")) == GOOD
    monkeypatch.setenv(KEY_ENV, GOOD.hex().upper())
    assert load_key() == GOOD


@pytest.mark.parametrize("value,match", [
    ("xyz", r"\$EDGEPRO_BENCH_KEY: not a hex key"),
    ("", r"\$EDGEPRO_BENCH_KEY: empty key"),
    ("00112233445566778899aabbccddeeff", r"expected a 256-bit key as 64 hex digits, got 32 \(128 bits\)"),
    ("00" * 32, r"weak key refused \(every byte is 0x00\)"),
    ("ab" * 32, r"weak key refused"),
])
def test_malformed_env_key_is_an_error_not_a_fallback(monkeypatch, value, match):
    monkeypatch.setenv(KEY_ENV, value)
    with pytest.raises(KeyMaterialError, match=match):
        load_key()


def test_key_file_env_missing_or_empty_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(KeyMaterialError, match=r"missing.key: cannot read key file"):
        load_key()
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file(tmp_path, b"")))
    with pytest.raises(KeyMaterialError, match=r"k.key: empty key"):
        load_key()
    monkeypatch.setenv(KEY_FILE_ENV, "")
    with pytest.raises(KeyMaterialError, match=r"EDGEPRO_BENCH_KEY_FILE: set but empty"):
        load_key()


def test_hex_and_raw_are_told_apart_explicitly(tmp_path, monkeypatch):
    raw = key_file(tmp_path, GOOD)  # 32 raw bytes: not taken as a key unless the format says raw
    with pytest.raises(KeyMaterialError, match="not a hex key"):
        load_key(raw)
    assert load_key(raw, "raw") == GOOD
    monkeypatch.setenv(KEY_FORMAT_ENV, "raw")
    assert load_key(raw) == GOOD
    hex32 = key_file(tmp_path, b"0123456789abcdef0123456789abcdef")  # 32 characters, as raw: refused as hex
    with pytest.raises(KeyMaterialError, match="expected a 256-bit key as 64 hex digits, got 32"):
        load_key(hex32, "hex")
    with pytest.raises(KeyMaterialError, match="unknown key format 'base64'"):
        load_key(hex32, "base64")
    with pytest.raises(KeyMaterialError, match="a raw key must be exactly 32 bytes, got 65"):
        load_key(key_file(tmp_path, GOOD.hex().encode() + b"\n"), "raw")


def test_readable_key_file_warns_with_name_and_mode(tmp_path):
    path = key_file(tmp_path, GOOD.hex().encode(), 0o644)
    with pytest.warns(KeyFileWarning, match=r"k.key: key file is readable by group or others \(mode 0644\)"):
        assert load_key(path) == GOOD
    os.chmod(path, 0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_key(path)


def test_created_key_file_is_private_and_strong(tmp_path):
    key = create_key_file(tmp_path / "d" / "device.key")
    assert (tmp_path / "d" / "device.key").stat().st_mode & 0o077 == 0
    assert len(key) == 32 and len(set(key)) > 1
    assert create_key_file(tmp_path / "d" / "device.key") == key  # created once


def test_profiler_child_gets_the_key_through_a_pipe_not_the_environment():
    import inspect

    from bench import profiler

    src = inspect.getsource(profiler.run_target)
    assert "input=runner.key.hex()" in src and "KEY_ENV" not in src
    assert "sys.stdin" in inspect.getsource(profiler.child)


def test_env_key_is_read_once_and_leaves_the_environment(monkeypatch):
    """$EDGEPRO_BENCH_KEY is taken out of os.environ when first read (no child process inherits it), and the
    process keeps the key: a second read gives it again."""
    monkeypatch.setenv(KEY_ENV, GOOD.hex())
    assert load_key() == GOOD
    assert KEY_ENV not in os.environ
    assert load_key() == GOOD
    monkeypatch.setenv(KEY_ENV, bytes(range(1, 33)).hex())  # set again: the new one replaces it
    assert load_key() == bytes(range(1, 33)) and KEY_ENV not in os.environ


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_key_file_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path, kind):
    path = tmp_path / "k.key"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: reading it would block forever
    else:
        path.mkdir()
    what = "a named pipe" if kind == "fifo" else "a directory"
    unblock = threading.Timer(5, _open_writer, [path])  # without the fix, ends the hang so that the test fails
    unblock.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyMaterialError, match=f"k.key: key file must be a regular file, this is {what}"):
            load_key(path)
    finally:
        unblock.cancel()
    assert time.monotonic() - t0 < 4


def _open_writer(path):
    with contextlib.suppress(OSError):  # ENXIO: no reader is waiting (the refusal did not open it blocking)
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_device_key_never_created_where_creation_is_off_and_checked_against_the_expected_id(tmp_path):
    default = tmp_path / "cache" / "device.key"
    with pytest.raises(KeyMaterialError, match=r"no device key found \(the run's key id is abc\); looked in: .*"
                       r"EDGEPRO_BENCH_KEY_FILE unset, no .*device.key; a key is never created here"):
        device_key(default=default, create=False, expect_id="abc")
    assert not default.exists()
    key = device_key(default=default)  # created once where creation is on
    assert default.exists() and device_key(default=default, create=False, expect_id=key_id(key)) == key
    other = key_file(tmp_path, bytes(range(1, 33)).hex().encode())
    with pytest.raises(KeyMaterialError, match=rf"wrong device key: key id {key_id(bytes(range(1, 33)))} from key "
                       rf"file .*k.key, but the run's key id is {key_id(key)}"):
        device_key(other, default=default, create=False, expect_id=key_id(key))
