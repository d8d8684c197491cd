"""Model-free rewards computed from pixels: JPEG size and colour agreement (exact, deterministic, CPU-cheap)."""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``uint8`` array ``[B, H, W, 3]`` of ``images`` ``[B, 3, H, W]`` in ``[0, 1]`` (rounded, on CPU)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(arr.permute(0, 2, 3, 1).cpu().numpy())


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """RGB PIL images of ``images`` ``[B, 3, H, W]`` in ``[0, 1]``."""
    return [Image.fromarray(img) for img in to_uint8_hwc(images)]


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Return the JPEG-encoded size (kB = 1000 bytes) of each image at the given PIL quality."""
    sizes = []
    for img in to_pil(images):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


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


def colour_match_scores(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Fraction of non-dark pixels whose nearest palette colour is the prompt's first colour word.

    Prompts without a colour word and all-black images score 0 (see ``colour_match`` in rewards.py).
    """
    names = list(PALETTE)
    background = len(names)
    idx = nearest_palette_index(images)  # [B, HW]
    targets = [prompt_colour(p) for p in prompts]
    target_idx = torch.tensor([names.index(t) if t is not None else -1 for t in targets], device=idx.device)
    foreground = (idx != background).sum(1).float()
    hits = (idx == target_idx[:, None]).sum(1).float()
    return torch.where(foreground > 0, hits / foreground.clamp(min=1.0), torch.zeros_like(hits))
