"""A plugin's identity covers every in-repo module its code reaches, so results cannot go stale."""

import sys
import textwrap

import pytest

import protectors
from attacks import attacks
from protectors.core import identity


def test_edgepro_identity_covers_the_core_it_imports():
    files = identity.closure([protectors.protectors.get("edgepro").__module__])
    for module in ("protectors.edgepro", "protectors.core.lock", "protectors.core.base",
                   "protectors.core.kinds.neuron_mask", "protectors.core.artifact"):
        assert module in files, module
    # A built-in's closure holds no other built-in.
    assert not {m for m in files if m.startswith("protectors.") and not m.startswith("protectors.core")} \
        - {"protectors.edgepro"}


def test_attack_identity_follows_the_kind_not_the_protector():
    files = identity.closure([attacks.get("guess-random").__module__])
    assert "protectors.core.kinds.neuron_mask" in files
    assert "protectors.edgepro" not in files


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A throwaway plugin package: ``pkgx.plugin`` imports ``pkgx.core.lock`` lazily and a re-exported name."""
    root = tmp_path / "pkgx"
    (root / "core").mkdir(parents=True)
    (root / "__init__.py").write_text("from .core.lock import mask\n")
    (root / "core" / "__init__.py").write_text("")
    (root / "core" / "lock.py").write_text("def mask():\n    return 1\n")
    (root / "unrelated.py").write_text("X = 1\n")
    (root / "plugin.py").write_text(textwrap.dedent("""
        from pkgx import mask


        class Plugin:
            def run(self):
                from . import unrelated  # noqa: F401  (lazy imports count too)
                return mask()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [m for m in sys.modules if m == "pkgx" or m.startswith("pkgx.")]:
        del sys.modules[name]


def test_editing_an_imported_core_module_changes_the_digest(package):
    files = identity.closure(["pkgx.plugin"], extra_roots=(package,))
    # The name imported from the package's __init__ is followed to the module that defines it.
    assert {"pkgx.plugin", "pkgx.core.lock", "pkgx.unrelated"} <= set(files)
    before = identity.digest(files)
    (package / "core" / "lock.py").write_text("def mask():\n    return 2\n")
    assert identity.digest(identity.closure(["pkgx.plugin"], extra_roots=(package,))) != before


def test_a_declared_version_changes_the_identity(package):
    import importlib

    plugin = importlib.import_module("pkgx.plugin").Plugin
    bumped = type("Plugin", (plugin,), {"version": "2", "__module__": "pkgx.plugin"})
    a, b = identity.plugin_identity(plugin), identity.plugin_identity(bumped)
    assert a["code"] != b["code"] and b["declared_version"] == "2"


def test_the_example_plugin_identity_hashes_its_own_package():
    try:
        cls = protectors.protectors.get("advparams")
    except protectors.UnknownNameError:
        pytest.skip("the example plugin is not installed (pip install -e examples/advparams)")
    files = identity.closure([cls.__module__], extra_roots=(identity._module_file(cls.__module__).parent,))
    assert cls.__module__ in files and "protectors.core.base" in files
    assert identity.plugin_identity(cls)["code"] != identity.digest({})
