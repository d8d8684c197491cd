"""The sampler seam: the core runs with any sampler of the Sampler protocol, here a fake flow-matching-like one
whose timesteps are floats; DDIM's inversion step equals diffusers' exactly; the training recompute reads the
sampler settings from the trajectories."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDIMInverseScheduler, DDIMScheduler

from srrl.curriculum import StagePlan
from srrl.ddim import DDIMSampler, ddim_inverse_step, gaussian_log_prob
from srrl.sampler import StepOutput
from srrl.sampling import GuidedDenoiser
from srrl.stage import sample_stage
from srrl.update import Accumulation, ppo_update
from tests.conftest import fast_config, loader

CPU = torch.device("cpu")


class FloatSampler:
    """A toy Euler sampler on t in (0, 1]: x_prev = x - dt * v + eta * sqrt(dt) * 0.1 * noise; timesteps are floats
    scaled to the UNet's [0, 1000) range, with fractional parts."""

    def __init__(self) -> None:
        self.timesteps = self.inverse_timesteps = torch.zeros(0)
        self.seen: list[torch.Tensor] = []  # every timestep tensor handed to step / inverse_step

    def set_timesteps(self, num_steps: int, device) -> None:
        self.timesteps = torch.linspace(997.3, 1.7, num_steps, device=device)  # float32, fractional
        self.inverse_timesteps = self.timesteps.flip(0)
        self.dt = 1.0 / num_steps

    def step(self, model_output, timestep, sample, eta, generator=None, prev_sample=None) -> StepOutput:
        self.seen.append(torch.as_tensor(timestep))
        mean = sample.float() - self.dt * model_output.float()
        std = torch.full((sample.shape[0], *[1] * (sample.ndim - 1)), eta * math.sqrt(self.dt) * 0.1)
        if prev_sample is None:
            gens = generator if isinstance(generator, list) else [generator] * sample.shape[0]
            noise = torch.stack([torch.randn(sample.shape[1:], generator=g) for g in gens])
            prev_sample = mean + std * noise
        return StepOutput(prev_sample.to(sample.dtype), gaussian_log_prob(prev_sample, mean, std), mean, std)

    def inverse_step(self, model_output, timestep, sample):
        self.seen.append(torch.as_tensor(timestep))
        return sample + self.dt * model_output


@pytest.fixture()
def float_model(tiny_pipe_dir, tmp_path):
    config = fast_config(tiny_pipe_dir, tmp_path, **{"sample.eta": 1.0, "resample_num": 1})
    model = loader("sd")(config, CPU, torch.float32)
    model.sampler = FloatSampler()
    return model, config


def test_the_core_samples_reflects_and_trains_with_float_timesteps(float_model):
    model, config = float_model
    seen_by_unet: list[torch.Tensor] = []
    unet = model.denoiser
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: seen_by_unet.append(kwargs["timestep"]),
                                          with_kwargs=True)  # the core passes the timestep by keyword
    plan = StagePlan(stage=0, resample_num=1, split_step=2, seed=3)
    denoiser = GuidedDenoiser(unet, 64)
    traj, images = sample_stage(model, denoiser, config, plan, ["a red circle", "a blue square"], [0, 1], CPU)
    assert traj.timesteps.dtype == torch.float32 and traj.timesteps.tolist() == pytest.approx(
        model.sampler.timesteps[-2:].tolist())
    assert any(t != t.floor() for t in traj.timesteps)  # fractional parts survive: nothing cast them
    assert all(t.is_floating_point() for t in seen_by_unet) and all(t.is_floating_point() for t in model.sampler.seen)
    assert (traj.eta, traj.guidance_scale, traj.group_size) == (1.0, config.sample.guidance_scale, config.split_time)
    assert images.shape[0] == 2 * config.split_time and bool(torch.isfinite(traj.log_probs).all())

    # the recompute reads eta and the guidance scale from the trajectories, not from the config
    config.sample.eta, config.sample.guidance_scale = 0.3, 1.0
    ratios = []
    real_step = model.sampler.step

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if kwargs.get("prev_sample") is not None:
            ratios.append(out.log_prob)
        return out

    model.sampler.step = step
    accelerator = Accelerator(cpu=True)
    n = traj.latents.shape[0]
    stats = ppo_update(accelerator, denoiser, model.sampler, model.prompt_encoder.negative(), config, plan, traj,
                       torch.linspace(-1, 1, n), Accumulation(), lambda: 0.0)
    hook.remove()
    assert stats.ratios and all(r == pytest.approx(1.0, abs=1e-4) for r in stats.ratios[:1])  # first step: ratio 1
    assert ratios and stats.losses and all(math.isfinite(x) for x in stats.losses)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_inverse_step_equals_diffusers(prediction_type):
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
              "prediction_type": prediction_type}
    ours, theirs = DDIMSampler(config), DDIMInverseScheduler.from_config(DDIMScheduler(**config).config)
    ours.set_timesteps(10, CPU)
    theirs.set_timesteps(10, device=CPU)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for t in ours.inverse_timesteps:
        expected = theirs.step(out, int(t), x, return_dict=False)[0]
        assert torch.equal(ours.inverse_step(out, t, x), expected)
        per_row = ddim_inverse_step(ours.inverse_scheduler, out, t.expand(3), x)
        assert torch.equal(per_row, expected)
