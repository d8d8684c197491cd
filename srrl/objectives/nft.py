"""DiffusionNFT (Zheng et al. 2025, *DiffusionNFT: Online Diffusion Reinforcement with Forward Process*, arXiv
2509.16117): negative-aware fine-tuning on the forward process (docs/algorithm.md §3k).

Each selected image's final latent ``x0`` is noised afresh at the timesteps of its kept steps (the family's
forward process, as for ``awm``). With ``f`` the current model's output and ``f_old`` the sampling policy's (the
old weights, :class:`srrl.ema.OldPolicy`), the implicit positive and negative policies are

    f+ = beta f + (1 - beta) f_old,      f- = (1 + beta) f_old - beta f

and each is scored by its x0-prediction error against ``x0`` with the official code's adaptive weight (the
squared error divided by its own detached mean absolute error, floored at 1e-5). The advantage becomes an
optimality probability ``r = clip(A / A_max / 2 + 1/2, 0, 1)`` (``A_max = train.nft_adv_clip``), and

    loss_i = A_max * (r_i L+_i + (1 - r_i) L-_i) / beta

so a high reward pulls the model towards its image (through ``f+``) and a low one pushes it away (through
``f-``). At ``r = 1/2`` and ``f = f_old`` the gradient is zero. The x0-error of an output error ``e`` is ``c e``
with ``c = sigma`` for flow matching, ``sqrt((1 - a) / a)`` for epsilon and ``sqrt(1 - a)`` for v-prediction;
:func:`x0_scale` reads ``c`` off the family's forward process, so the objective runs on every family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from srrl.models import lora_disabled
from srrl.objectives.awm import awm_log_probs, matching_inputs
from srrl.objectives.base import LossContext, Objective
from srrl.ppo import PPOTerms, with_kl_anchor
from srrl.sampler import Sampler

if TYPE_CHECKING:
    from srrl.update import MicroStep


def x0_scale(sampler: Sampler, timestep: torch.Tensor, ndim: int) -> torch.Tensor:
    """``c`` [B, 1, ..., 1]: how much an error of the denoiser's output moves its x0-prediction at ``timestep`` [B].

    The forward process is linear, ``x_t = alpha x0 + s noise`` and ``target = b x0 + a noise``; solving both for
    ``x0`` gives ``x0 = (a x_t - s target) / (a alpha - s b)``, so ``c = |s / (a alpha - s b)|``. The four
    coefficients are read off the sampler's ``forward_process`` with unit inputs."""
    unit = torch.ones(timestep.shape[0], *([1] * (ndim - 1)), device=timestep.device)
    alpha, b = sampler.forward_process(unit, torch.zeros_like(unit), timestep)
    s, a = sampler.forward_process(torch.zeros_like(unit), unit, timestep)
    return (s / (a * alpha - s * b)).abs()


def weighted_x0_error(error: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-row ``mean((c e)^2) / max(mean|c e|, 1e-5)`` [B] (the mean detached), float32."""
    x0_error = scale * error.float()
    dims = tuple(range(1, error.ndim))
    weight = x0_error.abs().mean(dim=dims).detach().clamp_min(1e-5)
    return (x0_error**2).mean(dim=dims) / weight


def optimality(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """``r = clip(A / adv_clip / 2 + 1/2, 0, 1)`` [B]: the advantage as a probability of being optimal."""
    return (advantages / adv_clip / 2 + 0.5).clamp(0.0, 1.0)


def nft_loss(ctx: LossContext, micro: MicroStep) -> PPOTerms:
    """The DiffusionNFT loss over ``micro``'s rows x kept steps (weighted sum), with the optional anchor."""
    if ctx.old_policy is None:
        raise ValueError("train.objective='nft' needs the sampling policy's weights (LossContext.old_policy)")
    k = micro.step_index.shape[1]
    x_t, t, cond, target = matching_inputs(ctx, micro)
    scale_cfg = ctx.samples.guidance_scale
    with torch.no_grad(), ctx.old_policy():  # first: the swap writes the weights in place, before any graph
        old = ctx.denoiser(x_t, t, cond, ctx.uncond, scale_cfg).float()
    pred = ctx.denoiser(x_t, t, cond, ctx.uncond, scale_cfg).float()
    beta, adv_clip = ctx.nft_beta, ctx.nft_adv_clip
    c = x0_scale(ctx.sampler, t, pred.ndim)
    positive = weighted_x0_error(beta * pred + (1 - beta) * old - target, c)
    negative = weighted_x0_error((1 + beta) * old - beta * pred - target, c)
    r = optimality(micro.advantages.to(pred.device).repeat_interleave(k), adv_clip)
    per_row = adv_clip * (r * positive + (1 - r) * negative) / beta
    weights = micro.weights.to(pred.device).repeat_interleave(k)
    err = ((pred - target) ** 2).mean(dim=tuple(range(1, pred.ndim)))
    zero = torch.zeros((), device=pred.device)
    terms = PPOTerms(loss=(per_row * weights).sum(), ratio=torch.ones_like(err), approx_kl=zero, clipfrac=zero,
                     log_prob=-err.detach())
    if ctx.kl_coef <= 0:
        return terms
    with torch.no_grad(), lora_disabled(ctx.denoiser.network):
        ref = ctx.denoiser(x_t, t, cond, ctx.uncond, scale_cfg).float()
    return with_kl_anchor(terms, ((pred - ref) ** 2).mean(dim=tuple(range(1, pred.ndim))), ctx.kl_coef, weights)


#: DiffusionNFT on the forward process; the trust probe follows the plain matching error, as for awm
OBJECTIVE = Objective("nft", nft_loss, awm_log_probs, needs_final_latents=True, needs_old_policy=True)
