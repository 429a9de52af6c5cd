"""A small plugin registry: decorators for built-ins, lazy ``module:attr`` entries, and entry points."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from .errors import UnknownNameError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to plugin classes (or factories) of one kind.

    Built-ins register with :meth:`register`; third-party packages add an entry point in ``group`` whose value is
    ``"package.module:Class"``. Entry points are read the first time a name is missed or all names are listed, so
    a broken third-party plugin never stops the built-ins from working; asking for a broken one by name is an
    :class:`UnknownNameError` (one line) whatever its import raised.
    """

    def __init__(self, kind: str, group: str | None = None, base: type | None = None):
        self.kind = kind
        self.group = group
        self.base = base
        self._items: dict[str, T | str] = {}
        self._entry_points_loaded = False

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "name", None) or obj.__name__  # type: ignore[attr-defined]
            self.add(key, obj)
            return obj

        return deco

    def add(self, name: str, obj: T | str) -> None:
        if not isinstance(obj, str):
            self._check(name, obj)
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj

    def _check(self, name: str, obj: object) -> None:
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise TypeError(f"{self.kind} {name!r} must be a subclass of {self.base.__name__}, got {obj!r}")

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or self.group is None:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            self._items.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def loaded(self) -> dict[str, T]:
        """The plugins imported so far (lazy entry points that were never asked for are left out)."""
        return {n: o for n, o in self._items.items() if not isinstance(o, str)}

    def load_all(self) -> dict[str, str]:
        """Import every registered plugin; return the ones that fail, name → one-line reason."""
        failed = {}
        for name in self.names():
            try:
                self.get(name)
            except Exception as exc:  # a broken third-party plugin must not hide the others
                failed[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return failed

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_entry_points()
        if name not in self._items:
            did = did_you_mean(name, self.names(), n=3, cutoff=0.5)
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{did} (registered: {', '.join(self.names()) or 'none'})"
            )
        obj = self._items[name]
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            try:
                loaded = getattr(importlib.import_module(module), attr)
                self._check(name, loaded)
            except Exception as exc:  # any error in a plugin's import (SyntaxError, NameError, ...): one line
                why = str(exc).splitlines()[0] if str(exc).strip() else ""
                raise UnknownNameError(f"{self.kind} {name!r}: cannot load {obj!r}: {type(exc).__name__}"
                                       f"{': ' + why if why else ''}") from exc
            self._items[name] = obj = loaded
        return obj  # type: ignore[return-value]
