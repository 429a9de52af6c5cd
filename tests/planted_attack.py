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


def scan_memory(needles: dict[str, tuple[bytes, int, int, str]]) -> dict[str, int]:
    """Per needle ``(probe, offset, length, sha256 hex)``: how many places of this process's writable memory (heap,
    stack, anonymous and writable file mappings) hold the ``length`` bytes it fingerprints (``probe``: the bytes
    at ``offset`` of them, found first)."""
    hits = dict.fromkeys(needles, 0)
    needles = {k: v for k, v in needles.items() if v[0]}  # no probe given (the contract test's defaults): no search
    if not needles:
        return hits
    longest = max(length for _, _, length, _ in needles.values())
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
                for name, (probe, offset, length, digest) in needles.items():
                    i = buf.find(probe, offset)
                    while 0 <= i < CHUNK + offset:
                        if hashlib.sha256(buf[i - offset:i - offset + length]).hexdigest() == digest:
                            hits[name] += 1
                        i = buf.find(probe, i + 1)
                pos += CHUNK
    return hits


def fingerprint(secret: bytes, probe: int = 8) -> dict[str, object]:
    """A probe of ``probe`` bytes from ``secret``, its offset, and the hash of the whole. The probe is the first
    window of distinct 4-byte words none of which is the most frequent word (an image's background value, which
    every image in memory shares), so that it is rare in memory."""
    words = [secret[i:i + 4] for i in range(0, len(secret) - 3, 4)]
    common = max(set(words), key=words.count) if words else b""
    n = probe // 4
    offset = next((4 * k for k in range(len(words) - n + 1)
                   if len(set(words[k:k + n])) == n and common not in words[k:k + n]), 0)
    return {"probe": secret[offset:offset + probe].hex(), "offset": offset, "length": len(secret),
            "digest": hashlib.sha256(secret).hexdigest()}


@dataclass(frozen=True)
class PlantedParams:
    key_probe: str = ""
    key_offset: int = 0
    key_length: int = 32
    key_digest: str = ""
    test_probe: str = ""
    test_offset: int = 0
    test_length: int = 0
    test_digest: str = ""


@attacks.register()
class PlantedSearch(Attack):
    """Looks for what an attack must not hold; returns the stolen copy untouched."""

    name = "planted-search"
    Params = PlantedParams

    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        p = self.params
        hits = scan_memory({"key": (bytes.fromhex(p.key_probe), p.key_offset, p.key_length, p.key_digest),
                            "test": (bytes.fromhex(p.test_probe), p.test_offset, p.test_length, p.test_digest)})
        extra = {"key_hits": hits["key"], "test_hits": hits["test"], "pid": os.getpid(),
                 "harness_modules": sum(m in sys.modules for m in ("bench.runner", "bench.cache", "bench.executor")),
                 "key_in_env": int(any(k.startswith("EDGEPRO_BENCH_KEY") for k in os.environ))}
        return Outcome(cell, loot.stolen_model().eval(), (0.0, 0), extra=extra)
