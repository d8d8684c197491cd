"""The shipped testbed model: loads offline as a StableDiffusionPipeline and its samples pass the exact
verifier at the rate its model card documents."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline

from shapes.world import FAMILIES
from testbed.model import ROOT, TESTBED_MODEL
from testbed.report import CARD_SAMPLING, measure_pipeline

pytestmark = pytest.mark.skipif(not (TESTBED_MODEL / "card.json").is_file(), reason="assets/testbed-sd not built")


def test_testbed_model_is_small_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(str(TESTBED_MODEL), local_files_only=True)
    weights = sum(f.stat().st_size for f in TESTBED_MODEL.rglob("*.safetensors"))
    assert weights <= 20 * 2**20
    assert not list(TESTBED_MODEL.rglob("*.bin")) and not list(TESTBED_MODEL.rglob("*.pt"))
    assert pipe.vae_scale_factor == 1 and pipe.unet.config.sample_size == 32
    assert 3.5e6 < sum(p.numel() for p in pipe.unet.parameters()) < 4.5e6


def test_testbed_model_matches_its_card():
    """The stock pipeline on 4 images of each held-out caption (other noise than the card's): pooled and per-family
    strict accuracy within 3 binomial standard errors (plus 0.05 for CPU numerics) of the documented rate."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    card = json.loads((TESTBED_MODEL / "card.json").read_text())
    assert card["sampling"] == CARD_SAMPLING
    pipe = StableDiffusionPipeline.from_pretrained(str(TESTBED_MODEL))
    captions = json.loads((ROOT / "config" / "prompt" / "testbed_test.json").read_text())
    measured = measure_pipeline(pipe, captions, 4, seed=card["seed"] + 1000)
    for family in (*FAMILIES, "all"):
        p, n = card[family]["strict"], measured[family]["n"]
        tol = 3 * math.sqrt(max(p * (1 - p), 0.05) / n) + 0.05
        assert abs(measured[family]["strict"] - p) <= tol, (family, measured[family], card[family])


def test_testbed_model_samples_from_pure_noise_with_the_stock_scheduler():
    """The shipped scheduler: zero terminal SNR (floored), v-prediction, trailing spacing; three latent channels."""
    pipe = StableDiffusionPipeline.from_pretrained(str(TESTBED_MODEL))
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.timestep_spacing == "trailing"
    assert pipe.scheduler.alphas_cumprod[-1].item() < 1e-6
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 3
