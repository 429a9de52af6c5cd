import sys
import textwrap

import pytest

import protectors
from protectors.core.registry import Registry


def test_entry_point_plugin_is_found_and_checked(tmp_path, monkeypatch):
    """A third-party protector installed as a distribution with an entry point shows up by name."""
    (tmp_path / "my_protector.py").write_text(textwrap.dedent("""
        from protectors.none import NoProtection
        class Xor(NoProtection):
            name = "xor-demo"
        class NotAProtector:
            pass
    """))
    dist = tmp_path / "my_protector-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-protector\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[edgepro_bench.protectors]\nxor-demo = my_protector:Xor\nbroken = my_protector:NotAProtector\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("protector", "edgepro_bench.protectors", protectors.Protector)
    assert "xor-demo" in reg.names()
    assert reg.get("xor-demo").__name__ == "Xor"
    # a broken plugin asked for by name: one line naming the entry point and why (the registry's documented error)
    with pytest.raises(protectors.UnknownNameError,
                       match=r"protector 'broken': cannot load 'my_protector:NotAProtector': TypeError: .*must be a "
                             r"subclass of Protector"):
        reg.get("broken")
    sys.modules.pop("my_protector", None)


def test_register_rejects_non_subclass_and_duplicates():
    reg = Registry("protector", None, protectors.Protector)
    with pytest.raises(TypeError):
        reg.add("x", int)
    reg.add("none", protectors.protectors.get("none"))
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("none", protectors.protectors.get("aes"))


def test_editing_a_plugins_code_changes_its_identity(tmp_path, monkeypatch):
    """Cached artifacts and records are keyed by the plugin's identity, so an edit recomputes its cells."""
    import importlib
    import sys

    from protectors.core.identity import plugin_identity

    pkg = tmp_path / "demo_plugin_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("class Demo:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = plugin_identity(importlib.import_module("demo_plugin_pkg").Demo)
    (pkg / "__init__.py").write_text("class Demo:\n    x = 1  # edited\n")
    del sys.modules["demo_plugin_pkg"]
    plugin_identity.cache_clear()
    second = plugin_identity(importlib.import_module("demo_plugin_pkg").Demo)
    assert first["module"] == second["module"] == "demo_plugin_pkg"
    assert first["code"] != second["code"]
    from bench.config import PluginSpec
    from bench.runner import Runner

    key = Runner.plugin_key(PluginSpec("edgepro", {}, "edgepro"))
    assert key["plugin"]["distribution"] == "edgepro-bench" and len(key["plugin"]["code"]) == 16
