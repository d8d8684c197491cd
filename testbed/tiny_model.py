"""A tiny, fully offline Stable-Diffusion-v1-architecture model and its toy image world.

Everything here is built in code (no model hub access):

* a word-level :class:`~transformers.CLIPTokenizer` over :data:`TINY_WORDS`,
* the identity VAE of :mod:`testbed.identity_vae` (pixels in ``[-1, 1]`` <-> latents ``[R, G, B, 0]``),
* a small SD-v1-like :class:`~diffusers.UNet2DConditionModel` and :class:`~transformers.CLIPTextModel`,
* the SD-v1 :class:`~diffusers.DDIMScheduler`,
* a vectorised procedural renderer of captioned training scenes (one to three coloured shapes on a
  dark or light gray background).

Tests use :func:`build_tiny_pipeline` (random weights); ``scripts/make_tiny_model.py`` pre-trains the
UNet and the text encoder on :func:`sample_scenes` and saves the result to ``assets/tiny-sd``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from testbed.identity_vae import build_identity_vae

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_TOKENS = 16

#: Reference RGB colours (in [0, 1]) of the colour words of the tiny world.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.15), "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10), "cyan": (0.10, 0.85, 0.90), "magenta": (0.90, 0.10, 0.85),
    "white": (0.97, 0.97, 0.97), "orange": (1.00, 0.55, 0.05), "purple": (0.50, 0.15, 0.70),
    "gray": (0.50, 0.50, 0.50),
}  # fmt: skip
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "stripe")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}
PREFIXES: tuple[str, ...] = ("a photo of", "a picture of", "an image of")

#: Every word the tokenizer knows as a single token.
TINY_WORDS: tuple[str, ...] = (
    *COLOURS,
    *SHAPES,
    *PLURALS.values(),
    "a", "an", "the", "on", "of", "and", "with", "in",
    "dark", "light", "bright", "black", "background",
    "big", "small", "one", "two", "three",
    "photo", "picture", "image", "shape", "shapes",
)  # fmt: skip


# ---- Tokenizer ----
def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Segment one word with byte-pair merges (lowest rank first, leftmost on ties)."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [
            (ranks.get((a, b), math.inf), i)
            for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))
        ]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _word_symbols(word: str) -> list[str]:
    """Initial BPE symbols of ``word`` (CLIP style: the last character carries ``</w>``)."""
    return [*word[:-1], word[-1] + "</w>"]


def _build_vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """Build a CLIP-BPE vocabulary and merge list under which every word in ``words`` is one token."""
    ranks: dict[tuple[str, str], int] = {}
    tokens: list[str] = []
    for word in words:
        for _ in range(len(word)):  # each round appends merges; a few rounds always suffice
            segments = _apply_bpe(_word_symbols(word), ranks)
            tokens.extend(s for s in segments if s not in tokens)
            if len(segments) == 1:
                break
            merged = segments[0]
            for nxt in segments[1:]:
                if (merged, nxt) not in ranks:
                    ranks[(merged, nxt)] = len(ranks)
                merged = merged + nxt
                if merged not in tokens:
                    tokens.append(merged)
        if len(_apply_bpe(_word_symbols(word), ranks)) != 1:
            raise RuntimeError(f"could not build single-token merges for {word!r}")
    vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    return vocab, merges


def build_tokenizer(directory: str | Path, words: tuple[str, ...] = TINY_WORDS) -> CLIPTokenizer:
    """Write ``vocab.json``/``merges.txt`` to ``directory`` and load them as a word-level CLIP tokenizer.

    Every word of ``words`` becomes exactly one token (the merge list is generated so that
    CLIP's byte-pair encoder rebuilds each word; a header-only ``merges.txt`` would split words into
    characters). Characters that occur in no known word map to ``<|endoftext|>`` (the unknown token);
    unknown words made of known characters fall back to sub-word pieces. ``model_max_length`` is 16.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _build_vocab_and_merges(words)
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=1), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(
        str(directory),
        model_max_length=MAX_TOKENS,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    ids = tokenizer(list(words), add_special_tokens=False).input_ids
    bad = [w for w, i in zip(words, ids, strict=True) if len(i) != 1]
    if bad:
        raise RuntimeError(f"words not tokenized to a single id: {bad}")
    return tokenizer


# ---- UNet, text encoder, scheduler, pipeline ----
TEXT_HIDDEN = 64


def build_tiny_unet(sample_size: int = 32) -> UNet2DConditionModel:
    """A ~1.1 M parameter SD-v1-like UNet (cross-attention at the two lower resolutions)."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4,  # (diffusers: = number of heads)
    )  # fmt: skip


def build_tiny_text_encoder(vocab_size: int) -> CLIPTextModel:
    """A 2-layer, 64-wide CLIP text transformer with 16 positions."""
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModel(config)


def build_scheduler() -> DDIMScheduler:
    """DDIM with the Stable Diffusion v1 noise schedule."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip


def assemble_pipeline(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, sample_size: int = 32,
    scheduler: DDIMScheduler | None = None,
) -> StableDiffusionPipeline:
    """Wrap the tiny components (plus identity VAE with the UNet's latent channels, and ``scheduler`` or the SD v1
    DDIM of :func:`build_scheduler`) into a StableDiffusionPipeline."""
    return StableDiffusionPipeline(
        vae=build_identity_vae(sample_size, unet.config.in_channels), text_encoder=text_encoder,
        tokenizer=tokenizer, unet=unet, scheduler=scheduler or build_scheduler(), safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def build_tiny_pipeline(
    directory: str | Path, seed: int = 0, sample_size: int = 32
) -> StableDiffusionPipeline:
    """Build a random-weight tiny pipeline, save it to ``directory`` and return it reloaded from disk."""
    directory = Path(directory)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # vocab.json/merges.txt stay next to the tokenizer.json written by save_pretrained
        tokenizer = build_tokenizer(directory / "tokenizer")
        pipe = assemble_pipeline(
            build_tiny_unet(sample_size), build_tiny_text_encoder(len(tokenizer)), tokenizer, sample_size
        )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return StableDiffusionPipeline.from_pretrained(str(directory))


# ---- Procedural scenes ----
def _choice(rng: np.random.Generator, options: tuple[Any, ...], n: int, given: Any = None) -> list[Any]:
    """``n`` random picks from ``options`` (or ``given`` repeated when it is not None)."""
    if given is not None:
        return [given] * n
    return [options[i] for i in rng.integers(0, len(options), size=n)]


def _caption(
    colour: str, shape: str, count: int, size_word: str | None, bg: str | None, prefix: str | None
) -> str:
    """Compose a caption such as 'a big red circle on a dark background'."""
    noun = shape if count == 1 else PLURALS[shape]
    words = [w for w in (size_word, colour, noun) if w]
    if count == 1:
        words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    else:
        words.insert(0, COUNT_WORDS[count])
    text = " ".join(words)
    if bg:
        text += f" on a {bg} background"
    return f"{prefix} {text}" if prefix else text


def sample_scenes(
    n: int, rng: np.random.Generator, size: int = 32, parts: dict[str, Any] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Render ``n`` captioned scenes at once; returns (FloatTensor[n, 3, size, size] in [-1, 1], captions).

    ``parts`` may fix any of ``colour``, ``shape``, ``count`` (1-3), ``background`` ('dark'/'light'),
    ``size`` ('big'/'small'); fixed parts always appear in the caption, random ones may be left out.
    """
    parts = dict(parts or {})
    colours = _choice(rng, COLOURS, n, parts.get("colour"))
    shapes = _choice(rng, SHAPES, n, parts.get("shape"))
    counts = _choice(rng, (1, 1, 1, 1, 1, 2, 3), n, parts.get("count"))
    bgs = _choice(rng, ("dark", "light"), n, parts.get("background"))
    counts_np = np.asarray(counts)
    # radius as a fraction of the image size; "big"/"small" ranges for single shapes
    frac = np.where(counts_np == 1, rng.uniform(0.12, 0.34, n), rng.uniform(0.08, 0.13, n))
    if parts.get("size") == "big":
        frac = rng.uniform(0.27, 0.34, n)
    elif parts.get("size") == "small":
        frac = rng.uniform(0.12, 0.17, n)
    size_words: list[str | None] = []
    keep_bg: list[str | None] = []
    prefixes: list[str | None] = []
    for i in range(n):
        sw = "big" if frac[i] > 0.26 else "small" if frac[i] < 0.18 else None
        sw = sw if counts[i] == 1 and ("size" in parts or rng.random() < 0.6) else None
        size_words.append(sw)
        keep_bg.append(bgs[i] if "background" in parts or rng.random() < 0.8 else None)
        prefixes.append(PREFIXES[rng.integers(len(PREFIXES))] if not parts and rng.random() < 0.15 else None)
    captions = [
        _caption(colours[i], shapes[i], counts[i], size_words[i], keep_bg[i], prefixes[i]) for i in range(n)
    ]

    # ---- geometry (all in pixels), vectorised over the batch and up to 3 instances ----
    rad = frac * size
    quad = np.argsort(rng.random((n, 4)), axis=1)[:, :3]  # distinct quadrants for multi-shape scenes
    half = size / 2.0
    qx, qy = (quad % 2) * half + half / 2, (quad // 2) * half + half / 2
    jitter = rng.uniform(-1, 1, (n, 3, 2)) * np.maximum(half / 2 - rad[:, None], 0)[..., None]
    single = rng.uniform(0, 1, (n, 1, 2)) * (size - 2 * rad)[:, None, None] + rad[:, None, None]
    centres = np.where((counts_np == 1)[:, None, None], single, np.stack([qx, qy], -1) + jitter)
    # stripes: evenly spaced parallel bars
    k = np.arange(3)[None, :]
    offs = (k + 0.5) / counts_np[:, None] * size + rng.uniform(-2, 2, (n, 3))
    horizontal = rng.random(n) < 0.5
    offs[:, 0] = np.where(counts_np == 1, centres[:, 0, np.where(horizontal, 1, 0)].diagonal(), offs[:, 0])

    t = torch.as_tensor
    cx, cy = t(centres[..., 0]).float()[..., None, None], t(centres[..., 1]).float()[..., None, None]
    r = t(rad).float()[:, None, None, None]
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    px, py = coords[None, None, None, :], coords[None, None, :, None]
    dx, dy = px - cx, py - cy
    dist = torch.sqrt(dx**2 + dy**2)
    sdf_circle = dist - r
    sdf_square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    s3 = math.sqrt(3.0) / 2
    sdf_tri = torch.maximum(torch.maximum(dy, s3 * dx - 0.5 * dy), -s3 * dx - 0.5 * dy) - 0.55 * r
    sdf_ring = (dist - r).abs() - torch.clamp(0.18 * r, min=0.8)
    off = t(offs).float()[..., None, None]
    bar = torch.where(t(horizontal)[:, None, None, None], (py - off).abs(), (px - off).abs())
    sdf_stripe = bar - torch.clamp(0.3 * r, min=1.0)
    sdfs = torch.stack([sdf_circle, sdf_square, sdf_tri, sdf_ring, sdf_stripe])  # [5, n, 3, H, W]
    shape_idx = t([SHAPES.index(s) for s in shapes])
    sdf = sdfs[shape_idx, torch.arange(n)]  # [n, 3, H, W]
    cover = torch.clamp(0.5 - sdf, 0.0, 1.0)
    cover = cover * (torch.arange(3)[None, :] < t(counts_np)[:, None]).float()[..., None, None]
    cover = cover.amax(dim=1, keepdim=True)  # [n, 1, H, W]

    rgb = np.asarray([PALETTE[c] for c in colours]) + rng.uniform(-0.06, 0.06, (n, 3))
    gray = np.where(np.asarray(bgs) == "dark", rng.uniform(0.0, 0.3, n), rng.uniform(0.6, 0.95, n))
    fg = t(np.clip(rgb, 0.0, 1.0)).float()[..., None, None]
    bg = t(gray).float()[:, None, None, None]
    img = bg * (1.0 - cover) + fg * cover
    return img * 2.0 - 1.0, captions


def render_scene(
    caption_parts: dict[str, Any] | None, rng: np.random.Generator, size: int = 32
) -> tuple[torch.Tensor, str]:
    """Render one scene; returns (FloatTensor[3, size, size] in [-1, 1], caption). See :func:`sample_scenes`."""
    images, captions = sample_scenes(1, rng, size, caption_parts)
    return images[0], captions[0]


def dominant_colour(images: torch.Tensor, threshold: float = 0.2) -> list[str | None]:
    """Palette word closest to the mean colour of the non-background pixels of each image.

    ``images``: [N, 3, H, W] in [0, 1]. The background colour is the per-channel median over the image
    (after a 3x3 box filter against sampling noise); a pixel is foreground if both it and its smoothed
    value differ from it by more than ``threshold`` in some channel. ``None`` if there is no foreground.
    """
    smooth = torch.nn.functional.avg_pool2d(images.float(), 3, stride=1, padding=1, count_include_pad=False)
    bg = smooth.flatten(2).median(dim=-1).values[..., None, None]  # [N, 3, 1, 1]
    far = (smooth - bg).abs().amax(dim=1, keepdim=True) > threshold
    fg = (far & ((images - bg).abs().amax(dim=1, keepdim=True) > threshold)).float()
    refs = torch.tensor([PALETTE[c] for c in COLOURS])
    out: list[str | None] = []
    for img, mask in zip(images.float(), fg, strict=True):
        mean = (img * mask).sum(dim=(1, 2)) / mask.sum().clamp(min=1)
        out.append(COLOURS[int(((refs - mean) ** 2).sum(-1).argmin())] if mask.sum() >= 1 else None)
    return out
