"""What a model family is to the core: a name, a loader of the family's pipeline into a :class:`DiffusionModel`
(frozen parts, LoRA-adapted denoiser, sampler, prompt encoder), and the same from a pipeline already in memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    from_pipeline: Callable[[Any, ml_collections.ConfigDict, torch.device, torch.dtype], DiffusionModel]  # in memory
    pipeline_class: type  # the stock diffusers pipeline whose ``load_lora_weights`` reads the run's LoRA
