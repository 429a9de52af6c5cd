"""One place that seeds every random number generator the suite uses, and separate streams per purpose."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and Torch; return a NumPy generator for the caller's own draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def torch_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def stream_seed(seed: int, purpose: str) -> int:
    """A seed for one ``purpose`` (e.g. ``"thief/init"``) derived from ``seed`` with NumPy's ``SeedSequence``, so
    that no two purposes share a random stream, as they would if both were seeded with the same integer."""
    tag = int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:8], "big")
    return int(np.random.SeedSequence([seed, tag]).generate_state(1, dtype=np.uint32)[0])
