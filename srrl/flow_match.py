"""Rectified-flow sampling with log-probabilities (docs/algorithm.md §3h): the sampler of the flow-matching
families (SD3 / SD3.5, FLUX), the :class:`srrl.sampler.Sampler` seam.

A flow model predicts the velocity ``v = dx/dsigma`` of the straight path ``x_sigma = (1 - sigma) x_0 + sigma
noise`` (Liu et al. 2022; Esser et al. 2024), with ``sigma`` running from 1 (noise) to 0 (image). Its stock
sampler is the Euler step of the ODE, ``x_next = x + (sigma_next - sigma) v`` (diffusers'
``FlowMatchEulerDiscreteScheduler.step``). The policy gradient needs a stochastic step with a known density:
Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, eq. 8-9) derives the SDE whose marginals equal the ODE's,

    std_t = a * sqrt(sigma / (1 - sigma))
    mean  = x * (1 + std_t^2 / (2 sigma) * dt) + v * (1 + std_t^2 (1 - sigma) / (2 sigma)) * dt,  dt = sigma_next - sigma
    x_next = mean + std_t * sqrt(-dt) * noise

with noise level ``a`` (the sampler's ``eta``; Flow-GRPO trains at 0.7). At ``a = 0`` the step is the Euler step.
At ``sigma = 1`` the ratio's denominator uses the schedule's second sigma instead of 1 (as Flow-GRPO does), so
the first step's std is finite. Timesteps are ``sigma * num_train_timesteps`` (floats), as the stock scheduler
gives them to the denoiser; the schedule (shift, dynamic shift ``mu``) is diffusers' own.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from srrl.ddim import gaussian_step
from srrl.sampler import StepOutput


def _column(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] with ``ndim`` dimensions in all."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def flow_sde_gaussian(model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor,
                      sigma_next: torch.Tensor, sigma_cap: torch.Tensor, noise_level: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of one Flow-GRPO SDE step from ``sample`` [B, ...] at ``sigma`` [B] to ``sigma_next`` [B]:
    ``(mean [B, ...], std [B, 1, ..., 1])`` in float32 (module docstring). ``sigma_cap`` [B] replaces ``sigma`` in
    ``1 - sigma`` where ``sigma == 1`` (the schedule's second sigma)."""
    x, v = sample.float(), model_output.float()
    s, s_next = _column(sigma.float(), x.ndim), _column(sigma_next.float(), x.ndim)
    cap = _column(sigma_cap.float(), x.ndim)
    dt = s_next - s  # [B, 1, ..., 1], negative
    if noise_level == 0:
        return x + dt * v, torch.zeros_like(s)  # the Euler step, in the stock scheduler's order of operations
    std_t = noise_level * (s / (1 - torch.where(s >= 1, cap, s))).sqrt()
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * (-dt).sqrt()


def euler_inverse(model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor,
                  sigma_prev: torch.Tensor) -> torch.Tensor:
    """One Euler inversion step from ``sample`` [B, ...] at ``sigma`` [B] up to the noisier ``sigma_prev`` [B]:
    ``x + (sigma_prev - sigma) v`` (float32), ``v`` evaluated at ``sigma_prev``'s timestep. It undoes the Euler step
    ``x_prev -> x_prev + (sigma - sigma_prev) v`` exactly wherever ``v`` does not depend on ``x``."""
    x, v = sample.float(), model_output.float()
    return x + _column((sigma_prev - sigma).float(), x.ndim) * v


def dynamic_shift(scheduler_config, image_seq_len: int) -> float | None:
    """The dynamic shift ``mu`` of a schedule with ``use_dynamic_shifting`` for an image of ``image_seq_len`` tokens
    (diffusers' ``calculate_shift``: linear from ``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at
    ``max_image_seq_len``, the FLUX and SD3 pipelines' defaults where the config has none); None without it."""
    if not scheduler_config.get("use_dynamic_shifting", False):
        return None
    return calculate_shift(image_seq_len, scheduler_config.get("base_image_seq_len", 256),
                           scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                           scheduler_config.get("max_shift", 1.15))


