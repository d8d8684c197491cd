"""Full-size SD v1.4 and SDXL base architectures with random weights, built offline from the configs kept in
``bench/configs/{sd14,sdxl}`` (the published model shapes) and cached as diffusers pipeline folders.

They are the ``fullsize:sd14`` and ``fullsize:sdxl`` model sources (registered by ``cli.wiring``), so the real
entry points run on them: ``python train.py --config config/stage_process.py:sd14
--config.pretrained.model=fullsize:sd14 ...`` (``bench/fullsize_smoke.py``, ``bench/gpu_check.sh``). Only the
tokenizers differ from the real models: a word-level CLIP tokenizer over the tiny model's words, padded to 77
tokens, since CLIP's BPE vocabulary cannot be downloaded here; the text encoders keep CLIP's 49408-row embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from srrl.rundir import atomic_dir
from testbed.tiny_model import build_tokenizer
from testbed.tiny_xl import cache_dir

PREFIX = "fullsize:"
CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "configs"
ARCHITECTURES = ("sd14", "sdxl")
#: dtype the cached weights are stored in: SDXL's 3.5 B parameters in bfloat16 (7 GB on disk instead of 14)
STORE_DTYPE = {"sd14": torch.float32, "sdxl": torch.bfloat16}
CLIP_TOKENS = 77


def kept_config(arch: str, name: str) -> dict:
    """The config ``bench/configs/<arch>/<name>.json`` without diffusers' bookkeeping keys."""
    data = json.loads((CONFIGS / arch / f"{name}.json").read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_") and k != "architectures"}


def _tokenizer(directory: Path):
    tokenizer = build_tokenizer(directory)
    tokenizer.model_max_length = CLIP_TOKENS
    return tokenizer


def build_fullsize_pipeline(arch: str, directory: Path, seed: int = 0):
    """The ``arch`` pipeline (one of :data:`ARCHITECTURES`) with random weights, created in :data:`STORE_DTYPE`
    (SDXL's 3.5 B parameters never exist in float32 here: peak memory is that of the stored pipeline)."""
    default = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_default_dtype(STORE_DTYPE[arch])
        try:
            parts = {
                "vae": AutoencoderKL(**kept_config(arch, "vae")),
                "unet": UNet2DConditionModel(**kept_config(arch, "unet")),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**kept_config(arch, "text_encoder"))),
            }
            if arch == "sdxl":
                parts["text_encoder_2"] = CLIPTextModelWithProjection(
                    CLIPTextConfig(**kept_config(arch, "text_encoder_2")))
        finally:
            torch.set_default_dtype(default)
    parts.update(scheduler=DDIMScheduler(**kept_config(arch, "scheduler")), tokenizer=_tokenizer(directory / "tokenizer_src"))
    if arch == "sdxl":
        parts["tokenizer_2"] = _tokenizer(directory / "tokenizer_2_src")
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return pipe.to(dtype=STORE_DTYPE[arch])


def resolve_fullsize(name: str) -> str:
    """A local pipeline folder for ``fullsize:<arch>``, built once into the cache (``$SRRL_CACHE``, else
    ``~/.cache/srrl``); ValueError for an unknown architecture."""
    arch = name.removeprefix(PREFIX)
    if arch not in ARCHITECTURES:
        raise ValueError(f"pretrained.model={name!r}: unknown full-size architecture; known: "
                         f"{', '.join(PREFIX + a for a in ARCHITECTURES)}")
    target = cache_dir() / f"fullsize-{arch}"
    if not (target / "model_index.json").is_file():
        def fill(tmp: Path) -> None:
            build_fullsize_pipeline(arch, tmp).save_pretrained(str(tmp), safe_serialization=True)
            for src in tmp.glob("tokenizer*_src"):
                for f in src.iterdir():
                    f.unlink()
                src.rmdir()

        atomic_dir(target, fill)
    return str(target)

