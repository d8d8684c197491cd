"""The testbed model's schedule: zero terminal SNR, v-prediction, trailing spacing (testbed/model.py).

The project's DDIM step, its log-prob and its inversion against diffusers' DDIMScheduler / DDIMInverseScheduler
wherever those are finite, finite at the terminal step where diffusers' is not; the v-prediction pre-training
loss against a hand computation; the stock pipeline and the project's sampler on the same noise at eta 0."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPipeline

from srrl.ddim import ddim_gaussian, ddim_inverse_step
from srrl.sampling import GuidedDenoiser, denoise
from testbed.model import ALPHA_BAR_FLOOR, build_testbed_parts, build_testbed_scheduler
from testbed.pretrain import denoising_loss, image_latents, min_snr_v_loss
from tests.conftest import fast_config, loader

STEPS = 10


def zero_snr_config() -> dict:
    """A DDIM config with alpha_bar_T exactly 0 (diffusers' own rescale), v-prediction, trailing spacing."""
    return dict(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                              timestep_spacing="trailing").config)  # fmt: skip


SCHEDULES = {"exact zero": zero_snr_config, "floored (shipped)": lambda: dict(build_testbed_scheduler().config)}


def test_shipped_schedule_starts_at_999_with_the_floored_alpha_bar():
    sched = build_testbed_scheduler()
    sched.set_timesteps(STEPS)
    assert sched.timesteps.tolist() == list(range(999, 0, -100))
    assert sched.alphas_cumprod[-1].item() == pytest.approx(ALPHA_BAR_FLOOR, rel=1e-3)
    assert sched.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_step_and_log_prob_mean_match_diffusers_where_finite(schedule, steps):
    """At 25 and 50 steps diffusers' first step on the exact-zero schedule is NaN (sqrt of a negative rounding
    residue) on this torch build; the project's is finite at every step and equal to diffusers' elsewhere."""
    sched = DDIMScheduler.from_config(SCHEDULES[schedule]())
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for t in sched.timesteps.tolist():
        mean, std, _ = ddim_gaussian(sched, v, t, x, eta=1.0)
        assert torch.isfinite(mean).all() and torch.isfinite(std).all() and bool((std > 0).all())
        ref = sched.step(v, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        if not torch.isfinite(ref).all():
            assert t == 999  # only the terminal step, where sqrt(1 - alpha_prev - sigma^2) can go negative
            continue
        torch.testing.assert_close(mean, ref, rtol=1e-5, atol=1e-5)
        det, _, _ = ddim_gaussian(sched, v, t, x, eta=0.0)
        torch.testing.assert_close(det, sched.step(v, t, x, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_inversion_matches_diffusers_and_stays_finite(schedule):
    inverse = DDIMInverseScheduler.from_config(SCHEDULES[schedule]())
    inverse.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for t in inverse.timesteps.tolist():
        ours = ddim_inverse_step(inverse, v, t, x)
        assert torch.isfinite(ours).all()
        ref = inverse.step(v, t, x).prev_sample
        if torch.isfinite(ref).all():
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_v_prediction_loss_equals_a_hand_computation():
    sched = build_testbed_scheduler()
    g = torch.Generator().manual_seed(2)
    latents, noise = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    pred = torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t].double()
    v = a.sqrt()[:, None, None, None] * noise - (1 - a).sqrt()[:, None, None, None] * latents  # v = sqrt(a) eps - ...
    snr = a / (1 - a)
    weight = snr.clamp(1.0, 5.0) / (snr + 1)
    expected = (weight * ((pred.double() - v) ** 2).mean(dim=(1, 2, 3))).mean()
    assert weight[2].item() == pytest.approx(1.0, abs=1e-6)  # the zero-SNR step keeps its weight
    got = denoising_loss(pred, latents, noise, t, sched, 5.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert min_snr_v_loss(pred, v.float(), sched.alphas_cumprod, t, 5.0).item() == pytest.approx(got.item(), rel=1e-5)


def test_identity_latents_have_no_empty_channel_for_the_testbed():
    images = torch.rand(2, 3, 4, 4)
    assert image_latents(images, 3).shape == (2, 3, 4, 4)
    assert torch.equal(image_latents(images, 4)[:, 3], torch.zeros(2, 4, 4))


def test_stock_pipeline_and_project_sampler_agree_at_eta_0(tmp_path):
    """A random-weight testbed-architecture pipeline: the stock pipeline's images and the project's DDIM from the
    same x_T (CFG 4, 10 steps, eta 0)."""
    folder = tmp_path / "testbed"
    build_testbed_parts(folder, seed=3).save_pretrained(str(folder))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "two blue squares"]
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    stock = pipe(prompts, latents=x_T.clone(), num_inference_steps=STEPS, guidance_scale=4.0, eta=0.0,
                 output_type="pt").images  # fmt: skip
    config = fast_config(folder, tmp_path / "run", **{"sample.resolution": 32})
    model = loader("sd")(config, torch.device("cpu"), torch.float32)
    model.set_timesteps(STEPS, torch.device("cpu"))
    cond, uncond = model.prompt_encoder.encode(prompts), model.prompt_encoder.negative()
    ours = model.decode(denoise(GuidedDenoiser(model.denoiser, 64), model.sampler, x_T, cond, uncond, 4.0))
    torch.testing.assert_close(ours, stock.float(), rtol=1e-4, atol=1e-4)
