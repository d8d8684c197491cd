"""What a model family is to the core: a name and a loader of the family's pipeline into a :class:`DiffusionModel`
(frozen parts, LoRA-adapted denoiser, sampler, prompt encoder, and the stock pipeline class that reads its LoRA)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_collections
import torch

from srrl.models import DiffusionModel

#: ``(config, device, weight_dtype) -> DiffusionModel``: load ``config.pretrained.model`` as the run's policy
ModelLoader = Callable[[ml_collections.ConfigDict, torch.device, torch.dtype], DiffusionModel]


@dataclass(frozen=True)
class Family:
    """One model family (``config.family``)."""

    name: str
    load: ModelLoader  # from ``config.pretrained.model`` (a folder, a hub id or a registered ``scheme:`` name)
