"""Model families, by the name a manifest gives (``family_for``).

Built in: ``convllava``, ``llava-mini`` (one module each here). Another family registers itself with
``register`` (a plugin, a test), or as an entry point of the group ``convllava_edge.families`` whose
object is a Family; its bundles are made by an export family module (export/families.py).
"""

from __future__ import annotations

from ..errors import BundleError
from ..registry import Registry
from .base import Family, VisionEncoder

BUILTIN_MODULES = ("convllava", "llava_mini")
ENTRY_POINT_GROUP = "convllava_edge.families"
_FAMILIES: Registry[Family] = Registry(__name__, BUILTIN_MODULES, ENTRY_POINT_GROUP)


def register(family: Family) -> Family:
    """Make ``family`` known by its name (replacing one of the same name)."""
    if not family.name or not family.graphs:
        raise ValueError(f"{type(family).__name__}: a family needs a name and its graphs")
    return _FAMILIES.register(family)


def unregister(name: str) -> None:
    """Forget the family of this name (a test's, when it is done with it); nothing if none is registered."""
    _FAMILIES.unregister(name)


def known() -> tuple[str, ...]:
    return _FAMILIES.names()


def family_for(name: str, where: str = "manifest.json") -> Family:
    family = _FAMILIES.get(name)
    if family is None:
        raise BundleError(f"{where}: unknown family {name!r} (known: {', '.join(_FAMILIES.names())})")
    return family


__all__ = ["Family", "VisionEncoder", "family_for", "known", "register"]
