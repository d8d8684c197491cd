"""Reward functions for RL fine-tuning; edit this module to add or swap rewards.

A reward function has the signature ``fn(images, prompts) -> scores`` where ``images`` is a
``FloatTensor[B, 3, H, W]`` with values in ``[0, 1]``, ``prompts`` is a ``list[str]`` of length ``B``
and ``scores`` is a ``float32`` ``FloatTensor[B]`` on the images' device. Rewards run under
``torch.no_grad``. Any model a reward needs is loaded once, when the reward is built.

To add a reward, write one decorated factory::

    @register("my_reward")
    def _my_reward(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
        scale = float(options.get("my_scale", 1.0))  # options is the ``config.reward`` section

        def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            return scale * images.mean(dim=(1, 2, 3))

        return fn

and select it with ``build_reward("my_reward", device, config.reward)`` or combine rewards with a
weighted dict spec such as ``{"clip_score": 1.0, "brightness": 0.5}``.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
RewardFactory = Callable[[torch.device, Mapping[str, Any]], RewardFn]

REWARDS: dict[str, RewardFactory] = {}

DEFAULT_CLIP_MODEL = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# OpenAI CLIP normalisation constants, used when the checkpoint has no image processor config.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def register(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Return a decorator that registers a reward factory under ``name`` in :data:`REWARDS`."""

    def decorator(factory: RewardFactory) -> RewardFactory:
        if name in REWARDS:
            raise ValueError(f"reward '{name}' is already registered")
        REWARDS[name] = factory
        return factory

    return decorator


def known_rewards() -> list[str]:
    """Return the sorted names of all registered rewards."""
    return sorted(REWARDS)


