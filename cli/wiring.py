"""The one place where the core gets its hand-ins: model families by name, model sources (``builtin:`` and
``fullsize:`` names of the testbed's built-in models) and the held-out verifier (the shapes world's). Importing this module registers
the model sources; :func:`trainer_for` builds a trainer with everything handed in."""

from __future__ import annotations

import ml_collections

from srrl.families import FAMILIES as FAMILY_REGISTRY
from srrl.families import ModelLoader, get_family
from srrl.models import register_model_source
from srrl.runconfig import upgrade_config
from srrl.trainer import SRRLTrainer
from testbed.fullsize import PREFIX as FULLSIZE_PREFIX
from testbed.fullsize import resolve_fullsize
from testbed.tiny_xl import BUILTIN_PREFIX, resolve_builtin
from testbed.verifier import ShapesVerifier

#: Model families by ``config.family``: each a loader of the family's pipeline into a DiffusionModel.
FAMILIES: dict[str, ModelLoader] = {name: family.load for name, family in FAMILY_REGISTRY.items()}
#: The held-out verifier that ``eval.verifier`` uses.
VERIFIER = ShapesVerifier()

register_model_source(BUILTIN_PREFIX.rstrip(":"), resolve_builtin)  # builtin:tiny-sdxl
register_model_source(FULLSIZE_PREFIX.rstrip(":"), resolve_fullsize)  # fullsize:sd14, fullsize:sdxl (random weights)


def family_loader(config: ml_collections.ConfigDict) -> ModelLoader:
    """The loader of ``config.family``; a ConfigError names the families there are."""
    return get_family(config.family).load


def trainer_for(config: ml_collections.ConfigDict) -> SRRLTrainer:
    """An :class:`SRRLTrainer` of ``config`` (upgraded: :func:`srrl.runconfig.upgrade_config`) with the family loader
    and the verifier handed in."""
    upgrade_config(config)
    return SRRLTrainer(config, family_loader(config), VERIFIER)
