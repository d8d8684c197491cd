"""Rewards that need their own optional package: ImageReward, VQAScore (t2v_metrics) and HPSv2.

Each loader imports its package through :func:`rewards.common.import_extra` (a missing package is one
line that says which extra to install), loads the model once on the given device and returns a batched
``fn(images, prompts) -> FloatTensor[B]``. Weights that cannot be found or downloaded are one line that
says what to download and which ``config.reward`` field to point at it.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from rewards.clip_family import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, DualEncoder, preprocess_for_clip
from rewards.common import (
    RewardFn,
    first_line,
    import_extra,
    load_state_file,
    local_files_only,
    option_batch_size,
    option_dtype,
    weights_file,
)
from rewards.pixel import to_pil
from srrl.errors import ConfigError, LoadError

logger = logging.getLogger(__name__)

IMAGE_REWARD_SIZE = 224  # BLIP ViT-L input size of ImageReward v1.0
IMAGE_REWARD_MAX_TOKENS = 35  # prompt length ImageReward was trained with
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def _weights_error(reward: str, what: str, source: str, field: str, hint: str, cause: BaseException) -> LoadError:
    """One line: ``reward`` could not load ``source``; ``hint`` says what to download."""
    return LoadError(
        f"could not load {what} '{source}' for reward '{reward}'{first_line(cause)}; download it with network "
        f"access ({hint}) and set config.reward.{field}"
    )


def _tensor_centre(images: torch.Tensor, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Images resized, centre-cropped to ``size`` and normalised with OpenAI CLIP's mean/std."""
    mean = torch.tensor(CLIP_IMAGE_MEAN, device=device)
    std = torch.tensor(CLIP_IMAGE_STD, device=device)
    return preprocess_for_clip(images.to(device), size, mean, std).to(dtype)


