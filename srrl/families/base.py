"""What a model family is to the core: a name and a loader of the family's pipeline into a :class:`DiffusionModel`
(frozen parts, LoRA-adapted denoiser, sampler, prompt encoder, and the stock pipeline class that reads its LoRA)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_collections
import torch

from srrl.conditioning import EmptyPromptNegative
from srrl.models import DiffusionModel

#: ``(config, device, weight_dtype) -> DiffusionModel``: load ``config.pretrained.model`` as the run's policy
ModelLoader = Callable[[ml_collections.ConfigDict, torch.device, torch.dtype], DiffusionModel]


@dataclass(frozen=True)
class Family:
    """One model family (``config.family``)."""

    name: str
    load: ModelLoader  # from ``config.pretrained.model`` (a folder, a hub id or a registered ``scheme:`` name)


class PipelinePromptEncoder(EmptyPromptNegative):
    """Base of the prompt encoders that call their stock pipeline's own ``encode_prompt`` (SD3, FLUX) with
    ``max_sequence_length`` T5 tokens; the empty prompt is the negative."""

    def __init__(self, pipe, device: torch.device, dtype: torch.dtype, max_sequence_length: int) -> None:
        super().__init__()
        self.pipe, self.device, self.dtype = pipe, device, dtype
        self.max_sequence_length = max_sequence_length
