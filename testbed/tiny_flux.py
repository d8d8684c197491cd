"""A tiny randomly initialised FLUX.1 pipeline, built offline and cached (the ``tiny_flux`` preset's model).

FLUX.1's conditioning at toy size: a CLIP text encoder (its pooled output is ``pooled_projections``), a T5 encoder
(its states are the joint-attention sequence) with a word-level T5 tokenizer written here (no sentencepiece model
and no download), a ``FluxTransformer2DModel`` with one double and one single block over packed 2x2 patches of
4-channel latents, FLUX.1-dev's dynamically shifted ``FlowMatchEulerDiscreteScheduler`` and, by default, its
guidance embedding. The VAE is the identity VAE of :mod:`testbed.identity_vae` carrying FLUX's ``scaling_factor``
and ``shift_factor``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from testbed.identity_vae import build_identity_vae
from testbed.tiny_model import MAX_TOKENS, TINY_WORDS, build_tokenizer
from testbed.tiny_xl import clip_text_config

TINY_FLUX = "builtin:tiny-flux"
TINY_FLUX_SCHNELL = "builtin:tiny-flux-schnell"
_HIDDEN = 32  # CLIP's and T5's width (FLUX's joint_attention_dim and pooled_projection_dim at toy size)
FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR = 0.3611, 0.1159  # FLUX's VAE latent normalisation
_SPACE = "\u2581"  # sentencepiece's word-start mark


def build_t5_tokenizer(directory: str | Path, words: tuple[str, ...] = TINY_WORDS,
                       max_length: int = MAX_TOKENS) -> T5TokenizerFast:
    """Write a T5 tokenizer over ``words`` to ``directory`` and load it: a unigram model whose pieces are the words
    (each one token, after T5's ``<pad>``, ``</s>``, ``<unk>``), T5's metaspace pre-tokenizer and ``</s>`` appended;
    unknown words map to ``<unk>``; ``model_max_length`` is ``max_length``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (_SPACE, -2.0)] + [(_SPACE + w, -1.0) for w in words]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    metaspace = {"replacement": _SPACE, "prepend_scheme": "always", "split": True}
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Metaspace(**metaspace)])
    tokenizer.decoder = decoders.Metaspace(**metaspace)
    tokenizer.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                             special_tokens=[("</s>", 1)])
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "extra_ids": 0, "model_max_length": max_length}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
    return T5TokenizerFast.from_pretrained(str(directory))


def build_tiny_flux_transformer(guidance_embeds: bool = True) -> FluxTransformer2DModel:
    """One double-stream and one single-stream block, 2 heads of 16 (rotary axes 4 + 4 + 8), over packed patches
    of 4-channel latents (``in_channels`` 16)."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=_HIDDEN, pooled_projection_dim=_HIDDEN,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )  # fmt: skip


def build_tiny_flux_scheduler(dynamic: bool = True) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's schedule (shift 3, dynamic shift 0.5 -> 1.15 over 256 -> 4096 tokens), or schnell's (shift 1)."""
    if not dynamic:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def build_tiny_flux_pipeline(directory: str | Path, seed: int = 0, sample_size: int = 32,
                             schnell: bool = False) -> FluxPipeline:
    """Build a random-weight tiny FLUX.1-dev pipeline (``schnell``: no guidance embedding, schnell's schedule), save
    it to ``directory`` and return it reloaded from disk."""
    directory = Path(directory)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = build_tokenizer(directory / "tokenizer")
        tokenizer_2 = build_t5_tokenizer(directory / "tokenizer_2")
        t5 = T5Config(vocab_size=len(tokenizer_2), d_model=_HIDDEN, d_kv=8, d_ff=2 * _HIDDEN, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
        vae = build_identity_vae(sample_size)
        vae.register_to_config(scaling_factor=FLUX_SCALING_FACTOR, shift_factor=FLUX_SHIFT_FACTOR)
        pipe = FluxPipeline(
            scheduler=build_tiny_flux_scheduler(dynamic=not schnell), vae=vae,
            text_encoder=CLIPTextModel(clip_text_config(_HIDDEN, len(tokenizer))), tokenizer=tokenizer,
            text_encoder_2=T5EncoderModel(t5), tokenizer_2=tokenizer_2,
            transformer=build_tiny_flux_transformer(guidance_embeds=not schnell),
        )  # fmt: skip
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return FluxPipeline.from_pretrained(str(directory))


def build_tiny_flux_schnell_pipeline(directory: str | Path, seed: int = 0) -> FluxPipeline:
    """:func:`build_tiny_flux_pipeline` with FLUX.1-schnell's shape (no guidance input, no dynamic shift)."""
    return build_tiny_flux_pipeline(directory, seed, schnell=True)
