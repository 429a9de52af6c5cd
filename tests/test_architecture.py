"""The layers of the house (DESIGN.md, "Layout"), checked on the source: arrows point one way.

- ``protectors/core/**`` is the foundation: it imports no built-in protector, nor ``attacks`` or ``bench``;
- each built-in protector (``protectors/<name>.py``) imports only ``protectors.core…``, never another built-in;
- ``attacks/**`` imports no built-in protector (``protectors.core…`` and the ``protectors`` package's public names
  only) and nothing from ``bench``;
- ``bench/**`` imports no built-in protector: it reaches them through the registry, as it reaches a plugin;
- ``protectors/**`` never imports ``bench`` or ``attacks``; nor does the example plugin, which is written against
  the public interface only.

Every ``import`` counts, at module level or inside a function (a lazy import is still an arrow), and so does an
``importlib.import_module`` of a literal name. A second check: the harness decides nothing by a plugin's name, so no
plugin label is a string literal in ``bench/*.py`` (docstrings and f-strings aside).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protectors", "attacks", "bench")
#: the built-ins the README lists; any other module or package directly under protectors/ (core aside) is one too
EXPECTED_BUILTINS = {"aes", "edgepro", "he_paillier", "hpnn", "nnsplitter", "none", "shield"}
BUILTINS = {p.stem for p in (ROOT / "protectors").glob("*.py") if p.stem != "__init__"} | {
    p.name for p in (ROOT / "protectors").iterdir() if p.is_dir() and p.name not in ("core", "__pycache__")
    and (p / "__init__.py").exists()}
#: the labels plugins register under (built-ins, peers and the example plugin)
LABELS = {"edgepro", "hpnn", "nnsplitter", "shield", "aes", "he-paillier", "advparams", "none"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] == "examples":  # examples/advparams/edgepro_advparams/x.py -> edgepro_advparams.x
        parts = parts[2:]
    return ".".join(parts)


def sources(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py")
                  if "__pycache__" not in p.parts and ".egg-info" not in str(p))


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, as absolute dotted names, with the line: ``from a import b`` counts as ``a`` and
    as ``a.b`` (``b`` may be a submodule), relative imports are resolved, and so is ``import_module("literal")``."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value.partition(":")[0]))
    return found


def within(module: str, top: str) -> bool:
    return module == top or module.startswith(top + ".")


def builtin_of(module: str) -> str | None:
    """The built-in protector ``module`` is (or is inside), if any."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "protectors" and parts[1] in BUILTINS else None


def violations(tops: tuple[str, ...], rule) -> list[str]:
    out = []
    for path in sources(*tops):
        me = module_name(path)
        for line, target in imports(path):
            why = rule(me, target)
            if why:
                out.append(f"{path.relative_to(ROOT)}:{line}: imports {target} ({why})")
    return sorted(set(out))


def test_the_builtins_are_the_ones_the_readme_lists():
    assert EXPECTED_BUILTINS <= BUILTINS, "a built-in protector moved: update EXPECTED_BUILTINS and the rules"


def test_core_imports_no_builtin_no_attacks_no_bench():
    def rule(me, target):
        if builtin_of(target):
            return "the core must not know any protector"
        if target == "protectors":
            return "the package __init__ imports every built-in"
        if within(target, "attacks") or within(target, "bench"):
            return "the core sits below attacks and bench"
        return None

    assert violations(("protectors/core",), rule) == []


def test_each_builtin_imports_only_the_core():
    def rule(me, target):
        mine = builtin_of(me)
        if not mine or not within(target, "protectors"):
            return None
        if within(target, "protectors.core") or builtin_of(target) == mine:
            return None
        return "a built-in imports only protectors.core, never another built-in or the package"

    assert violations(tuple(f"protectors/{b}.py" if (ROOT / f"protectors/{b}.py").exists() else f"protectors/{b}"
                            for b in sorted(BUILTINS)), rule) == []


def test_attacks_import_no_builtin_protector_and_no_bench():
    def rule(me, target):
        if builtin_of(target):
            return "attacks see protectors through protectors.core and the package's public names"
        if within(target, "bench"):
            return "attacks sit below the harness"
        return None

    assert violations(("attacks",), rule) == []


def test_bench_imports_no_builtin_protector():
    def rule(me, target):
        return "the harness reaches protectors through the registry" if builtin_of(target) else None

    assert violations(("bench",), rule) == []


def test_protectors_and_the_example_plugin_never_import_bench_or_attacks():
    def rule(me, target):
        if within(target, "bench") or within(target, "attacks"):
            return "protectors sit below attacks and the harness"
        if me.startswith("edgepro_advparams") and builtin_of(target):
            return "a plugin is written against the public interface, not a built-in"
        return None

    assert violations(("protectors", "examples/advparams/edgepro_advparams"), rule) == []


def test_the_import_scan_sees_lazy_relative_and_dynamic_imports(tmp_path, monkeypatch):
    """Control: the scan above would catch each kind of arrow (a violation it cannot see would pass silently)."""
    pkg = tmp_path / "protectors" / "core"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text(
        "import importlib\n"
        "from .. import edgepro\n"
        "def lazy():\n"
        "    from bench.runner import Runner\n"
        "    import attacks.prune\n"
        "    return importlib.import_module('protectors.hpnn:HpnnProtector')\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    found = {t for _, t in imports(pkg / "bad.py")}
    assert {"protectors.edgepro", "bench.runner", "attacks.prune", "protectors.hpnn"} <= found
    hits = violations(("protectors/core",), lambda me, t: "x" if builtin_of(t) or within(t, "bench")
                      or within(t, "attacks") else None)
    assert {int(h.split(":")[1]) for h in hits} == {2, 4, 5, 6}


def label_literals(path: Path) -> list[str]:
    """Plugin labels written as string literals in ``path``, outside docstrings and f-strings (display text)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        if isinstance(node, ast.JoinedStr):
            skip |= {id(n) for n in ast.walk(node)}
    lines = path.read_text().splitlines()
    return [f"{path.relative_to(ROOT)}:{n.lineno}: {n.value!r} in `{lines[n.lineno - 1].strip()}`"
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in LABELS and id(n) not in skip]


def test_bench_decides_nothing_by_a_plugin_label():
    found = sorted(hit for path in sources("bench") for hit in label_literals(path))
    assert found == [], "plugin labels as literals in bench:\n" + "\n".join(found)


def test_the_label_scan_finds_a_literal_and_skips_docstrings(tmp_path, monkeypatch):
    f = tmp_path / "bench" / "x.py"
    f.parent.mkdir()
    f.write_text('"""About edgepro: "none" is the baseline."""\n'
                 'def f(p):\n'
                 '    """none"""\n'
                 '    msg = f"{p or \'none\'}"\n'
                 '    return p.name == "edgepro" or p.name in ("aes", "hpnn")\n')
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert [h.split(": ")[1].split(" in ")[0] for h in label_literals(f)] == ["'edgepro'", "'aes'", "'hpnn'"]
