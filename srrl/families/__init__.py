"""Model families by ``config.family``. A new family is one module defining a
:class:`~srrl.families.base.Family` plus one entry in :data:`FAMILIES`; the core asks :func:`get_family` and never
names a family's classes."""

from __future__ import annotations

from srrl.errors import ConfigError
from srrl.families import flux, sd, sd3, sdxl
from srrl.families.base import Family, ModelLoader

#: the model families by name
FAMILIES: dict[str, Family] = {f.name: f for f in (sd.FAMILY, sdxl.FAMILY, sd3.FAMILY, flux.FAMILY)}

__all__ = ["FAMILIES", "Family", "ModelLoader", "get_family"]


def get_family(name: str) -> Family:
    """The family called ``name``; a ConfigError names the families there are."""
    if name not in FAMILIES:
        raise ConfigError(f"family={name!r} is not a model family; expected one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]
