"""Tests of the embedded tiny Stable-Diffusion model builders and the procedural scene renderer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

from testbed.identity_vae import build_identity_vae
from testbed.tiny_model import (
    COLOURS,
    SHAPES,
    TINY_WORDS,
    build_scheduler,
    build_tiny_pipeline,
    build_tiny_text_encoder,
    build_tiny_unet,
    build_tokenizer,
    dominant_colour,
    render_scene,
    sample_scenes,
)

ASSET = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A freshly built tiny tokenizer."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_tokenizer_one_id_per_word(tokenizer) -> None:
    ids = tokenizer("a red circle").input_ids
    assert len(ids) == 5
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "red</w>", "circle</w>"]
    for word in TINY_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert tokenizer.model_max_length == 16
    # characters outside the tiny world map to the unknown token (<|endoftext|>)
    assert tokenizer("zzz", add_special_tokens=False).input_ids == [tokenizer.unk_token_id] * 3
    assert tokenizer.unk_token_id == tokenizer.eos_token_id
    padded = tokenizer("an orange ring", padding="max_length", max_length=16, truncation=True).input_ids
    assert len(padded) == 16


@pytest.mark.parametrize("size", [32, 64])
def test_identity_vae_round_trip(size: int) -> None:
    vae = build_identity_vae()
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 1
    assert vae.config.scaling_factor == 1.0 and not vae.config.force_upcast
    gen = torch.Generator().manual_seed(0)
    latents = torch.rand(3, 4, size, size, generator=gen) * 2 - 1
    images = torch.rand(3, 3, size, size, generator=gen) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(latents).sample
        dist = vae.encode(images).latent_dist
    assert decoded.shape == (3, 3, size, size)
    assert (decoded - latents[:, :3]).abs().max() < 1e-3
    assert (dist.mean[:, :3] - images).abs().max() < 1e-3
    assert dist.mean[:, 3].abs().max() < 1e-3
    assert dist.std.max() < 1e-6


def test_identity_vae_extreme_values() -> None:
    vae = build_identity_vae()
    z = torch.zeros(1, 4, 32, 32)
    z[:, :3, :16] = 1.0
    z[:, :3, 16:] = -1.0
    with torch.no_grad():
        assert (vae.decode(z).sample - z[:, :3]).abs().max() < 1e-3


def test_unet_and_text_encoder_shapes(tokenizer) -> None:
    unet = build_tiny_unet()
    text_encoder = build_tiny_text_encoder(len(tokenizer))
    n_params = sum(p.numel() for p in unet.parameters())
    assert 0.5e6 < n_params < 4e6
    names = {name for name, _ in unet.named_modules()}
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(name.endswith(f"attn2.{proj}") for name in names), proj
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    ids = tokenizer(["a red circle", ""], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        out = unet(torch.randn(2, 4, 32, 32), torch.tensor([10, 900]), hidden).sample
    assert hidden.shape == (2, 16, text_encoder.config.hidden_size)
    assert out.shape == (2, 4, 32, 32)


def test_scheduler_is_sd_v1_ddim() -> None:
    sched = build_scheduler()
    assert isinstance(sched, DDIMScheduler)
    cfg = sched.config
    assert cfg.num_train_timesteps == 1000 and cfg.beta_schedule == "scaled_linear"
    assert (cfg.beta_start, cfg.beta_end) == (0.00085, 0.012)
    assert not cfg.set_alpha_to_one and cfg.steps_offset == 1 and not cfg.clip_sample
    assert cfg.prediction_type == "epsilon"


def test_build_tiny_pipeline_reloads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = build_tiny_pipeline(tmp_path / "pipe", seed=0)
    assert (tmp_path / "pipe" / "model_index.json").exists()
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae_scale_factor == 1
    assert pipe.safety_checker is None
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    for a, b in zip(pipe.unet.parameters(), again.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert again.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids
    again.set_progress_bar_config(disable=True)
    images = again(
        ["a red circle", "a blue square on a light background"],
        num_inference_steps=2,
        guidance_scale=5.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()


def test_build_tiny_pipeline_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_pipeline(tmp_path / "a", seed=3)
    b = build_tiny_pipeline(tmp_path / "b", seed=3)
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_sample_scenes_batch() -> None:
    images, captions = sample_scenes(64, np.random.default_rng(0), 32)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert len(captions) == 64
    for caption in captions:
        words = caption.split()
        assert set(words) <= set(TINY_WORDS), caption
        assert any(c in words for c in COLOURS), caption
    again, captions2 = sample_scenes(64, np.random.default_rng(0), 32)
    assert torch.equal(images, again) and captions == captions2
    brightness = ((images + 1) / 2).mean(dim=(1, 2, 3))
    assert 0.25 < brightness.mean() < 0.65 and brightness.std() > 0.15


@pytest.mark.parametrize("colour", COLOURS)
def test_rendered_colour_is_recognised(colour: str) -> None:
    images, captions = sample_scenes(20, np.random.default_rng(1), 32, {"colour": colour})
    assert all(colour in c.split() for c in captions)
    hits = [pred == colour for pred in dominant_colour((images + 1) / 2) if pred is not None]
    assert len(hits) >= 12 and np.mean(hits) >= 0.85


def test_render_scene_parts() -> None:
    parts = {"colour": "orange", "shape": "triangle", "count": 1, "background": "dark", "size": "big"}
    image, caption = render_scene(parts, np.random.default_rng(0), size=48)
    assert image.shape == (3, 48, 48)
    assert caption == "a big orange triangle on a dark background"
    image, caption = render_scene({"shape": "ring", "count": 2}, np.random.default_rng(0))
    assert caption.split()[0] == "two" and "rings" in caption.split()
    assert set(SHAPES) == {"circle", "square", "triangle", "ring", "stripe"}


@pytest.mark.skipif(not (ASSET / "model_index.json").exists(), reason="assets/tiny-sd not built")
def test_pretrained_asset_loads() -> None:
    pipe = StableDiffusionPipeline.from_pretrained(str(ASSET), local_files_only=True)
    assert pipe.vae_scale_factor == 1 and pipe.unet.config.sample_size == 32
    size_mb = sum(f.stat().st_size for f in ASSET.rglob("*") if f.is_file()) / 2**20
    assert size_mb < 20
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a red circle on a dark background"] * 2,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
