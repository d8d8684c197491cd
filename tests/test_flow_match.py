"""The rectified-flow sampler (srrl.flow_match): the SDE step against a hand computation, noise level 0 against the
stock Euler scheduler, the Euler inversion, the forward process, and the SDE's marginals."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from srrl.flow_match import FlowMatchSampler, flow_sde_gaussian
from srrl.sampling import denoise, invert

SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A made-up denoiser: non-linear in x and in t."""
    return torch.tanh(1.3 * x) - 0.7 * x + torch.sin(t / 250.0)


def test_sde_step_mean_std_and_log_prob_by_hand():
    x, v = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, 0.4]])
    sigma, sigma_next, a = 0.6, 0.4, 0.7
    mean, std = flow_sde_gaussian(v, x, torch.tensor([sigma]), torch.tensor([sigma_next]), torch.tensor([0.9]), a)
    dt = sigma_next - sigma
    std_t = a * math.sqrt(sigma / (1 - sigma))
    want = [xi * (1 + std_t**2 / (2 * sigma) * dt) + vi * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
            for xi, vi in ((0.5, 0.2), (-1.0, 0.4))]
    assert mean[0].tolist() == pytest.approx(want, rel=1e-6)
    assert float(std) == pytest.approx(std_t * math.sqrt(-dt), rel=1e-6)

    sampler = FlowMatchSampler({"num_train_timesteps": 1000, "shift": 1.0})
    sampler.set_timesteps(5, "cpu")  # sigmas 1, 0.80, 0.60, 0.40, 0.20 (from 1 to 1/1000 evenly), then 0
    t = sampler.timesteps[2]
    s, s_next = float(sampler.sigmas[2]), float(sampler.sigmas[3])
    x_next = torch.tensor([[0.3, -0.8]])
    out = sampler.step(v, t, x, a, prev_sample=x_next)
    std_t = a * math.sqrt(s / (1 - s))
    m = [xi * (1 + std_t**2 / (2 * s) * (s_next - s)) + vi * (1 + std_t**2 * (1 - s) / (2 * s)) * (s_next - s)
         for xi, vi in ((0.5, 0.2), (-1.0, 0.4))]
    sd = std_t * math.sqrt(s - s_next)
    log_p = sum(-((xn - mi) ** 2) / (2 * sd**2) - math.log(sd) - 0.5 * math.log(2 * math.pi)
                for xn, mi in zip((0.3, -0.8), m, strict=True)) / 2  # the mean over elements
    assert float(out.log_prob) == pytest.approx(log_p, rel=1e-5)


def test_first_step_std_is_finite_and_uses_the_second_sigma():
    sampler = FlowMatchSampler(SD3_SCHEDULER)
    sampler.set_timesteps(10, "cpu")
    x = torch.randn(2, 4, 3, 3)
    out = sampler.step(velocity(x, sampler.timesteps[0]), sampler.timesteps[0], x, 0.7)
    s1, s0 = float(sampler.sigmas[1]), float(sampler.sigmas[0])
    assert s0 == 1.0
    assert float(out.std[0]) == pytest.approx(0.7 * math.sqrt(1 / (1 - s1)) * math.sqrt(s0 - s1), rel=1e-6)
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.prev_sample).all()


@pytest.mark.parametrize("config,mu", [(SD3_SCHEDULER, None), (FLUX_SCHEDULER, 0.8)])
def test_noise_level_zero_is_the_stock_euler_scheduler_bit_for_bit(config, mu):
    stock = FlowMatchEulerDiscreteScheduler.from_config(config)
    stock.set_timesteps(8, device="cpu", **({"mu": mu} if mu is not None else {}))
    sampler = FlowMatchSampler(config, mu=mu)
    sampler.set_timesteps(8, "cpu")
    assert torch.equal(sampler.timesteps, stock.timesteps)
    x_ours = x_stock = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    for t in sampler.timesteps:
        x_stock = stock.step(velocity(x_stock, t), t, x_stock).prev_sample
        out = sampler.step(velocity(x_ours, t), t, x_ours, 0.0)
        x_ours = out.prev_sample
        assert (out.log_prob == 0).all() and (out.std == 0).all()
    assert torch.equal(x_ours, x_stock)