def load_image_reward(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """ImageReward v1.0 (BLIP ViT-L + MLP, THUDM/ImageReward): a standardised human-preference score.

    ``options.image_reward_model`` is a model name known to the package or a local ``ImageReward.pt``;
    ``options.image_reward_cache`` the folder holding (or receiving) ``ImageReward.pt`` and ``med_config.json``.
    Images are preprocessed in torch exactly as the package does (224 px, bicubic, CLIP mean/std) and each
    image is scored against its own prompt, ``options.batch_size`` at a time.
    """
    package = import_extra("image_reward")
    name = str(options.get("image_reward_model", "ImageReward-v1.0"))
    cache = str(options.get("image_reward_cache", "")) or None
    batch_size = option_batch_size(options, "image_reward")
    dtype = option_dtype(options, "image_reward")
    try:
        model = package.load(name, device=str(device), download_root=cache)
    except Exception as err:  # the package raises RuntimeError, OSError or hub errors
        hint = ("`hf download THUDM/ImageReward ImageReward.pt med_config.json --local-dir DIR` and its BLIP "
                "tokenizer `hf download bert-base-uncased`")
        raise _weights_error("image_reward", "ImageReward weights", name, "image_reward_cache=DIR", hint, err) from None
    model = model.to(device).eval().requires_grad_(False)
    blip = model.blip.to(dtype)
    logger.info("loaded ImageReward '%s' (%s) on %s", name, dtype, device)

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, images.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            pixels = _tensor_centre(images[rows], IMAGE_REWARD_SIZE, device, dtype)
            tokens = blip.tokenizer(prompts[rows], padding="max_length", truncation=True,
                                    max_length=IMAGE_REWARD_MAX_TOKENS, return_tensors="pt")
            image_embeds = blip.visual_encoder(pixels)
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
            hidden = blip.text_encoder(
                tokens["input_ids"].to(device),
                attention_mask=tokens["attention_mask"].to(device),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_mask,
                return_dict=True,
            ).last_hidden_state[:, 0, :]
            raw = model.mlp(hidden.float()).reshape(-1)
            out.append((raw - float(model.mean)) / float(model.std))
        return torch.cat(out)

    return fn


def load_vqa_score(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """VQAScore (t2v_metrics): P("Yes" | image, "Does this figure show '<prompt>'?") of a VQA model.

    ``options.vqa_model`` names the t2v_metrics model (default ``clip-flant5-xl``, the paper's) and
    ``options.vqa_cache_dir`` its download folder ("" = the package default). The package reads images from
    files, so each batch is written as PNGs to a temporary folder.
    """
    package = import_extra("vqa_score")
    name = str(options.get("vqa_model", "clip-flant5-xl"))
    cache = str(options.get("vqa_cache_dir", ""))
    batch_size = option_batch_size(options, "vqa_score")
    kwargs: dict[str, Any] = {"model": name, "device": str(device)}
    if cache:
        kwargs["cache_dir"] = cache
    try:
        scorer = package.VQAScore(**kwargs)
    except Exception as err:  # hub, OSError and assertion errors from the package
        hint = f"run once online so t2v_metrics downloads '{name}', or copy its files into DIR"
        raise _weights_error("vqa_score", "VQAScore model", name, "vqa_cache_dir=DIR", hint, err) from None
    logger.info("loaded VQAScore '%s' on %s", name, device)

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with tempfile.TemporaryDirectory(prefix="vqa_score_") as tmp:
            dataset = []
            for i, (image, prompt) in enumerate(zip(to_pil(images), prompts, strict=True)):
                path = os.path.join(tmp, f"{i}.png")
                image.save(path)
                dataset.append({"images": [path], "texts": [prompt]})
            scores = scorer.batch_forward(dataset=dataset, batch_size=batch_size)
        return torch.as_tensor(scores).reshape(len(prompts)).float().cpu()

    return fn


def _load_hps_state(path: str) -> dict[str, torch.Tensor]:
    """The HPSv2 state dict; the published checkpoints are plain torch pickles (loaded from the official hub repo)."""
    try:
        return load_state_file(path)
    except pickle.UnpicklingError:
        logger.warning("HPSv2 checkpoint %s is not a tensors-only file; loading it as a full pickle", path)
        state = torch.load(path, map_location="cpu", weights_only=False)
        return state["state_dict"] if "state_dict" in state else state


def load_hpsv2(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """HPSv2 (OpenCLIP ViT-H/14 fine-tuned on human preferences): cosine of image and prompt embeddings.

    ``options.hpsv2_version`` picks ``v2.0`` or ``v2.1`` (default); ``options.hpsv2_checkpoint`` is a local
    checkpoint file or ``hf://owner/repo/file`` ("" = ``hf://xswu/HPSv2/<the version's file>``). Scored
    through the same :class:`DualEncoder` path as the other CLIP-style rewards. Preprocessing is HPSv2's for
    square images (224 px bicubic, OpenAI mean/std); non-square images are centre-cropped, not padded.
    """
    open_clip = import_extra("hpsv2", "hpsv2.src.open_clip")
    version = str(options.get("hpsv2_version", "v2.1"))
    if version not in HPS_FILES:
        raise ConfigError(f"config.reward.hpsv2_version={version!r}; expected one of {', '.join(HPS_FILES)}")
    source = str(options.get("hpsv2_checkpoint", "")) or f"hf://xswu/HPSv2/{HPS_FILES[version]}"
    batch_size = option_batch_size(options, "hpsv2")
    dtype = option_dtype(options, "hpsv2")
    path = weights_file(source, "hpsv2", "HPSv2 checkpoint", "hpsv2_checkpoint", local_files_only(options))
    model = open_clip.create_model_and_transforms("ViT-H-14", None, precision="fp32", device="cpu")[0]
    model.load_state_dict(_load_hps_state(path))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    size = getattr(model.visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    logger.info("loaded HPSv2 %s from %s (%s) on %s", version, source, dtype, device)

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(_tensor_centre(images, size, device, dtype))

    def encode_texts(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(prompts).to(device))

    encoder = DualEncoder(encode_images, encode_texts, batch_size, device)
    return encoder.cosine
