"""Edge targets the profiler runs on (registry; entry-point group ``edgepro_bench.targets``)."""

from __future__ import annotations

from protectors.registry import Registry

targets: Registry = Registry("target", "edgepro_bench.targets")
