"""Reward functions for RL fine-tuning; edit this module to add or swap rewards.

A reward function has the signature ``fn(images, prompts) -> scores`` where ``images`` is a
``FloatTensor[B, 3, H, W]`` with values in ``[0, 1]``, ``prompts`` is a ``list[str]`` of length ``B``
and ``scores`` is a ``float32`` ``FloatTensor[B]`` on the images' device. Rewards run under
``torch.no_grad``. Any model a reward needs is loaded once, when the reward is built, on the given
device, and called ``options.batch_size`` images at a time.

To add a reward, write one decorated factory in this module::

    @register("my_reward")
    def _my_reward(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
        scale = float(options.get("my_scale", 1.0))  # options is the ``config.reward`` section

        def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            return scale * images.mean(dim=(1, 2, 3))

        return fn

and select it with ``build_reward("my_reward", device, config.reward)`` or combine rewards with a
weighted dict spec such as ``{"clip_score": 1.0, "brightness": 0.5}``.

The model code lives beside this module: ``pixel.py`` (model-free rewards), ``clip_family.py`` (every
CLIP-style reward shares its loader and batched embedding path), ``packaged.py`` (rewards of optional
packages: ``pip install ".[image-reward]"``, ``.[vqa-score]``, ``.[hpsv2]``), ``remote.py`` and ``server.py``
(scoring in another process over HTTP).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from rewards import pixel
from rewards.clip_family import (
    DEFAULT_AESTHETIC_CLIP,
    DEFAULT_AESTHETIC_MLP,
    DEFAULT_CLIP_MODEL,
    DEFAULT_PICKSCORE_MODEL,
    features,
    load_aesthetic_mlp,
    load_hf_clip,
    preprocess_for_clip,
)
from rewards.common import RewardFactory, RewardFn, local_files_only
from rewards.packaged import load_hpsv2, load_image_reward, load_vqa_score
from rewards.pixel import PALETTE, jpeg_sizes_kb, nearest_palette_index, prompt_colour
from rewards.remote import load_remote
from shapes.verify import partial_credit, verify
from shapes.world import parse_caption
from srrl.errors import ConfigError

__all__ = [
    "PALETTE",
    "REWARDS",
    "RewardFactory",
    "RewardFn",
    "build_reward",
    "features",
    "jpeg_sizes_kb",
    "known_rewards",
    "nearest_palette_index",
    "preprocess_for_clip",
    "prompt_check",
    "prompt_colour",
    "register",
]

logger = logging.getLogger(__name__)

REWARDS: dict[str, RewardFactory] = {}
#: Per reward that can only read prompts of some grammar: a check raising ValueError for a prompt it cannot read
#: (run over the prompt files before any model loads).
PROMPT_CHECKS: dict[str, Callable[[str], object]] = {}


def register(name: str, check_prompt: Callable[[str], object] | None = None) -> Callable[[RewardFactory], RewardFactory]:
    """Return a decorator that registers a reward factory under ``name`` in :data:`REWARDS` (and ``check_prompt``,
    if given, in :data:`PROMPT_CHECKS`)."""

    def decorator(factory: RewardFactory) -> RewardFactory:
        if name in REWARDS:
            raise ValueError(f"reward '{name}' is already registered")
        REWARDS[name] = factory
        if check_prompt is not None:
            PROMPT_CHECKS[name] = check_prompt
        return factory

    return decorator


def prompt_check(name: str) -> Callable[[str], object] | None:
    """The prompt check of reward ``name`` (raises ValueError for a prompt it cannot read), or None."""
    return PROMPT_CHECKS.get(name) if isinstance(name, str) else None


def known_rewards() -> list[str]:
    """Return the sorted names of all registered rewards."""
    return sorted(REWARDS)


def _check_name(name: str) -> None:
    """Raise a one-line ``ConfigError`` if ``name`` is not a registered reward."""
    if name not in REWARDS:
        raise ConfigError(f"unknown reward '{name}'; known rewards: {', '.join(known_rewards())}")


def takes_metadata(fn: Callable) -> bool:
    """Whether the reward function ``fn`` has a ``metadata`` parameter (it then gets each prompt's metadata)."""
    try:
        return "metadata" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _wrap(name: str, fn: RewardFn, metadata: Mapping[str, dict] | None = None) -> RewardFn:
    """Wrap ``fn`` so it runs without grad and returns float32 ``[B]`` on the images' device. A reward function
    with a ``metadata`` parameter also gets, per image, the metadata of its prompt from the prompt files
    (``metadata``: prompt -> fields; ``{}`` for a prompt without any)."""
    with_metadata = takes_metadata(fn)
    table = dict(metadata or {})

    def wrapped(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"reward '{name}' expects images of shape [B, 3, H, W], got {tuple(images.shape)}"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward '{name}' got {images.shape[0]} images but {len(prompts)} prompts")
        with torch.no_grad():
            if with_metadata:
                scores = fn(images, list(prompts), metadata=[table.get(p, {}) for p in prompts])
            else:
                scores = fn(images, list(prompts))
        scores = torch.as_tensor(scores).to(device=images.device, dtype=torch.float32)
        if scores.shape != (images.shape[0],):
            raise ValueError(
                f"reward '{name}' returned shape {tuple(scores.shape)}, expected ({images.shape[0]},)"
            )
        return scores

    wrapped.__name__ = f"reward_{name}"
    return wrapped


def build_reward(
    spec: str | Mapping[str, float],
    device: torch.device | str,
    options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, dict] | None = None,
) -> RewardFn:
    """Build a reward function from a registered name or a ``{name: weight}`` dict (weighted sum).

    ``metadata`` (prompt -> fields, from prompt files whose entries are objects) reaches every reward function
    that has a ``metadata`` parameter; the others are called with ``(images, prompts)`` as before.

    ``options`` is the ``config.reward`` section passed to every factory. All names are validated
    before any model is loaded; an unknown name raises a one-line ``ValueError``.
    """
    device = torch.device(device)
    opts: Mapping[str, Any] = options if options is not None else {}
    if isinstance(spec, str):
        _check_name(spec)
        logger.info("building reward '%s' on %s", spec, device)
        return _wrap(spec, REWARDS[spec](device, opts), metadata)

    weights = {str(k): float(v) for k, v in spec.items()}
    if not weights:
        raise ConfigError("empty reward spec; give a reward name or a non-empty {name: weight} dict")
    for name in weights:
        _check_name(name)
    parts = [(name, w, _wrap(name, REWARDS[name](device, opts), metadata)) for name, w in weights.items()]
    logger.info("building weighted reward %s on %s", weights, device)

    def weighted(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for _, w, fn in parts:
            total = total + w * fn(images, prompts)
        return total

    return _wrap("+".join(weights), weighted)


# --------------------------------------------------------------------------------------------
# Model-free rewards (rewards/pixel.py)
# --------------------------------------------------------------------------------------------


@register("brightness")
def _brightness(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """Mean pixel value in ``[0, 1]`` (no model; used by the tiny CPU default)."""
    return lambda images, prompts: images.float().clamp(0, 1).mean(dim=(1, 2, 3))


@register("shapes_verify", check_prompt=parse_caption)
def _shapes_verify(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """1.0 if the image satisfies every part of its shapes-world caption, else 0.0 (exact pixel verifier,
    ``shapes.verify``; prompts must follow the shapes-world grammar)."""
    return lambda images, prompts: verify(list(prompts), images.cpu()).to(images.device)


@register("shapes_partial", check_prompt=parse_caption)
def _shapes_partial(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """Share of the caption's parts (colour, shape, count and, for relations, relation; each worth the same)
    that the image satisfies, in ``[0, 1]`` (``shapes.verify.partial_credit``)."""
    return lambda images, prompts: partial_credit(list(prompts), images.cpu()).to(images.device)


@register("jpeg_compressibility")
def _jpeg_compressibility(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """Negative JPEG size in kB at quality ``options.jpeg_quality`` (default 95)."""
    quality = int(options.get("jpeg_quality", 95))
    return lambda images, prompts: -jpeg_sizes_kb(images, quality)


@register("jpeg_incompressibility")
def _jpeg_incompressibility(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """JPEG size in kB at quality ``options.jpeg_quality`` (default 95)."""
    quality = int(options.get("jpeg_quality", 95))
    return lambda images, prompts: jpeg_sizes_kb(images, quality)


@register("colour_match")
def _colour_match(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """Agreement of an image's colour with the first colour word of its prompt, in ``[0, 1]``.

    Every pixel is assigned to its nearest reference colour in RGB among :data:`PALETTE`
    (red, green, blue, yellow, cyan, magenta, white, orange, purple, gray) plus black. Pixels
    nearest to black are background and ignored. The score is the fraction of the remaining
    (non-dark) pixels whose nearest colour is the prompt's colour word (``grey`` = ``gray``).
    So a red shape on black scores 1.0 for "a red circle" and 0.0 for "a blue circle"; a red
    shape on white scores its area fraction. Prompts without a colour word and all-black
    images score 0. Exact, deterministic and pure torch.
    """
    return pixel.colour_match_scores


# --------------------------------------------------------------------------------------------
# CLIP-family rewards (rewards/clip_family.py: one loader, one batched embedding path)
# --------------------------------------------------------------------------------------------


@register("clip_score")
def _clip_score(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """Cosine similarity of CLIP image and prompt embeddings, in ``[-1, 1]`` (the paper's reward).

    Options: ``clip_model`` (hub id or local folder, default LAION ViT-H/14), ``batch_size``, ``dtype``,
    ``local_files_only`` (also implied by ``HF_HUB_OFFLINE=1``). A missing model is a one-line LoadError.
    """
    encoder, _ = load_hf_clip("clip_score", device, options, "clip_model", DEFAULT_CLIP_MODEL)
    return lambda images, prompts: encoder.cosine(images, prompts).clamp(-1, 1)


@register("pickscore")
def _pickscore(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """PickScore: ``logit_scale * cosine`` of the PickScore_v1 CLIP-H model (about 18-23 for SD images).

    Options: ``pickscore_model`` (default ``yuvalkirstain/PickScore_v1``), ``pickscore_processor``
    (tokenizer and image normalisation, default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), ``batch_size``,
    ``dtype``, ``local_files_only``.
    """
    encoder, model = load_hf_clip(
        "pickscore", device, options, "pickscore_model", DEFAULT_PICKSCORE_MODEL,
        "pickscore_processor", DEFAULT_CLIP_MODEL,
    )
    scale = float(model.logit_scale.exp())
    return lambda images, prompts: scale * encoder.cosine(images, prompts)


@register("aesthetic")
def _aesthetic(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """LAION aesthetic predictor: an MLP on unit-norm CLIP ViT-L/14 image embeddings (roughly 1-10).

    Options: ``aesthetic_clip_model`` (default ``openai/clip-vit-large-patch14``), ``aesthetic_mlp`` (a
    ``.pth``/``.safetensors`` file or ``hf://owner/repo/file``), ``batch_size``, ``dtype``. Ignores prompts.
    """
    encoder, _ = load_hf_clip(
        "aesthetic", device, options, "aesthetic_clip_model", DEFAULT_AESTHETIC_CLIP, with_text=False
    )
    source = str(options.get("aesthetic_mlp", DEFAULT_AESTHETIC_MLP))
    mlp = load_aesthetic_mlp(source, device, local_files_only(options))
    return lambda images, prompts: mlp(encoder.image_embeddings(images).to(device))


# --------------------------------------------------------------------------------------------
# Rewards of optional packages (rewards/packaged.py) and the HTTP client (rewards/remote.py)
# --------------------------------------------------------------------------------------------


# Each loader's docstring lists its options; a missing package or missing weights is a one-line LoadError.
register("image_reward")(load_image_reward)  # ImageReward v1.0 human preference (pip install ".[image-reward]")
register("vqa_score")(load_vqa_score)  # VQAScore with CLIP-FlanT5-XL (pip install ".[vqa-score]")
register("hpsv2")(load_hpsv2)  # HPSv2 / v2.1 human preference (pip install .[hpsv2])
register("remote")(load_remote)  # an HTTP reward server (python -m rewards.server) at options.remote_url
