"""Named objects of one kind, loaded once: the model families the runtime knows (families/) and the ones export
knows (export/families.py) share this, so both load their built-in modules and their plugins' entry points the
same way, on first use."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """``package``'s ``modules`` each define ``attr`` (one object, named by its ``name``); entry points of ``group``
    name more. Both are loaded on first use, the built-in ones first; ``register`` adds one (a plugin, a test)."""

    def __init__(self, package: str, modules: tuple[str, ...], group: str, attr: str = "FAMILY"):
        self.package, self.modules, self.group, self.attr = package, modules, group, attr
        self._items: dict[str, T] = {}
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self.modules:
            self.register(getattr(importlib.import_module(f"{self.package}.{module}"), self.attr))
        for point in entry_points(group=self.group):
            self.register(point.load())

    def register(self, item: T) -> T:
        """Make ``item`` known by its name (replacing one of the same name)."""
        self._load()
        self._items[item.name] = item
        return item

    def unregister(self, name: str) -> None:
        """Forget the one of this name (a test's, when it is done with it); nothing if there is none."""
        self._items.pop(name, None)

    def get(self, name: str) -> T | None:
        self._load()
        return self._items.get(name)

    def values(self) -> tuple[T, ...]:
        self._load()
        return tuple(self._items.values())

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._items)


__all__ = ["Registry"]
