"""The attack registry instance (entry-point group ``edgepro_bench.attacks``)."""

from protectors.core.registry import Registry

from .base import Attack

attacks: Registry[type[Attack]] = Registry("attack", "edgepro_bench.attacks", Attack)
