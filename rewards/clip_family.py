"""The one code path of every CLIP-style reward: load once, preprocess in torch, embed in batches.

``clip_score``, ``pickscore``, ``aesthetic`` (transformers ``CLIPModel``) and ``hpsv2`` (OpenCLIP, see
``rewards/packaged.py``) all go through :class:`DualEncoder`, which holds two callables (pixels -> image
features, prompts -> text features) and does the batching, the prompt de-duplication and the L2
normalisation. The rewards differ only in the head applied to the normalised embeddings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rewards.common import (
    load_error,
    load_state_file,
    local_files_only,
    looks_like_path,
    option_batch_size,
    option_dtype,
    weights_file,
)
from srrl.errors import LoadError

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_AESTHETIC_MLP = "hf://camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
# OpenAI CLIP normalisation constants, used when the checkpoint has no image processor config.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def features(out: Any) -> torch.Tensor:
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


class DualEncoder:
    """Batched, L2-normalised float32 image and text embeddings of a CLIP-style model.

    ``encode_images`` maps images ``[b, 3, H, W]`` in ``[0, 1]`` (on the model's device) to features
    ``[b, D]``; ``encode_texts`` maps a list of prompts to ``[b, D]`` (None for image-only rewards). Both are
    called with at most ``batch_size`` rows.
    """

    def __init__(
        self,
        encode_images: Callable[[torch.Tensor], torch.Tensor],
        encode_texts: Callable[[list[str]], torch.Tensor] | None,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.encode_images = encode_images
        self.encode_texts = encode_texts
        self.batch_size = batch_size
        self.device = device

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` unit-norm image embeddings, computed ``batch_size`` images at a time."""
        chunks = [
            self.encode_images(images[i : i + self.batch_size].to(self.device))
            for i in range(0, images.shape[0], self.batch_size)
        ]
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """``[B, D]`` unit-norm embeddings of ``prompts``; each distinct prompt is encoded once."""
        if self.encode_texts is None:
            raise RuntimeError("this encoder was loaded without a text tower")
        unique = list(dict.fromkeys(prompts))
        position = {p: i for i, p in enumerate(unique)}
        chunks = [self.encode_texts(unique[i : i + self.batch_size]) for i in range(0, len(unique), self.batch_size)]
        text = F.normalize(torch.cat(chunks).float(), dim=-1)
        return text[torch.tensor([position[p] for p in prompts], device=text.device)]

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` cosine similarity of each image with its own prompt."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)


def load_hf_clip(
    reward: str,
    device: torch.device,
    options: Mapping[str, Any],
    model_field: str,
    default_model: str,
    processor_field: str = "",
    default_processor: str = "",
    with_text: bool = True,
) -> tuple[DualEncoder, nn.Module]:
    """Load a transformers ``CLIPModel`` named by ``options[model_field]`` once and wrap it in a DualEncoder.

    The tokenizer and the image mean/std come from ``options[processor_field]`` when given (PickScore ships
    its model without them), else from the model's own folder; the mean/std fall back to OpenAI CLIP's.
    ``options.dtype``, ``options.batch_size`` and ``options.local_files_only`` apply. Returns the encoder
    and the model (for heads that need e.g. ``logit_scale``). Missing files raise one-line LoadErrors.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model_id = str(options.get(model_field, default_model))
    processor_id = str(options.get(processor_field, default_processor)) if processor_field else model_id
    proc_field = processor_field or model_field
    batch_size = option_batch_size(options, reward)
    dtype = option_dtype(options, reward)
    local_only = local_files_only(options)

    def source(name: str, field: str, default: str) -> str:
        path = os.path.expanduser(name)
        if looks_like_path(name) and not os.path.isdir(path):
            raise load_error(reward, "CLIP model", name, field, FileNotFoundError(f"no such directory: {path}"), default)
        return path

    model_src = source(model_id, model_field, default_model)
    proc_src = source(processor_id, proc_field, default_processor or default_model)
    try:
        model = CLIPModel.from_pretrained(model_src, local_files_only=local_only)
    except (OSError, ValueError) as e:  # OSError/EnvironmentError family; ValueError for bad repo ids
        raise load_error(reward, "CLIP model", model_id, model_field, e, default_model) from e
    tokenizer = None
    if with_text:
        try:
            tokenizer = AutoTokenizer.from_pretrained(proc_src, local_files_only=local_only)
        except (OSError, ValueError) as e:
            raise load_error(reward, "CLIP tokenizer", processor_id, proc_field, e, default_processor or default_model) from e
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    mean, std = CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
    try:
        processor = AutoImageProcessor.from_pretrained(proc_src, local_files_only=local_only)
        mean = tuple(getattr(processor, "image_mean", None) or mean)
        std = tuple(getattr(processor, "image_std", None) or std)
    except (OSError, ValueError, ImportError) as e:  # optional: fall back to CLIP defaults
        logger.warning("no image processor config for '%s' (%s); using CLIP defaults", processor_id, e)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    image_size = int(model.config.vision_config.image_size)
    logger.info("loaded CLIP '%s' for %s (image size %d, %s) on %s", model_id, reward, image_size, dtype, device)

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess_for_clip(images, image_size, mean_t, std_t).to(dtype)
        return features(model.get_image_features(pixel_values=pixels))

    encode_texts = None
    if tokenizer is not None:
        max_len = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))

        def encode_texts(prompts: list[str]) -> torch.Tensor:
            enc = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            return features(model.get_text_features(input_ids=ids, attention_mask=mask))

    return DualEncoder(encode_images, encode_texts, batch_size, device), model


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor head: a linear MLP on unit-norm CLIP ViT-L/14 image embeddings.

    Layers ``embed_dim -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropout 0.2, 0.2, 0.1 after the first three
    (no activations, as published). Submodule indices match the published state dict (``layers.0``,
    ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``).
    """

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[B]`` scores of unit-norm embeddings ``[B, embed_dim]``."""
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_mlp(source: str, device: torch.device, local_only: bool) -> AestheticMLP:
    """The aesthetic MLP with weights from a ``.pth``/``.safetensors`` file or ``hf://owner/repo/file``."""
    path = weights_file(source, "aesthetic", "aesthetic MLP weights", "aesthetic_mlp", local_only)
    state = load_state_file(path)
    state = {k if k.startswith("layers.") else f"layers.{k}": v for k, v in state.items()}
    if "layers.0.weight" not in state:
        raise LoadError(f"aesthetic MLP weights '{source}' have no 'layers.0.weight'; not a LAION predictor file")
    mlp = AestheticMLP(int(state["layers.0.weight"].shape[1]))
    try:
        mlp.load_state_dict(state)
    except RuntimeError as err:
        raise LoadError(
            f"aesthetic MLP weights '{source}' do not fit the published D-1024-128-64-16-1 architecture: "
            f"{str(err).splitlines()[0]}"
        ) from None
    return mlp.to(device).eval().requires_grad_(False)