def test_per_row_timesteps_equal_one_timestep_per_call():
    sampler = FlowMatchSampler(SD3_SCHEDULER)
    sampler.set_timesteps(6, "cpu")
    x = torch.randn(3, 4, 2, 2)
    t = sampler.timesteps[[0, 3, 5]]
    v = velocity(x, t[:, None, None, None])
    together = sampler.step(v, t, x, 0.7, prev_sample=x * 0.9)
    for row in range(3):
        alone = sampler.step(v[row:row + 1], t[row], x[row:row + 1], 0.7, prev_sample=x[row:row + 1] * 0.9)
        assert torch.allclose(together.mean[row], alone.mean[0]) and torch.allclose(together.log_prob[row],
                                                                                      alone.log_prob[0])
    with pytest.raises(ValueError, match="not all in the sampler's timesteps"):
        sampler.step(v, torch.tensor([1.5, 2.5, 3.5]), x, 0.7)


def test_euler_inversion_undoes_the_euler_chain_where_the_velocity_depends_on_time_only():
    sampler = FlowMatchSampler(SD3_SCHEDULER)
    sampler.set_timesteps(7, "cpu")
    x_T = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    field = torch.randn(4, 3, 3, dtype=torch.float64)

    def v(t: torch.Tensor) -> torch.Tensor:  # v(x, t) = field * cos(t / 300): no dependence on x
        return field.expand(2, -1, -1, -1) * torch.cos(t.double() / 300.0)

    x = x_T
    for t in sampler.timesteps:
        x = sampler.step(v(t), t, x, 0.0).prev_sample
    assert not torch.allclose(x, x_T)
    for t in sampler.inverse_timesteps:
        x = sampler.inverse_step(v(t), t, x)
    assert torch.allclose(x, x_T, atol=1e-5)  # float32 arithmetic inside the step


def test_forward_process_is_the_stock_scale_noise_with_the_velocity_target():
    sampler = FlowMatchSampler(SD3_SCHEDULER)
    sampler.set_timesteps(10, "cpu")
    stock = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER)
    stock.set_timesteps(10, device="cpu")
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = sampler.timesteps[[2, 7]]
    x_t, target = sampler.forward_process(x0, noise, t)
    for row in range(2):
        want = stock.scale_noise(x0[row:row + 1], t[row:row + 1], noise[row:row + 1])
        assert torch.allclose(x_t[row:row + 1], want, atol=1e-6)
    assert torch.equal(target, noise - x0)


def test_sde_keeps_the_marginals_of_the_flow():
    """Data at a point (x_0 = 0): the exact velocity is x / sigma and the marginal at sigma is N(0, sigma^2); the SDE
    at noise level 0.7 must keep it (a wrong drift correction inflates or shrinks the spread)."""
    sampler = FlowMatchSampler({"num_train_timesteps": 1000, "shift": 1.0})
    sampler.set_timesteps(200, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40000, 1, generator=g)
    for i, t in enumerate(sampler.timesteps[:150]):
        x = sampler.step(x / sampler.sigmas[i], t, x, 0.7, generator=g).prev_sample
    sigma = float(sampler.sigmas[150])  # about 0.25
    assert float(x.std()) == pytest.approx(sigma, rel=0.03)
    assert abs(float(x.mean())) < 0.01


@pytest.mark.parametrize("iterations", [0, 3, 30])
def test_fixed_point_inversion_undoes_the_euler_chain_where_the_velocity_depends_on_x(iterations):
    """v(x, t) = -0.4 x + field * t / 1000: the plain Euler inversion drifts (it takes v at the wrong latent), each
    fixed-point iteration shrinks the drift, and enough of them invert the sampler's chain to rounding."""
    sampler = FlowMatchSampler(SD3_SCHEDULER)
    sampler.set_timesteps(7, "cpu")
    x_T = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    field = torch.randn(4, 3, 3, dtype=torch.float64)

    def velocity(x, t, cond, uncond, scale):  # the GuidedDenoiser call signature
        return -0.4 * x + field * float(t) / 1000

    x_0 = denoise(velocity, sampler, x_T, None, None, 1.0)
    back = invert(velocity, sampler, x_0, None, None, 1.0, iterations)
    error = float((back - x_T).norm() / x_T.norm())
    bound = {0: 1.0, 3: 0.02, 30: 1e-6}[iterations]
    assert error < bound, error
    if iterations == 0:
        assert error > 0.05  # the plain inversion does drift on this field
