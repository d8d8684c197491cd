"""Full-size SD v1.4, SDXL base, SD3.5 Medium and FLUX.1-dev architectures with random weights, built offline from
the configs kept in ``bench/configs/<arch>`` (the published model shapes) and cached as diffusers pipeline folders.

They are the ``fullsize:<arch>`` model sources (registered by ``cli.wiring``), so the real entry points run on
them: ``python train.py --config config/stage_process.py:sd14 --config.pretrained.model=fullsize:sd14 ...``
(``bench/fullsize_smoke.py``, ``bench/gpu_check.sh``). Only the tokenizers differ from the real models: word-level
CLIP (padded to 77 tokens) and T5 tokenizers over the tiny model's words, since the real vocabularies cannot be
downloaded here; the text encoders keep their full embedding tables. SD3.5 is built without T5 (the stock
pipeline's documented option; ``pretrained.text_encoder_3=False``); FLUX needs its T5-XXL encoder (4.8 B).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from srrl.rundir import atomic_dir
from testbed.tiny_model import build_tokenizer
from testbed.tiny_xl import cache_dir

PREFIX = "fullsize:"
CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "configs"
ARCHITECTURES = ("sd14", "sdxl", "sd35", "flux")
#: dtype the cached weights are stored in: the large ones in bfloat16 (SDXL's 3.5 B parameters: 7 GB on disk, not 14)
STORE_DTYPE = {"sd14": torch.float32, "sdxl": torch.bfloat16, "sd35": torch.bfloat16, "flux": torch.bfloat16}
CLIP_TOKENS = 77


def kept_config(arch: str, name: str) -> dict:
    """The config ``bench/configs/<arch>/<name>.json`` without diffusers' bookkeeping keys."""
    data = json.loads((CONFIGS / arch / f"{name}.json").read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_") and k != "architectures"}


def _tokenizer(directory: Path):
    tokenizer = build_tokenizer(directory)
    tokenizer.model_max_length = CLIP_TOKENS
    return tokenizer


def _clip(arch: str, name: str):
    """The CLIP text encoder of ``bench/configs/<arch>/<name>.json``, with a projection where its config names one."""
    raw = json.loads((CONFIGS / arch / f"{name}.json").read_text(encoding="utf-8"))
    projection = raw.get("architectures") == ["CLIPTextModelWithProjection"]
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**kept_config(arch, name)))


def build_models(arch: str, t5: bool = False) -> dict:
    """The weighted parts of ``arch`` (random, in the current default dtype and device: ``meta`` counts them without
    memory): denoiser, VAE, text encoders. ``t5=True`` adds SD3.5's optional T5 (``text_encoder_3``)."""
    parts = {"vae": AutoencoderKL(**kept_config(arch, "vae")), "text_encoder": _clip(arch, "text_encoder")}
    if arch in ("sd14", "sdxl"):
        parts["unet"] = UNet2DConditionModel(**kept_config(arch, "unet"))
    if arch in ("sdxl", "sd35"):
        parts["text_encoder_2"] = _clip(arch, "text_encoder_2")
    if arch == "sd35":
        parts["transformer"] = SD3Transformer2DModel(**kept_config(arch, "transformer"))
        if t5:
            parts["text_encoder_3"] = T5EncoderModel(T5Config(**kept_config(arch, "text_encoder_3")))
    if arch == "flux":
        parts["transformer"] = FluxTransformer2DModel(**kept_config(arch, "transformer"))
        parts["text_encoder_2"] = T5EncoderModel(T5Config(**kept_config(arch, "text_encoder_2")))
    return parts


def build_fullsize_pipeline(arch: str, directory: Path, seed: int = 0):
    """The ``arch`` pipeline (one of :data:`ARCHITECTURES`) with random weights, created in :data:`STORE_DTYPE`
    (the large ones never exist in float32 here: peak memory is that of the stored pipeline)."""
    default = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_default_dtype(STORE_DTYPE[arch])
        try:
            parts = build_models(arch)
        finally:
            torch.set_default_dtype(default)
    parts["tokenizer"] = _tokenizer(directory / "tokenizer_src")
    if arch in ("sd14", "sdxl"):
        parts["scheduler"] = DDIMScheduler(**kept_config(arch, "scheduler"))
    else:
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler(**kept_config(arch, "scheduler"))
    if arch in ("sdxl", "sd35"):
        parts["tokenizer_2"] = _tokenizer(directory / "tokenizer_2_src")
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    elif arch == "sd35":
        pipe = StableDiffusion3Pipeline(**parts, text_encoder_3=None, tokenizer_3=None)
    elif arch == "flux":
        from testbed.tiny_flux import build_t5_tokenizer

        pipe = FluxPipeline(**parts, tokenizer_2=build_t5_tokenizer(directory / "tokenizer_2_src", max_length=512))
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

