"""Training objectives of the update by ``train.objective`` (docs/algorithm.md §3g, §3i). A new objective is one
module defining an :class:`~srrl.objectives.base.Objective` plus one entry in :data:`OBJECTIVES`."""

from __future__ import annotations

from srrl.objectives import awm, nft, ppo
from srrl.objectives.base import LossContext, Objective

#: the objectives by name
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (ppo.OBJECTIVE, awm.OBJECTIVE, nft.OBJECTIVE)}

__all__ = ["OBJECTIVES", "LossContext", "Objective", "get_objective"]


def get_objective(name: str) -> Objective:
    """The objective called ``name`` (one of :data:`OBJECTIVES`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown train.objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
