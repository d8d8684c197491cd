"""A tiny randomly initialised SD3 pipeline, built offline and cached (the ``tiny_sd3`` preset's model).

The conditioning of SD3 / SD3.5 at toy size: two CLIP text encoders with projections (their pooled outputs
joined into ``pooled_projections``, their hidden states into the joint-attention sequence), no T5 (SD3's
pipeline then pads that part of the sequence with zeros), an MMDiT ``SD3Transformer2DModel`` and the rectified-flow
``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3. The VAE is the identity VAE of :mod:`testbed.identity_vae`
carrying SD3's ``scaling_factor`` and ``shift_factor``, so a decode that ignores the shift is visibly wrong.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from testbed.identity_vae import build_identity_vae
from testbed.tiny_model import build_tokenizer
from testbed.tiny_xl import clip_text_config

TINY_SD3 = "builtin:tiny-sd3"
_HIDDEN = 32  # each CLIP encoder's width; the joint sequence is both side by side
SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR = 1.5305, 0.0609  # SD3's VAE latent normalisation


def build_tiny_sd3_transformer(sample_size: int = 32) -> SD3Transformer2DModel:
    """A two-block MMDiT over 4-channel latents, patch size 1, joint attention over both CLIP encoders' states (the
    last block updates no text stream, so one block would have no ``to_add_out``)."""
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=2 * _HIDDEN,
        caption_projection_dim=32, pooled_projection_dim=2 * _HIDDEN, pos_embed_max_size=sample_size,
    )  # fmt: skip


def build_tiny_sd3_pipeline(directory: str | Path, seed: int = 0, sample_size: int = 32,
                            dynamic_shift: bool = False) -> StableDiffusion3Pipeline:
    """Build a random-weight tiny SD3 pipeline, save it to ``directory`` and return it reloaded from disk
    (``dynamic_shift``: a scheduler with ``use_dynamic_shifting``, as some SD3.5 scheduler configs have)."""
    directory = Path(directory)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = build_tokenizer(directory / "tokenizer"), build_tokenizer(directory / "tokenizer_2")
        vae = build_identity_vae(sample_size)
        vae.register_to_config(scaling_factor=SD3_SCALING_FACTOR, shift_factor=SD3_SHIFT_FACTOR)
        pipe = StableDiffusion3Pipeline(
            transformer=build_tiny_sd3_transformer(sample_size),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                      use_dynamic_shifting=dynamic_shift),
            vae=vae,
            text_encoder=CLIPTextModelWithProjection(clip_text_config(_HIDDEN, len(tokenizer))), tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(clip_text_config(_HIDDEN, len(tokenizer_2))), tokenizer_2=tokenizer_2,
            text_encoder_3=None, tokenizer_3=None,
        )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return StableDiffusion3Pipeline.from_pretrained(str(directory), text_encoder_3=None, tokenizer_3=None)
