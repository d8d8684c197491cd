"""SD v1.x / v2.x: ``StableDiffusionPipeline``, one CLIP text encoder, a UNet, DDIM."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline

from srrl.conditioning import Conditioning, EmptyPromptNegative
from srrl.families.base import Family
from srrl.models import DiffusionModel, finish_model, load_pipeline


class CLIPPromptEncoder(EmptyPromptNegative):
    """SD v1.x/v2.x: the last hidden state of one CLIP text encoder; empty prompt as the negative."""

    def __init__(self, tokenizer, text_encoder, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.dtype = dtype

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        hidden = self.text_encoder(ids)[0]  # [B, L, D]
        return Conditioning(hidden.to(self.dtype))


def load_sd_model(config, device: torch.device, weight_dtype: torch.dtype) -> DiffusionModel:
    """SD v1.x/v2.x: ``StableDiffusionPipeline`` + one CLIP text encoder; LoRA (rank ``config.lora_rank``) on the UNet."""
    pipe = load_pipeline(StableDiffusionPipeline, config.pretrained.model, config.pretrained.revision, weight_dtype,
                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return sd_model_from_pipeline(pipe, config, device, weight_dtype)


def sd_model_from_pipeline(pipe, config, device: torch.device, weight_dtype: torch.dtype) -> DiffusionModel:
    """The policy of an in-memory SD pipeline (its weights already in ``weight_dtype``)."""
    text_encoder = pipe.text_encoder.to(device).requires_grad_(False)
    prompt_encoder = CLIPPromptEncoder(pipe.tokenizer, text_encoder, device, weight_dtype)
    return finish_model(StableDiffusionPipeline, pipe, prompt_encoder, config, device, weight_dtype)


FAMILY = Family("sd", load_sd_model)
