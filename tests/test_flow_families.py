"""The flow-matching families (srrl.families.sd3, srrl.families.flux) on tiny random pipelines: the core's sampler
and decode against the stock StableDiffusion3Pipeline / FluxPipeline, each algorithm preset and both objectives
through the trainer, the LoRA in the stock pipelines, evaluate.py on a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from config.stage_process import get_config
from srrl.families import get_family
from srrl.models import load_lora
from srrl.sampling import GuidedDenoiser, denoise
from srrl.trainer import train
from tests.conftest import fast_config

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PROMPTS = ["a red circle", "two blue squares"]
PRESETS = {"sd3": "tiny_sd3", "sd3_dynamic_shift": "tiny_sd3", "flux": "tiny_flux", "flux_schnell": "tiny_flux"}


@pytest.fixture(scope="session")
def flow_pipe_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD3 (with a static and with a dynamic shift), FLUX.1-dev-shaped and FLUX.1-schnell-shaped pipeline
    folder, built once."""
    from testbed.tiny_flux import build_tiny_flux_pipeline
    from testbed.tiny_sd3 import build_tiny_sd3_pipeline

    dirs = {name: tmp_path_factory.mktemp(name) for name in PRESETS}
    build_tiny_sd3_pipeline(dirs["sd3"])
    build_tiny_sd3_pipeline(dirs["sd3_dynamic_shift"], dynamic_shift=True)
    build_tiny_flux_pipeline(dirs["flux"])
    build_tiny_flux_pipeline(dirs["flux_schnell"], schnell=True)
    return dirs


def flow_config(name: str, pipe_dir: Path, tmp_path: Path, **overrides):
    """The preset's family fields on the fast test config: 32 px, 4 steps, 2 x 2 prompts, 3 children per fork."""
    preset = get_config(PRESETS[name])
    fields = {"family": preset.family, "sample.resolution": 32, "sample.eta": preset.sample.eta,
              "lora_target_modules": preset.lora_target_modules, "pretrained.text_encoder_3": False,
              "pretrained.max_sequence_length": preset.pretrained.max_sequence_length,
              "sample.guidance_scale": 1.0 if name == "flux_schnell" else preset.sample.guidance_scale}
    return fast_config(pipe_dir, tmp_path, **{**fields, **overrides})


def stock_latents(name: str, pipe_dir: Path, x_T: torch.Tensor, steps: int, scale: float,
                  lora: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock pipeline's final latents [B, C, h, w] (unpacked for FLUX) and images from ``x_T`` [B, C, h, w]."""
    if name.startswith("sd3"):
        pipe = StableDiffusion3Pipeline.from_pretrained(str(pipe_dir), text_encoder_3=None, tokenizer_3=None)
        latents = x_T.clone()
    else:
        pipe = FluxPipeline.from_pretrained(str(pipe_dir))
        latents = FluxPipeline._pack_latents(x_T.clone(), *x_T.shape)  # FluxPipeline takes packed latents
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    kwargs = {"num_inference_steps": steps, "guidance_scale": scale, "height": 32, "width": 32,
              "max_sequence_length": 16}
    out = pipe(PROMPTS, latents=latents, output_type="latent", **kwargs).images
    images = pipe(PROMPTS, latents=latents, output_type="pt", **kwargs).images
    if name.startswith("flux"):
        out = FluxPipeline._unpack_latents(out, 32, 32, 1)
    return out, images


def core_latents(model, x_T: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
    model.set_timesteps(steps, CPU)
    cond = model.prompt_encoder.encode(PROMPTS)
    denoiser = GuidedDenoiser(model.denoiser, 64, model.embedded_guidance)
    return denoise(denoiser, model.sampler, x_T, cond, model.prompt_encoder.negative(), scale)


@pytest.mark.parametrize("name", list(PRESETS))
def test_the_core_samples_the_stock_pipelines_images_at_noise_level_zero(flow_pipe_dirs, tmp_path, name):
    config = flow_config(name, flow_pipe_dirs[name], tmp_path)
    model = get_family(config.family).load(config, CPU, torch.float32)
    assert model.embedded_guidance == (name == "flux")  # FLUX.1-dev: guidance is an input, one pass
    x_T = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    scale = config.sample.guidance_scale
    ours = core_latents(model, x_T, 6, scale)
    theirs, images = stock_latents(name, flow_pipe_dirs[name], x_T, 6, scale)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    assert model.vae.config.shift_factor != 0
    assert torch.allclose(model.decode(ours), images, atol=1e-5)  # decode applies the VAE's shift factor


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("algorithm", ["srrl", "b2diffurl", "ddpo", "grpo"])
def test_every_algorithm_preset_trains_on_the_flow_families(flow_pipe_dirs, tmp_path, name, algorithm):
    overrides = {"algorithm": algorithm, "curriculum.total_stages": 2, "curriculum.stage_cnt": 1, "eval.every": 0,
                 "train.kl_coef": 0.1}
    if algorithm == "srrl":
        overrides["resample_num"] = 1  # one reflection round: denoise and invert with the flow sampler
    run = train(flow_config(name, flow_pipe_dirs[name], tmp_path, **overrides))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["nonfinite_steps"] == 0 for m in metrics)
    assert all(m["kl"] is not None and m["kl"] >= 0 for m in metrics if m["optimizer_steps"])
    assert (run / "checkpoints" / "stage_001" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("objective", ["awm", "nft"])
@pytest.mark.parametrize("algorithm", ["srrl", "b2diffurl", "ddpo", "grpo"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_forward_process_objectives_train_on_the_flow_families(flow_pipe_dirs, tmp_path, name, algorithm,
                                                                   objective):
    run = train(flow_config(name, flow_pipe_dirs[name], tmp_path, **{
        "algorithm": algorithm, "train.objective": objective, "curriculum.total_stages": 1, "eval.every": 0,
        "train.beta2": 1.0, "select.pos_threshold": 0.0, "select.neg_threshold": 0.0}))
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["optimizer_steps"] >= 1 and metrics["loss"] == metrics["loss"]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_checkpoint_lora_loads_into_the_stock_pipeline(flow_pipe_dirs, tmp_path, name):
    """The trained LoRA in the stock pipeline (``load_lora_weights``) gives the core's images with that LoRA."""
    config = flow_config(name, flow_pipe_dirs[name], tmp_path, **{
        "algorithm": "grpo", "curriculum.total_stages": 1, "eval.every": 0, "train.learning_rate": 0.05})
    checkpoint = train(config) / "checkpoints" / "stage_000"
    model = get_family(config.family).load(config, CPU, torch.float32)
    x_T = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    scale = config.sample.guidance_scale
    before = core_latents(model, x_T, 4, scale)
    load_lora(model.denoiser, checkpoint)
    ours = core_latents(model, x_T, 4, scale)
    theirs, _ = stock_latents(name, flow_pipe_dirs[name], x_T, 4, scale, lora=checkpoint)
    assert not torch.allclose(before, ours, atol=1e-4)  # the LoRA changes the images
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_evaluate_scores_a_flux_run(flow_pipe_dirs, tmp_path):
    config = flow_config("flux", flow_pipe_dirs["flux"], tmp_path, **{
        "algorithm": "grpo", "curriculum.total_stages": 1, "eval.every": 0})
    run = train(config)
    out = tmp_path / "eval"
    cli = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"--run_dir={run}", "--rewards=brightness",
                          "--num_images_per_prompt=1", f"--out={out}", "--device=cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["generated"] == {"base": 2, "stage_000": 2}
    assert metrics["metrics"]["base"]["brightness"]["mean"] != metrics["metrics"]["stage_000"]["brightness"]["mean"]
