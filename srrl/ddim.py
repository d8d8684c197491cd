"""DDIM transitions with Gaussian log-probabilities (docs/algorithm.md §3c).

The sampler of SRRL is a DDIM chain with ``eta > 0``: each step ``x_t -> x_prev`` is a Gaussian with
mean ``mu`` and standard deviation ``sigma_t``. The policy gradient needs the log-density of the step
actually taken, under the current model; this module computes it, for single timesteps or a batch of
per-row timesteps, and for the three prediction types of diffusers' schedulers.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_row(values: torch.Tensor, index: torch.Tensor, fallback: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``values[index]`` per row, using ``fallback`` where ``index < 0``; shape [B, 1, ..., 1]."""
    gathered = values.gather(0, index.clamp(min=0))
    gathered = torch.where(index >= 0, gathered, fallback)
    return gathered.reshape(-1, *([1] * (ndim - 1)))


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
        model_output: UNet output for ``sample`` (epsilon, sample or v, as ``scheduler.config.prediction_type``),
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
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(...) must be called before ddim_step_with_logprob")
    out_dtype = sample.dtype
    device = sample.device
    x_t = sample.float()
    model_output = model_output.float()
    batch = x_t.shape[0]

    t = torch.as_tensor(timestep, device=device).long()
    if t.ndim == 0:
        t = t.expand(batch)
    step_ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_t = t - step_ratio

    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=device, dtype=torch.float32)
    alpha_t = _per_row(alphas_cumprod, t, final, x_t.ndim)
    alpha_prev = _per_row(alphas_cumprod, prev_t, final, x_t.ndim)
    beta_t = 1 - alpha_t

    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_x0 = (x_t - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        pred_eps = model_output
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (x_t - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()
    elif prediction_type == "v_prediction":
        pred_x0 = alpha_t.sqrt() * x_t - beta_t.sqrt() * model_output
        pred_eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * x_t
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of epsilon, sample, v_prediction")

    if scheduler.config.thresholding:
        pred_x0 = scheduler._threshold_sample(pred_x0)
    elif scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)

    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=0).sqrt()  # [B, 1, 1, 1]
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * pred_eps

    if prev_sample is None:
        noise = randn_tensor(x_t.shape, generator=generator, device=device, dtype=torch.float32)
        x_prev = mean + std * noise
    else:
        x_prev = prev_sample.float()

    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_density = -((x_prev.detach() - mean) ** 2) / (2 * safe_std**2) - safe_std.log() - _LOG_SQRT_2PI
    log_prob = log_density.mean(dim=tuple(range(1, x_t.ndim)))  # [B]
    log_prob = torch.where(std.reshape(-1) > 0, log_prob, torch.zeros_like(log_prob))
    return x_prev.to(out_dtype), log_prob, pred_x0.to(out_dtype)
