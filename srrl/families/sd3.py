"""SD3 / SD3.5: ``StableDiffusion3Pipeline``, CLIP-L + CLIP-G (+ T5 where kept), an MMDiT transformer, rectified
flow (:class:`srrl.flow_match.FlowMatchSampler`), two-pass classifier-free guidance.

The prompt encoding is the pipeline's own ``encode_prompt``: both CLIP encoders' penultimate states side by side,
padded to the T5 width and followed by the T5 states (zeros without T5), and both pooled projections joined as
``pooled_projections``. The negative is the empty prompt's encoding, as the stock pipeline's. The transformer takes
``pooled_projections`` as a top-level keyword, so the conditioning is flat (``Conditioning.nested = False``).
``pretrained.text_encoder_3 = False`` leaves T5 out (the stock pipeline's documented memory saving).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusion3Pipeline

from srrl.conditioning import Conditioning
from srrl.families.base import Family, PipelinePromptEncoder
from srrl.flow_match import FlowMatchSampler, dynamic_shift
from srrl.models import DiffusionModel, finish_model, load_pipeline


class SD3PromptEncoder(PipelinePromptEncoder):
    """Prompts -> SD3 conditioning through the pipeline's ``encode_prompt`` (no CFG inside; the core batches it)."""

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts), None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        # embeds [B, 77 + T, D_joint], pooled [B, P]
        return Conditioning(embeds.to(self.dtype), {"pooled_projections": pooled.to(self.dtype)}, nested=False)


def load_sd3_model(config, device: torch.device, weight_dtype: torch.dtype) -> DiffusionModel:
    """SD3 / SD3.5 from ``config.pretrained.model``; T5 only if ``config.pretrained.text_encoder_3``."""
    drop_t5 = {} if config.pretrained.text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = load_pipeline(StableDiffusion3Pipeline, config.pretrained.model, config.pretrained.revision, weight_dtype,
                         **drop_t5)
    return sd3_model_from_pipeline(pipe, config, device, weight_dtype)


def sd3_model_from_pipeline(pipe, config, device: torch.device, weight_dtype: torch.dtype) -> DiffusionModel:
    """The policy of an in-memory SD3 pipeline (its weights already in ``weight_dtype``)."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.to(device).requires_grad_(False)
    prompt_encoder = SD3PromptEncoder(pipe, device, weight_dtype, config.pretrained.max_sequence_length)
    tokens = (config.sample.resolution // pipe.vae_scale_factor // pipe.transformer.config.patch_size) ** 2
    sampler = FlowMatchSampler(pipe.scheduler.config, mu=dynamic_shift(pipe.scheduler.config, tokens))
    return finish_model(StableDiffusion3Pipeline, pipe, prompt_encoder, config, device, weight_dtype,
                        sampler=sampler, denoiser=pipe.transformer)


FAMILY = Family("sd3", load_sd3_model)