def _check_name(name: str) -> None:
    """Raise a one-line ``ValueError`` if ``name`` is not a registered reward."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward '{name}'; known rewards: {', '.join(known_rewards())}")


def _wrap(name: str, fn: RewardFn) -> RewardFn:
    """Wrap ``fn`` so it runs without grad and returns float32 ``[B]`` on the images' device."""

    def wrapped(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"reward '{name}' expects images of shape [B, 3, H, W], got {tuple(images.shape)}"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward '{name}' got {images.shape[0]} images but {len(prompts)} prompts")
        with torch.no_grad():
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
) -> RewardFn:
    """Build a reward function from a registered name or a ``{name: weight}`` dict (weighted sum).

    ``options`` is the ``config.reward`` section passed to every factory. All names are validated
    before any model is loaded; an unknown name raises a one-line ``ValueError``.
    """
    device = torch.device(device)
    opts: Mapping[str, Any] = options if options is not None else {}
    if isinstance(spec, str):
        _check_name(spec)
        logger.info("building reward '%s' on %s", spec, device)
        return _wrap(spec, REWARDS[spec](device, opts))

    weights = {str(k): float(v) for k, v in spec.items()}
    if not weights:
        raise ValueError("empty reward spec; give a reward name or a non-empty {name: weight} dict")
    for name in weights:
        _check_name(name)
    parts = [(name, w, _wrap(name, REWARDS[name](device, opts))) for name, w in weights.items()]
    logger.info("building weighted reward %s on %s", weights, device)

    def weighted(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for _, w, fn in parts:
            total = total + w * fn(images, prompts)
        return total

    return _wrap("+".join(weights), weighted)


# --------------------------------------------------------------------------------------------
# Cheap pixel rewards
# --------------------------------------------------------------------------------------------


@register("brightness")
def _brightness(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """Mean pixel value in ``[0, 1]`` (no model; used by the tiny CPU default)."""

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.float().clamp(0, 1).mean(dim=(1, 2, 3))

    return fn


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Return the JPEG-encoded size (kB = 1000 bytes) of each image at the given PIL quality."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr_np = arr.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for img in arr_np:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register("jpeg_compressibility")
def _jpeg_compressibility(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """Negative JPEG size in kB at quality ``options.jpeg_quality`` (default 95)."""
    quality = int(options.get("jpeg_quality", 95))

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -jpeg_sizes_kb(images, quality)

    return fn


@register("jpeg_incompressibility")
def _jpeg_incompressibility(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """JPEG size in kB at quality ``options.jpeg_quality`` (default 95)."""
    quality = int(options.get("jpeg_quality", 95))

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return jpeg_sizes_kb(images, quality)

    return fn


# Reference RGBs of the colour words ``colour_match`` understands (order breaks distance ties).
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.7, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.55, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "gray": (0.5, 0.5, 0.5),
}
COLOUR_SYNONYMS = {"grey": "gray"}
_BACKGROUND_RGB = (0.0, 0.0, 0.0)  # black: a background sink, not a colour word


def prompt_colour(prompt: str) -> str | None:
    """Return the first palette colour word (whole word, case-insensitive) in ``prompt``, or None."""
    for word in re.findall(r"[a-z]+", prompt.lower()):
        word = COLOUR_SYNONYMS.get(word, word)
        if word in PALETTE:
            return word
    return None


def nearest_palette_index(images: torch.Tensor) -> torch.Tensor:
    """Return ``LongTensor[B, H*W]``: per pixel, the index of the nearest reference colour.

    Indices ``0..len(PALETTE)-1`` follow :data:`PALETTE`; index ``len(PALETTE)`` is black.
    Distance is Euclidean in RGB; ties go to the lower index.
    """
    refs = torch.tensor([*PALETTE.values(), _BACKGROUND_RGB], dtype=torch.float32, device=images.device)
    out = []
    for img in images.float().clamp(0, 1):
        pix = img.reshape(3, -1).T  # [HW, 3]
        d2 = (pix * pix).sum(1, keepdim=True) - 2 * pix @ refs.T + (refs * refs).sum(1)[None, :]
        out.append(d2.argmin(dim=1))
    return torch.stack(out)


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
    names = list(PALETTE)
    background = len(names)

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        idx = nearest_palette_index(images)  # [B, HW]
        targets = [prompt_colour(p) for p in prompts]
        target_idx = torch.tensor(
            [names.index(t) if t is not None else -1 for t in targets], device=idx.device
        )
        foreground = (idx != background).sum(1).float()
        hits = (idx == target_idx[:, None]).sum(1).float()
        return torch.where(foreground > 0, hits / foreground.clamp(min=1.0), torch.zeros_like(hits))

    return fn


# --------------------------------------------------------------------------------------------
# CLIP score (the paper's reward)
# --------------------------------------------------------------------------------------------


def _env_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set now (huggingface_hub reads it only at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    return False


def _looks_like_path(model_id: str) -> bool:
    """Whether ``model_id`` is meant as a local path rather than a hub id ``namespace/name``."""
    return (
        os.path.isabs(model_id)
        or model_id.startswith((".", "~"))
        or model_id.count("/") > 1
        or (os.sep != "/" and os.sep in model_id)
        or os.path.exists(model_id)
    )


def _load_error(model_id: str, cause: BaseException | None) -> RuntimeError:
    """Build the one-line error raised when a CLIP model cannot be loaded."""
    reason = ""
    if cause is not None:
        first = (str(cause).strip().splitlines() or [""])[0][:200]
        reason = f" ({type(cause).__name__}: {first})"
    example = f"`hf download {DEFAULT_CLIP_MODEL} --local-dir {model_id}`"
    if not _looks_like_path(model_id):
        example = f"`hf download {model_id}`"
    return RuntimeError(
        f"could not load CLIP model '{model_id}' for reward 'clip_score'{reason}; provide it by downloading "
        f"it with network access (e.g. {example}) or by setting config.reward.clip_model "
        "to a local directory containing the model"
    )


def _features(out: Any) -> torch.Tensor:
    """Return projected embeddings from ``get_*_features`` (a tensor in transformers 4.x, an output in 5.x)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def preprocess_for_clip(
    images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Resize (bicubic, antialias) the shortest side to ``size``, center-crop ``size``x``size``, normalise.

    ``images`` is ``[B, 3, H, W]`` in ``[0, 1]``; ``mean``/``std`` are ``[3]`` tensors. Runs in float32.
    """
    x = images.float().clamp(0, 1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0, 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    return (x - mean.view(1, 3, 1, 1).to(x)) / std.view(1, 3, 1, 1).to(x)


@register("clip_score")
def _clip_score(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """Cosine similarity between CLIP image and prompt embeddings, in ``[-1, 1]``.

    Options: ``clip_model`` (hub id or local directory, default LAION ViT-H/14), ``batch_size``
    (chunk size, default 16), ``dtype`` (default ``"float32"``), ``local_files_only`` (default False;
    also implied by ``HF_HUB_OFFLINE=1``). Raises a one-line ``RuntimeError`` if the model is missing.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model_id = str(options.get("clip_model", DEFAULT_CLIP_MODEL))
    batch_size = int(options.get("batch_size", 16))
    if batch_size < 1:
        raise ValueError(f"clip_score batch_size must be >= 1, got {batch_size}")
    dtype_name = str(options.get("dtype", "float32")).lower()
    if dtype_name not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype_name}' for clip_score; use one of {', '.join(_DTYPES)}")
    dtype = _DTYPES[dtype_name]
    local_only = bool(options.get("local_files_only", False)) or _env_offline()

    source = os.path.expanduser(model_id)
    if _looks_like_path(model_id) and not os.path.isdir(source):
        raise _load_error(model_id, FileNotFoundError(f"no such directory: {source}"))
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:  # OSError/EnvironmentError family; ValueError for bad repo ids
        raise _load_error(model_id, e) from e
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    mean, std = CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
    try:
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
        mean = tuple(getattr(processor, "image_mean", None) or mean)
        std = tuple(getattr(processor, "image_std", None) or std)
    except (OSError, ValueError, ImportError) as e:  # optional: fall back to CLIP defaults
        logger.warning("no image processor config for '%s' (%s); using CLIP defaults", model_id, e)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    image_size = int(model.config.vision_config.image_size)
    max_len = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
    logger.info(
        "loaded CLIP '%s' (image size %d, max text length %d, %s) on %s",
        model_id,
        image_size,
        max_len,
        dtype,
        device,
    )

    def embed_text(prompts: list[str]) -> torch.Tensor:
        enc = tokenizer(
            prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        )
        feats = _features(
            model.get_text_features(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            )
        )
        return F.normalize(feats.float(), dim=-1)

    def embed_images(images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess_for_clip(images.to(device), image_size, mean_t, std_t).to(dtype)
        return F.normalize(_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(prompts))  # embed each distinct prompt once
        position = {p: i for i, p in enumerate(unique)}
        text = torch.cat([embed_text(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)])
        text = text[torch.tensor([position[p] for p in prompts], device=text.device)]
        img = torch.cat([embed_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        return (img * text).sum(-1).clamp(-1, 1)

    return fn
