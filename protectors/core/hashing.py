"""Stable hashing of configs and bytes (cache keys, record names, integrity checks)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """JSON with sorted keys and no whitespace, so equal configs hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def config_hash(obj: Any, length: int = 16) -> str:
    """Short hex SHA-256 of a JSON-able config."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()[:length]


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()
