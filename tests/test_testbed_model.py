"""The shipped testbed model: loads offline as a StableDiffusionPipeline and its samples pass the exact
verifier at the rate its model card documents."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline

from shapes.world import FAMILIES
from testbed.model import TESTBED_MODEL
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
    """A fixed-seed sample of 24 captions per family: strict accuracy within 3 binomial standard errors
    (plus 0.05 for CPU numerics) of the documented rate, and so are the colour and shape parts."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    card = json.loads((TESTBED_MODEL / "card.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(str(TESTBED_MODEL))
    n = 24
    measured = measure_pipeline(pipe, n, seed=card.get("seed", 1))
    assert CARD_SAMPLING["num_inference_steps"] == 20
    for family in FAMILIES:
        for part in ("strict", "colour", "shape"):
            p = card[family][part]
            tol = 3 * math.sqrt(max(p * (1 - p), 0.05) / n) + 0.05
            assert abs(measured[family][part] - p) <= tol, (family, part, measured[family], card[family])
