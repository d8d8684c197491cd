"""A tiny randomly initialised SDXL pipeline, built offline and cached (the ``tiny_xl`` preset's model).

Same shape of conditioning as SDXL base 1.0 at toy size: two CLIP text encoders (the second with a
projection), a UNet with ``addition_embed_type="text_time"`` that takes pooled text embeddings and
``add_time_ids``; the identity VAE of :mod:`testbed.tiny_model` keeps decoding exact and cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from srrl.rundir import atomic_dir
from testbed.identity_vae import build_identity_vae
from testbed.tiny_model import MAX_TOKENS, build_scheduler, build_tokenizer

BUILTIN_PREFIX = "builtin:"
TINY_SDXL = "builtin:tiny-sdxl"
_HIDDEN_1, _HIDDEN_2, _TIME_DIM = 32, 32, 8


def clip_text_config(hidden: int, vocab_size: int) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder config of width ``hidden`` over the tiny word-level vocabulary."""
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip


def build_tiny_sdxl_unet(sample_size: int = 32) -> UNet2DConditionModel:
    """A small SDXL-style UNet: text_time added embeddings, cross-attention on both encoders' states."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_HIDDEN_1 + _HIDDEN_2, attention_head_dim=4,
        addition_embed_type="text_time", addition_time_embed_dim=_TIME_DIM,
        projection_class_embeddings_input_dim=6 * _TIME_DIM + _HIDDEN_2,
        transformer_layers_per_block=1,
    )  # fmt: skip


def build_tiny_sdxl_pipeline(directory: str | Path, seed: int = 0, sample_size: int = 32) -> StableDiffusionXLPipeline:
    """Build a random-weight tiny SDXL pipeline, save it to ``directory`` and return it reloaded from disk."""
    directory = Path(directory)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = build_tokenizer(directory / "tokenizer")
        tokenizer_2 = build_tokenizer(directory / "tokenizer_2")
        pipe = StableDiffusionXLPipeline(
            vae=build_identity_vae(sample_size),
            text_encoder=CLIPTextModel(clip_text_config(_HIDDEN_1, len(tokenizer))),
            text_encoder_2=CLIPTextModelWithProjection(clip_text_config(_HIDDEN_2, len(tokenizer_2))),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=build_tiny_sdxl_unet(sample_size),
            scheduler=build_scheduler(),
            force_zeros_for_empty_prompt=True,
        )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return StableDiffusionXLPipeline.from_pretrained(str(directory))


def cache_dir() -> Path:
    """Where built-in models are cached: ``$SRRL_CACHE``, else ``$XDG_CACHE_HOME/srrl``, else ``~/.cache/srrl``."""
    if os.environ.get("SRRL_CACHE"):
        return Path(os.environ["SRRL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "srrl"


def resolve_builtin(name: str) -> str:
    """A local folder for ``name``: built-in models (``builtin:tiny-sdxl``) are built once and cached."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    from testbed import tiny_flux, tiny_sd3

    builders = {TINY_SDXL: build_tiny_sdxl_pipeline, tiny_sd3.TINY_SD3: tiny_sd3.build_tiny_sd3_pipeline,
                tiny_flux.TINY_FLUX: tiny_flux.build_tiny_flux_pipeline,
                tiny_flux.TINY_FLUX_SCHNELL: tiny_flux.build_tiny_flux_schnell_pipeline}
    if name not in builders:
        raise ValueError(f"pretrained.model={name!r}: unknown built-in model; known: {', '.join(builders)}")
    target = cache_dir() / name.removeprefix(BUILTIN_PREFIX)
    if not (target / "model_index.json").is_file():
        atomic_dir(target, builders[name])
    return str(target)
