"""The README's plugin example is real code: it must keep working."""

import re
import types
from pathlib import Path

import torch

from bench import models


def test_readme_plugin_example_protects_and_deploys():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n# my_protector.py\n(.*?)```", text, re.S).group(1)
    mod = types.ModuleType("my_protector")
    exec(compile(code, "README.md", "exec"), mod.__dict__)
    factory = models.factory("lenet5", 1, 8, 10, 0)
    model = factory().eval()
    p = mod.SealedDemo()
    art = p.protect(model, None, bytes(32))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(p.deploy(art, bytes(32), factory)(x), model(x))
    assert p.secret_bytes(art) > 40_000 and p.keyspace_bits(art) == 256
