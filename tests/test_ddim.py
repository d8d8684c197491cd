"""DDIM step with log-prob against diffusers' DDIMScheduler.step and torch.distributions.Normal."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from srrl.ddim import ddim_step_with_logprob


def make_scheduler(prediction_type="epsilon", **kw) -> DDIMScheduler:
    s = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type, **kw,
    )
    s.set_timesteps(20)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_eta0_matches_scheduler_step(prediction_type):
    sched = make_scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    out = torch.randn(3, 4, 8, 8, generator=g)
    for t in sched.timesteps[[0, 7, -1]]:
        ref = sched.step(out, int(t), x, eta=0.0)
        prev, logp, x0 = ddim_step_with_logprob(sched, out, int(t), x, eta=0.0)
        torch.testing.assert_close(prev, ref.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        assert logp.shape == (3,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_eta1_mean_and_noise_match_scheduler_step(prediction_type):
    """With the same variance noise, our stochastic step equals DDIMScheduler.step(eta=1)."""
    sched = make_scheduler(prediction_type)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = int(sched.timesteps[5])
    prev, _, _ = ddim_step_with_logprob(sched, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ref = sched.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
    torch.testing.assert_close(prev, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_logprob_of_given_prev_sample_equals_normal(prediction_type):
    sched = make_scheduler(prediction_type)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 4, 8, 8, generator=g)
    out = torch.randn(4, 4, 8, 8, generator=g)
    prev_given = torch.randn(4, 4, 8, 8, generator=g)
    t = int(sched.timesteps[10])
    # the Gaussian's mean is the eta-1 step with zero noise; its std from the DDIM variance formula
    mean = sched.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
    prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
    a_t, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[prev_t]
    std = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    expected = torch.distributions.Normal(mean, std).log_prob(prev_given).mean(dim=(1, 2, 3))
    prev, logp, _ = ddim_step_with_logprob(sched, out, t, x, eta=1.0, prev_sample=prev_given)
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(prev, prev_given)


def test_batched_timesteps_equal_rowwise():
    sched = make_scheduler()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 8, 8, generator=g)
    out = torch.randn(3, 4, 8, 8, generator=g)
    prev_given = torch.randn(3, 4, 8, 8, generator=g)
    ts = sched.timesteps[[0, 9, 19]]  # the last one uses final_alpha_cumprod
    _, logp, x0 = ddim_step_with_logprob(sched, out, ts, x, eta=1.0, prev_sample=prev_given)
    for i, t in enumerate(ts):
        _, lp_i, x0_i = ddim_step_with_logprob(sched, out[i : i + 1], int(t), x[i : i + 1], eta=1.0,
                                               prev_sample=prev_given[i : i + 1])
        torch.testing.assert_close(logp[i : i + 1], lp_i)
        torch.testing.assert_close(x0[i : i + 1], x0_i)


def test_sampled_step_has_higher_logprob_than_far_sample():
    sched = make_scheduler()
    x = torch.randn(2, 4, 8, 8)
    out = torch.randn(2, 4, 8, 8)
    t = int(sched.timesteps[3])
    prev, logp, _ = ddim_step_with_logprob(sched, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    _, logp_far, _ = ddim_step_with_logprob(sched, out, t, x, eta=1.0, prev_sample=prev + 5.0)
    assert (logp > logp_far).all()


def test_deterministic_rows_get_zero_logprob_and_requires_timesteps():
    sched = make_scheduler()
    x = torch.randn(1, 4, 8, 8)
    _, logp, _ = ddim_step_with_logprob(sched, x, int(sched.timesteps[0]), x, eta=0.0)
    assert torch.equal(logp, torch.zeros(1))
    fresh = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(fresh, x, 1, x)


def test_logprob_gradient_flows_to_model_output():
    sched = make_scheduler()
    x = torch.randn(2, 4, 8, 8)
    out = torch.randn(2, 4, 8, 8, requires_grad=True)
    prev = torch.randn(2, 4, 8, 8)
    _, logp, _ = ddim_step_with_logprob(sched, out, int(sched.timesteps[4]), x, eta=1.0, prev_sample=prev)
    logp.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
