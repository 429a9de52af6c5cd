"""The README's plugin section matches the code: its excerpt is the example plugin's, its tables list the contract."""

import inspect
import re
from pathlib import Path

from protectors.core.base import Protector

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_plugin_excerpt_is_the_example_plugin_code():
    excerpt = re.search(r"```python\n# examples/advparams/edgepro_advparams/__init__.py \(excerpt\)\n(.*?)```",
                        README, re.S).group(1)
    source = (ROOT / "examples/advparams/edgepro_advparams/__init__.py").read_text()
    for line in excerpt.splitlines():
        if line.strip():
            assert line in source, line
    toml = re.search(r"```toml\n# examples/advparams/pyproject.toml\n(.*?)```", README, re.S).group(1)
    pyproject = (ROOT / "examples/advparams/pyproject.toml").read_text()
    assert all(line in pyproject for line in toml.splitlines() if line.strip())


def test_readme_lists_every_method_of_the_contract_with_the_right_requirement():
    section = README[README.index("## Writing a protector"):README.index("## Layout")]
    public = {n for n, f in inspect.getmembers(Protector, inspect.isfunction)
              if not n.startswith("_") and n not in ("check_artifact", "check_mode", "open", "new_artifact",
                                                     "public_params", "param_dict", "declaration")}
    for name in public:
        assert f"`{name}(" in section, name
    for name in Protector.__abstractmethods__:
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}("))
        assert "(required)" in row, name
