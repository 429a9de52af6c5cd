"""A planted attack (tests/test_isolation.py): it searches the process it runs in for the device key and the test set.

It is given fingerprints, never the secrets: the first bytes of each and the SHA-256 of the whole. It counts the
places in its process's readable, writable memory where a fingerprint's prefix starts bytes whose hash matches, so a
hit is a real copy of the key or of a test image, never the fingerprint itself. It also looks for the harness's
modules and for a key in its environment.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

from attacks import attacks
from attacks.base import Attack, Loot, Outcome, ThiefContext

CHUNK = 64 << 20


def scan_memory(needles: dict[str, tuple[bytes, int, str]]) -> dict[str, int]:
    """Per needle ``(prefix, length, sha256 hex)``: how many places of this process's writable memory (heap,
    stack, anonymous and writable file mappings) hold the ``length`` bytes it fingerprints."""
    hits = dict.fromkeys(needles, 0)
    longest = max(length for _, length, _ in needles.values())
    with open("/proc/self/maps") as f:
        regions = f.read().splitlines()
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        for line in regions:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if not parts[1].startswith("rw"):
                continue  # code and read-only data: no key or tensor is ever written there
            pos = lo
            while pos < hi:
                try:
                    mem.seek(pos)
                    buf = mem.read(min(CHUNK + longest, hi - pos))
                except (OSError, ValueError, OverflowError):
                    break
                for name, (prefix, length, digest) in needles.items():
                    i = buf.find(prefix)
                    while 0 <= i < CHUNK:
                        if hashlib.sha256(buf[i:i + length]).hexdigest() == digest:
                            hits[name] += 1
                        i = buf.find(prefix, i + 1)
                pos += CHUNK
    return hits


def fingerprint(secret: bytes, prefix: int = 8) -> dict[str, object]:
    return {"prefix": secret[:prefix].hex(), "length": len(secret), "digest": hashlib.sha256(secret).hexdigest()}


@dataclass(frozen=True)
class PlantedParams:
    key_prefix: str = ""
    key_length: int = 32
    key_digest: str = ""
    test_prefix: str = ""
    test_length: int = 0
    test_digest: str = ""


@attacks.register()
class PlantedSearch(Attack):
    """Looks for what an attack must not hold; returns the stolen copy untouched."""

    name = "planted-search"
    Params = PlantedParams

    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        p = self.params
        hits = scan_memory({"key": (bytes.fromhex(p.key_prefix), p.key_length, p.key_digest),
                            "test": (bytes.fromhex(p.test_prefix), p.test_length, p.test_digest)})
        extra = {"key_hits": hits["key"], "test_hits": hits["test"], "pid": os.getpid(),
                 "harness_modules": sum(m in sys.modules for m in ("bench.runner", "bench.cache", "bench.executor")),
                 "key_in_env": int(any(k.startswith("EDGEPRO_BENCH_KEY") for k in os.environ))}
        return Outcome(cell, loot.stolen_model().eval(), (0.0, 0), extra=extra)
