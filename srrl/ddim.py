"""DDIM transitions with Gaussian log-probabilities (docs/algorithm.md §3c), and the DDIM sampler of the SD and
SDXL families (:class:`DDIMSampler`, the :class:`srrl.sampler.Sampler` seam).

The sampler of SRRL is a DDIM chain with ``eta > 0``: each step ``x_t -> x_prev`` is a Gaussian with
mean ``mu`` and standard deviation ``sigma_t``. The policy gradient needs the log-density of the step
actually taken, under the current model; this module computes it, for single timesteps or a batch of
per-row timesteps, and for the three prediction types of diffusers' schedulers. DDIM timesteps index the
scheduler's ``alphas_cumprod`` table, so they are integers here (and only here).
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from srrl.sampler import StepOutput

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_row(values: torch.Tensor, index: torch.Tensor, fallback: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``values[index]`` per row, using ``fallback`` where ``index < 0``; shape [B, 1, ..., 1]."""
    gathered = values.gather(0, index.clamp(min=0))
    gathered = torch.where(index >= 0, gathered, fallback)
    return gathered.reshape(-1, *([1] * (ndim - 1)))


def _row_timesteps(timestep: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """DDIM timesteps as table indices, one per row: [B] int64."""
    t = torch.as_tensor(timestep, device=device).long()
    return t.expand(batch) if t.ndim == 0 else t


def _predict(config, model_output: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor,
             clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred_x0, pred_eps)`` of ``model_output`` at ``x_t`` whose cumulative alpha is ``alpha_t`` [B, 1, 1, 1], for
    the scheduler config's prediction type (operations in the order of diffusers' schedulers); ``pred_x0``
    clipped as the config asks when ``clip``."""
    beta_t = 1 - alpha_t
    prediction_type = config.prediction_type
    if prediction_type == "epsilon":
        pred_x0 = (x_t - beta_t ** (0.5) * model_output) / alpha_t ** (0.5)
        pred_eps = model_output
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (x_t - alpha_t ** (0.5) * pred_x0) / beta_t ** (0.5)
    elif prediction_type == "v_prediction":
        pred_x0 = (alpha_t**0.5) * x_t - (beta_t**0.5) * model_output
        pred_eps = (alpha_t**0.5) * model_output + (beta_t**0.5) * x_t
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of epsilon, sample, v_prediction")
    if clip and config.clip_sample:
        pred_x0 = pred_x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return pred_x0, pred_eps


def ddim_gaussian(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int | torch.Tensor,
                  sample: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gaussian of one DDIM step ``x_t -> x_prev``: ``(mean [B, C, H, W], std [B, 1, 1, 1], pred_x0)``, all
    float32 (see :func:`ddim_step_with_logprob` for the arguments)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(...) must be called before ddim_step_with_logprob")
    device = sample.device
    x_t, model_output = sample.float(), model_output.float()
    t = _row_timesteps(timestep, x_t.shape[0], device)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=device, dtype=torch.float32)
    alpha_t = _per_row(alphas_cumprod, t, final, x_t.ndim)
    alpha_prev = _per_row(alphas_cumprod, prev_t, final, x_t.ndim)
    pred_x0, pred_eps = _predict(scheduler.config, model_output, x_t, alpha_t, clip=False)
    if scheduler.config.thresholding:
        pred_x0 = scheduler._threshold_sample(pred_x0)
    elif scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=0).sqrt()  # [B, 1, 1, 1]
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * pred_eps
    return mean, std, pred_x0


def gaussian_step(mean: torch.Tensor, std: torch.Tensor, generator, prev_sample: torch.Tensor | None) -> StepOutput:
    """A draw ``mean + std * noise`` (noise from ``generator``: one per row, or one, or None), or the given
    ``prev_sample``, with its log-probability (:func:`gaussian_log_prob`); float32."""
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        x_prev = mean + std * noise
    else:
        x_prev = prev_sample.float()
    return StepOutput(x_prev, gaussian_log_prob(x_prev, mean, std), mean, std)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over the elements of each row of ``x`` [B, ...] of the log-density of N(``mean``, ``std``^2) (``std``
    [B, 1, ..., 1]; gradients flow through ``mean`` only), float32 [B]; 0 for rows with ``std == 0``."""
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_density = -((x.detach() - mean) ** 2) / (2 * safe_std**2) - safe_std.log() - _LOG_SQRT_2PI
    log_prob = log_density.mean(dim=tuple(range(1, x.ndim)))  # [B]
    return torch.where(std.reshape(-1) > 0, log_prob, torch.zeros_like(log_prob))


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step ``x_t -> x_prev`` and the log-probability of ``x_prev`` under the step's Gaussian.

    Args:
        scheduler: a ``DDIMScheduler`` on which ``set_timesteps`` has been called.
        model_output: denoiser output for ``sample`` (epsilon, sample or v, as ``scheduler.config.prediction_type``),
            shape [B, C, H, W].
        timestep: the current timestep ``t``: an int, or a 1-D tensor of shape [B] (one per row).
        sample: ``x_t``, shape [B, C, H, W].
        eta: DDIM stochasticity; 0 is the deterministic DDIM step, 1 a DDPM-like variance.
        generator: RNG for the step noise (ignored when ``prev_sample`` is given).
        prev_sample: if given, the ``x_prev`` whose log-probability is wanted (re-scoring a stored step).

    Returns:
        ``(prev_sample [B, C, H, W], log_prob [B], pred_original_sample [B, C, H, W])``.
        ``log_prob`` is the *mean* over latent elements of the Gaussian log-density, computed in float32;
        rows whose step is deterministic (``sigma_t == 0``, e.g. ``eta == 0``) get log-prob 0.
    """
    mean, std, pred_x0 = ddim_gaussian(scheduler, model_output, timestep, sample, eta)
    out = gaussian_step(mean, std, generator, prev_sample)
    return out.prev_sample.to(sample.dtype), out.log_prob, pred_x0.to(sample.dtype)


def ddim_inverse_step(scheduler: DDIMInverseScheduler, model_output: torch.Tensor, timestep: int | torch.Tensor,
                      sample: torch.Tensor) -> torch.Tensor:
    """One DDIM inversion step from ``sample`` [B, C, H, W] at ``timestep`` (0-d or [B]) towards noise: the step of
    diffusers' ``DDIMInverseScheduler.step``, with per-row timesteps gathered on the sample's device."""
    device = sample.device
    prev_t = _row_timesteps(timestep, sample.shape[0], device)  # the noisier timestep this step reaches
    t = (prev_t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps).clamp(
        max=scheduler.config.num_train_timesteps - 1)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device)
    initial = torch.as_tensor(scheduler.initial_alpha_cumprod, device=device, dtype=alphas_cumprod.dtype)
    alpha_t = _per_row(alphas_cumprod, t, initial, sample.ndim)
    alpha_next = _per_row(alphas_cumprod, prev_t, initial, sample.ndim)
    pred_x0, pred_eps = _predict(scheduler.config, model_output, sample, alpha_t, clip=True)
    return (alpha_next ** (0.5) * pred_x0 + (1 - alpha_next) ** (0.5) * pred_eps).to(sample.dtype)


class DDIMSampler:
    """The DDIM sampler of a diffusers scheduler config (:class:`srrl.sampler.Sampler`): ``step`` is a DDIM step with
    ``eta``, ``inverse_step`` the deterministic DDIM inversion over the same timesteps in reverse order."""

    def __init__(self, scheduler_config) -> None:
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.inverse_scheduler = DDIMInverseScheduler.from_config(scheduler_config)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def inverse_timesteps(self) -> torch.Tensor:
        return self.inverse_scheduler.timesteps

    def set_timesteps(self, num_steps: int, device: torch.device | str) -> None:
        self.scheduler.set_timesteps(num_steps, device=device)
        self.inverse_scheduler.set_timesteps(num_steps, device=device)

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, eta: float,
             generator: list[torch.Generator] | torch.Generator | None = None,
             prev_sample: torch.Tensor | None = None) -> StepOutput:
        mean, std, _ = ddim_gaussian(self.scheduler, model_output, timestep, sample, eta)
        out = gaussian_step(mean, std, generator, prev_sample)
        out.prev_sample = out.prev_sample.to(sample.dtype)
        return out

    def inverse_step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return ddim_inverse_step(self.inverse_scheduler, model_output, timestep, sample)

    def forward_process(self, sample: torch.Tensor, noise: torch.Tensor,
                        timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_process(self.scheduler, sample, noise, timestep)


def forward_process(scheduler: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, target)`` of the diffusion forward process at per-row ``timestep`` [B]: ``x_t = sqrt(a) x0 +
    sqrt(1 - a) noise`` with ``a = alphas_cumprod[t]`` (Ho et al. 2020, eq. 4; diffusers' ``add_noise``), and the
    model output that would denoise it exactly for the scheduler's prediction type: ``noise`` (epsilon), ``x0``
    (sample) or ``v = sqrt(a) noise - sqrt(1 - a) x0`` (v_prediction; Salimans & Ho 2022, diffusers'
    ``get_velocity``, which compute both). All in float32; ``x0`` and ``noise`` are [B, C, h, w]."""
    x0, noise = x0.float(), noise.float()
    t = _row_timesteps(timestep, x0.shape[0], x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return x_t, noise
    if kind == "sample":
        return x_t, x0
    if kind == "v_prediction":
        return x_t, scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"prediction_type {kind!r} is not one of epsilon, sample, v_prediction")
