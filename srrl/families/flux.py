"""FLUX.1 (dev, schnell): ``FluxPipeline``, CLIP-L's pooled output + T5's states, a FLUX transformer over packed
2x2 latent patches, rectified flow (:class:`srrl.flow_match.FlowMatchSampler`) with FLUX's schedule.

- Latents: the core samples, stores and decodes unpacked latents [B, C, h, w] as for every family (the flow step
  is elementwise, so packing commutes with it); :class:`FluxDenoiser` packs them into [B, hw/4, 4C] around the
  transformer, with the ``img_ids`` / ``txt_ids`` FluxPipeline builds (no batch dimension, so they are made per
  call from the shapes and never enter the :class:`~srrl.conditioning.Conditioning`).
- Schedule: FluxPipeline's sigmas ``linspace(1, 1/N, N)`` and its dynamic shift ``mu`` from the image's token
  count (``calculate_shift``); the transformer takes ``timestep / 1000``.
- Guidance: FLUX.1-dev is guidance-distilled (``guidance_embeds``): the scale goes in as the ``guidance`` input and
  one pass runs (``DiffusionModel.embedded_guidance``); ``sample.guidance_scale`` is FluxPipeline's
  ``guidance_scale`` (3.5). Without the embedding (schnell) the core's two-pass CFG applies when the scale is not 1
  (FluxPipeline's ``true_cfg_scale``); schnell samples at 1.
- LoRA is saved under the ``transformer`` component, so ``FluxPipeline.load_lora_weights`` reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from srrl.conditioning import Conditioning
from srrl.families.base import Family, PipelinePromptEncoder
from srrl.flow_match import FlowMatchSampler, dynamic_shift
from srrl.models import DiffusionModel, finish_model, load_pipeline


class FluxDenoiser(FluxTransformer2DModel):
    """FLUX's transformer (same config, weights and LoRA keys) that also takes the core's call: latents [B, C, h, w]
    and the timestep as the sampler gives it (``sigma * 1000``). Packed input [B, L, 4C] goes to the stock forward
    unchanged, so the stock pipeline runs with it too."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if hidden_states.ndim != 4:
            return super().forward(hidden_states, *args, **kwargs)
        batch, channels, height, width = hidden_states.shape
        packed = FluxPipeline._pack_latents(hidden_states, batch, channels, height, width)  # [B, hw/4, 4C]
        states = kwargs["encoder_hidden_states"]  # [B, T, D]
        return_dict = kwargs.pop("return_dict", True)
        kwargs.update(
            # FluxPipeline's call: the timestep in the latents' dtype, over 1000 (the model multiplies by 1000 again)
            timestep=kwargs["timestep"].to(hidden_states.dtype) / 1000,
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, packed.device, packed.dtype),
            txt_ids=torch.zeros(states.shape[1], 3, device=states.device, dtype=states.dtype),
        )
        out = super().forward(packed, *args, **kwargs, return_dict=False)[0]
        out = FluxPipeline._unpack_latents(out, height, width, 1)  # [B, C, h, w] (latent sizes: scale factor 1)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class FluxPromptEncoder(PipelinePromptEncoder):
    """Prompts -> FLUX conditioning through the pipeline's ``encode_prompt``: T5's states as the joint-attention
    sequence, CLIP's pooled output as ``pooled_projections``."""

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        embeds, pooled, _ = self.pipe.encode_prompt(list(prompts), None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        # embeds [B, T, D_t5], pooled [B, P]
        return Conditioning(embeds.to(self.dtype), {"pooled_projections": pooled.to(self.dtype)}, nested=False)


def load_flux_model(config, device: torch.device, weight_dtype: torch.dtype) -> DiffusionModel:
    """FLUX.1 (dev or schnell) from ``config.pretrained.model``."""
    pipe = load_pipeline(FluxPipeline, config.pretrained.model, config.pretrained.revision, weight_dtype)
    return flux_model_from_pipeline(pipe, config, device, weight_dtype)


def flux_model_from_pipeline(pipe, config, device: torch.device, weight_dtype: torch.dtype) -> DiffusionModel:
    """The policy of an in-memory FLUX pipeline (its weights already in ``weight_dtype``). Its stock transformer
    becomes a :class:`FluxDenoiser` in place: the subclass adds no state, only the core's call (no copy of the
    weights, which are 12 B parameters for FLUX.1)."""
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.to(device).requires_grad_(False)
    transformer, scheduler = pipe.transformer, pipe.scheduler.config
    if not isinstance(transformer, FluxDenoiser):
        transformer.__class__ = FluxDenoiser
    channels = transformer.config.in_channels // 4  # FluxPipeline's num_channels_latents
    side = 2 * (config.sample.resolution // (pipe.vae_scale_factor * 2))  # FluxPipeline.prepare_latents' height
    mu = dynamic_shift(scheduler, (side // 2) ** 2)  # FluxPipeline's image_seq_len: the packed tokens
    prompt_encoder = FluxPromptEncoder(pipe, device, weight_dtype, config.pretrained.max_sequence_length)
    return finish_model(FluxPipeline, pipe, prompt_encoder, config, device, weight_dtype,
                        sampler=FlowMatchSampler(scheduler, mu=mu, linear_sigmas=True), denoiser=transformer,
                        latent_channels=channels, embedded_guidance=bool(transformer.config.guidance_embeds))


FAMILY = Family("flux", load_flux_model)
