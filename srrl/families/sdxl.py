"""SDXL: ``StableDiffusionXLPipeline``, two text encoders with pooled and size conditioning, a UNet, DDIM."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusionXLPipeline

from srrl.conditioning import Conditioning, EmptyPromptNegative
from srrl.families.base import Family
from srrl.models import DiffusionModel, finish_model, load_pipeline


class SDXLPromptEncoder(EmptyPromptNegative):
    """SDXL: penultimate hidden states of both text encoders concatenated; the second encoder's pooled
    projection and ``add_time_ids`` (original size, crop top-left, target size) as added conditioning.

    The negative is the empty prompt's conditioning, or zeros where ``force_zeros_for_empty_prompt`` says so.
    """

    def __init__(
        self,
        tokenizers: Sequence,
        text_encoders: Sequence,
        resolution: int,
        force_zeros_for_empty_prompt: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.force_zeros = force_zeros_for_empty_prompt
        self.device = device
        self.dtype = dtype
        size = (resolution, resolution)
        self.time_ids = torch.tensor([[*size, 0, 0, *size]], device=device, dtype=dtype)  # [1, 6]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # [B, L, D_i]
            pooled = out[0]  # the last encoder's pooled projection [B, P]
        return Conditioning(
            torch.cat(hidden, dim=-1).to(self.dtype),  # [B, L, D_1 + D_2]
            {"text_embeds": pooled.to(self.dtype), "time_ids": self.time_ids.expand(len(prompts), -1)},
        )

    def empty_negative(self) -> Conditioning:
        """The empty prompt's conditioning, or zeros where ``force_zeros_for_empty_prompt`` says so."""
        empty = self.encode([""])
        if not self.force_zeros:
            return empty
        return Conditioning(torch.zeros_like(empty.encoder_hidden_states),
                            {"text_embeds": torch.zeros_like(empty.added_cond["text_embeds"]),
                             "time_ids": empty.added_cond["time_ids"]})


def load_sdxl_model(config, device: torch.device, weight_dtype: torch.dtype) -> DiffusionModel:
    """SDXL: ``StableDiffusionXLPipeline`` + two text encoders and size conditioning; LoRA on the UNet."""
    pipe = load_pipeline(StableDiffusionXLPipeline, config.pretrained.model, config.pretrained.revision, weight_dtype)
    return sdxl_model_from_pipeline(pipe, config, device, weight_dtype)


def sdxl_model_from_pipeline(pipe, config, device: torch.device, weight_dtype: torch.dtype) -> DiffusionModel:
    """The policy of an in-memory SDXL pipeline (its weights already in ``weight_dtype``)."""
    encoders = [e.to(device).requires_grad_(False) for e in (pipe.text_encoder, pipe.text_encoder_2)]
    prompt_encoder = SDXLPromptEncoder(
        [pipe.tokenizer, pipe.tokenizer_2], encoders, config.sample.resolution,
        bool(pipe.config.get("force_zeros_for_empty_prompt", True)), device, weight_dtype,
    )
    return finish_model(StableDiffusionXLPipeline, pipe, prompt_encoder, config, device, weight_dtype)


FAMILY = Family("sdxl", load_sdxl_model)
