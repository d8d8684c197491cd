"""The SD3 family (srrl.families.sd3) on a tiny random SD3 pipeline: the core's sampler and decode against the stock
StableDiffusion3Pipeline, each algorithm preset and both objectives through the trainer, the LoRA in the stock
pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from config.stage_process import get_config
from srrl.families import get_family
from srrl.sampling import GuidedDenoiser, denoise
from srrl.trainer import train
from tests.conftest import fast_config

CPU = torch.device("cpu")
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from testbed.tiny_sd3 import build_tiny_sd3_pipeline

    directory = tmp_path_factory.mktemp("tiny_sd3")
    build_tiny_sd3_pipeline(directory)
    return directory


def sd3_config(pipe_dir, tmp_path, **overrides):
    """``tiny_sd3``'s fields on the fast test config: 32 px, 4 steps, 2 x 2 prompts, 3 children per fork."""
    preset = get_config("tiny_sd3")
    fields = {"family": "sd3", "sample.resolution": 32, "sample.eta": preset.sample.eta,
              "lora_target_modules": preset.lora_target_modules, "pretrained.text_encoder_3": False,
              "pretrained.max_sequence_length": preset.pretrained.max_sequence_length}
    return fast_config(pipe_dir, tmp_path, **{**fields, **overrides})


def stock_pipe(pipe_dir) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(str(pipe_dir), text_encoder_3=None, tokenizer_3=None)


def test_the_core_samples_the_stock_pipelines_images_at_noise_level_zero(tiny_sd3_dir, tmp_path):
    config = sd3_config(tiny_sd3_dir, tmp_path)
    model = get_family("sd3").load(config, CPU, torch.float32)
    model.set_timesteps(6, CPU)
    x_T = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = model.prompt_encoder.encode(PROMPTS)
    ours = denoise(GuidedDenoiser(model.unet, 64), model.sampler, x_T, cond, model.prompt_encoder.negative(), 4.0)

    pipe = stock_pipe(tiny_sd3_dir)
    theirs = pipe(PROMPTS, num_inference_steps=6, guidance_scale=4.0, height=32, width=32, latents=x_T.clone(),
                  output_type="latent", max_sequence_length=config.pretrained.max_sequence_length).images
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    images = pipe.image_processor.postprocess(pipe.vae.decode(theirs / pipe.vae.config.scaling_factor
                                                              + pipe.vae.config.shift_factor)[0], output_type="pt")
    assert pipe.vae.config.shift_factor != 0
    assert torch.allclose(model.decode(ours), images, atol=1e-5)  # decode applies the VAE's shift factor


@pytest.mark.parametrize("algorithm", ["srrl", "b2diffurl", "ddpo", "grpo"])
def test_every_algorithm_preset_trains_on_sd3(tiny_sd3_dir, tmp_path, algorithm):
    overrides = {"algorithm": algorithm, "curriculum.total_stages": 2, "curriculum.stage_cnt": 1, "eval.every": 0,
                 "train.kl_coef": 0.1}
    if algorithm == "srrl":
        overrides["resample_num"] = 1  # one reflection round: denoise and invert with the flow sampler
    run = train(sd3_config(tiny_sd3_dir, tmp_path, **overrides))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["nonfinite_steps"] == 0 for m in metrics)
    assert all(m["kl"] is not None and m["kl"] >= 0 for m in metrics if m["optimizer_steps"])
    assert (run / "checkpoints" / "stage_001" / "pytorch_lora_weights.safetensors").is_file()


def test_advantage_weighted_matching_trains_on_the_flow_forward_process(tiny_sd3_dir, tmp_path):
    run = train(sd3_config(tiny_sd3_dir, tmp_path, **{"algorithm": "grpo", "train.objective": "awm",
                                                      "curriculum.total_stages": 1, "eval.every": 0}))
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["optimizer_steps"] >= 1 and metrics["loss"] == metrics["loss"]


def test_the_checkpoint_lora_loads_into_the_stock_pipeline(tiny_sd3_dir, tmp_path):
    config = sd3_config(tiny_sd3_dir, tmp_path, **{"algorithm": "grpo", "curriculum.total_stages": 1,
                                                   "eval.every": 0, "train.learning_rate": 0.05})
    run = train(config)
    checkpoint = run / "checkpoints" / "stage_000"
    model = get_family("sd3").load(config, CPU, torch.float32)
    from srrl.models import load_lora

    load_lora(model.unet, checkpoint)
    pipe = stock_pipe(tiny_sd3_dir)
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = model.prompt_encoder.encode(PROMPTS)
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        before = pipe.transformer(x, timestep=t, **cond.denoiser_kwargs(), return_dict=False)[0]
        pipe.load_lora_weights(str(checkpoint))
        after = pipe.transformer(x, timestep=t, **cond.denoiser_kwargs(), return_dict=False)[0]
        ours = model.unet(x, timestep=t, **cond.denoiser_kwargs(), return_dict=False)[0]
    assert not torch.allclose(before, after)  # the LoRA changes the stock transformer
    assert torch.allclose(after, ours, atol=1e-5)