class FlowMatchSampler:
    """The rectified-flow sampler of a ``FlowMatchEulerDiscreteScheduler`` config (:class:`srrl.sampler.Sampler`):
    ``step`` is the SDE step with noise level ``eta`` (0: the stock Euler step), ``inverse_step`` the Euler
    inversion over the same timesteps in reverse order. ``mu`` is the dynamic shift of families that use one
    (FLUX: it depends on the image's token count), ``None`` otherwise. ``linear_sigmas``: the schedule starts from
    ``linspace(1, 1 / num_steps, num_steps)`` handed to the scheduler (the FLUX pipeline's sigmas) instead of the
    scheduler's own ``linspace(1, 1 / num_train_timesteps)`` (the SD3 pipeline's)."""

    def __init__(self, scheduler_config, mu: float | None = None, linear_sigmas: bool = False) -> None:
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.mu, self.linear_sigmas = mu, linear_sigmas
        self.sigmas = torch.ones(0)  # [T + 1], the last one 0

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def inverse_timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps.flip(0)

    def set_timesteps(self, num_steps: int, device: torch.device | str) -> None:
        kwargs = {"mu": self.mu} if self.scheduler.config.use_dynamic_shifting else {}
        if self.linear_sigmas:
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        self.scheduler.set_timesteps(num_steps, device=device, **kwargs)
        self.sigmas = self.scheduler.sigmas.to(device=device, dtype=torch.float32)

    def _index(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """Position of each row's timestep in ``timesteps``: [B] int64 (the core hands them back unchanged)."""
        table = self.scheduler.timesteps.to(self.sigmas.device)
        t = torch.as_tensor(timestep, device=table.device, dtype=table.dtype).reshape(-1).expand(batch)
        hit = t[:, None] == table[None, :]  # [B, T]
        if not bool(hit.any(dim=1).all()):
            raise ValueError(f"timesteps {t.tolist()} are not all in the sampler's timesteps {table.tolist()}")
        return hit.float().argmax(dim=1)

    def _sigmas(self, timestep: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigma, sigma_next)`` [B] of each row's timestep."""
        i = self._index(timestep, batch)
        return self.sigmas[i], self.sigmas[i + 1]

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, eta: float,
             generator: list[torch.Generator] | torch.Generator | None = None,
             prev_sample: torch.Tensor | None = None) -> StepOutput:
        sigma, sigma_next = self._sigmas(timestep, sample.shape[0])
        cap = self.sigmas[1].expand_as(sigma) if self.sigmas.numel() > 2 else sigma_next
        mean, std = flow_sde_gaussian(model_output, sample, sigma, sigma_next, cap, eta)
        out = gaussian_step(mean, std.to(mean.device), generator, prev_sample)
        out.prev_sample = out.prev_sample.to(sample.dtype)
        return out

    def inverse_step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        sigma_prev, sigma = self._sigmas(timestep, sample.shape[0])  # x sits at sigma; the step reaches sigma_prev
        return euler_inverse(model_output, sample, sigma, sigma_prev).to(sample.dtype)

    def forward_process(self, sample: torch.Tensor, noise: torch.Tensor,
                        timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_sigma, v)``: ``x_sigma = (1 - sigma) x_0 + sigma noise`` (diffusers' ``scale_noise``) and the velocity
        ``v = noise - x_0`` that the flow-matching loss regresses (Lipman et al. 2023; Esser et al. 2024, eq. 2-3);
        float32, ``sample`` and ``noise`` [B, ...], per-row ``timestep`` [B] from ``timesteps``."""
        x0, noise = sample.float(), noise.float()
        sigma, _ = self._sigmas(timestep, x0.shape[0])
        s = _column(sigma, x0.ndim)
        return (1 - s) * x0 + s * noise, noise - x0
