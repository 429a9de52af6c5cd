"""The protector registry instance (entry-point group ``edgepro_bench.protectors``)."""

from .base import Protector
from .registry import Registry

protectors: Registry[type[Protector]] = Registry("protector", "edgepro_bench.protectors", Protector)
