"""The shared core every protector builds on: the plugin interface, artifacts and keys, lock sites, pruning maps,
ONNX helpers, and the secret kinds (:mod:`protectors.core.kinds`).

Layers (enforced by ``tests/test_architecture.py``): ``protectors.core`` imports nothing of the suite outside itself;
a built-in protector (``protectors/<name>.py``) imports the core only, never another built-in; ``attacks`` import
the core (and its kinds), never a protector module; ``bench`` imports ``attacks`` and the core.
"""
