"""The clipped policy-gradient objective on sampler log-probs (docs/algorithm.md §3g): each stored step of a
micro-step is re-scored under the current weights with the sampler settings it was drawn with, and the PPO-clip
loss of :mod:`srrl.ppo` is taken on the ratio to its log-prob at sampling time."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from srrl.conditioning import Conditioning
from srrl.models import lora_disabled
from srrl.objectives.base import LossContext, Objective
from srrl.ppo import PPOTerms, gaussian_kl, ppo_clip_loss, with_kl_anchor
from srrl.sampler import Sampler, StepOutput
from srrl.sampling import GuidedDenoiser, Trajectories

if TYPE_CHECKING:
    from srrl.update import MicroStep


def rescore(denoiser: GuidedDenoiser, sampler: Sampler, samples: Trajectories, micro: MicroStep,
             uncond: Conditioning) -> tuple[torch.Tensor, torch.Tensor, StepOutput, tuple]:
    """The stored steps of ``micro`` (row-major [b*k]) re-scored under the current weights with the sampler settings
    the trajectories were drawn with: (row ids, step ids, the step's output, the denoiser's inputs and the stored
    next latents as ``(latents, timesteps, cond, next_latents)``)."""
    device = samples.latents.device
    k = micro.step_index.shape[1]
    step_idx = micro.step_index.to(device).reshape(-1)  # [b*k], row-major
    row_idx = micro.rows.to(device).repeat_interleave(k)
    latents, timesteps = samples.latents[row_idx, step_idx], samples.timesteps[step_idx]
    cond = samples.cond.index(micro.rows.to(device)).repeat_interleave(k)
    next_latents = samples.next_latents[row_idx, step_idx]
    eps = denoiser(latents, timesteps, cond, uncond, samples.guidance_scale)
    out = sampler.step(eps, timesteps, latents, samples.eta, prev_sample=next_latents)
    return row_idx, step_idx, out, (latents, timesteps, cond, next_latents)


def micro_step_log_probs(denoiser: GuidedDenoiser, sampler: Sampler, samples: Trajectories, micro: MicroStep,
                         uncond: Conditioning) -> torch.Tensor:
    """The log-probs [b*k] of the stored steps of ``micro`` under the current weights (as the loss computes them)."""
    return rescore(denoiser, sampler, samples, micro, uncond)[2].log_prob


def micro_step_loss(denoiser: GuidedDenoiser, sampler: Sampler, samples: Trajectories, micro: MicroStep,
                    uncond: Conditioning, clip_range: float, kl_coef: float = 0.0) -> PPOTerms:
    """The clipped loss of ``micro``: the log-probs of its stored steps recomputed under the current policy with
    the sampler settings the trajectories were drawn with (``samples.eta``, ``samples.guidance_scale``); the
    weighted sum over rows and steps, i.e. the sum of the one-step micro-step losses. With ``kl_coef`` > 0 the KL
    anchor is added: the divergence of each step's Gaussian from the base model's (LoRA off, same input)."""
    k = micro.step_index.shape[1]
    row_idx, step_idx, out, (latents, timesteps, cond, next_latents) = rescore(denoiser, sampler, samples, micro,
                                                                                uncond)
    weights = micro.weights.to(out.log_prob.device).repeat_interleave(k)
    adv = micro.advantages.to(out.log_prob.device).repeat_interleave(k)
    terms = ppo_clip_loss(out.log_prob, samples.log_probs[row_idx, step_idx], adv, clip_range, weights)
    terms = replace(terms, log_prob=out.log_prob.detach())
    if kl_coef <= 0:
        return terms
    with torch.no_grad(), lora_disabled(denoiser.network):
        ref_eps = denoiser(latents, timesteps, cond, uncond, samples.guidance_scale)
    ref = sampler.step(ref_eps, timesteps, latents, samples.eta, prev_sample=next_latents)
    return with_kl_anchor(terms, gaussian_kl(out.mean, ref.mean, out.std), kl_coef, weights)


def _loss(ctx: LossContext, micro: MicroStep) -> PPOTerms:
    return micro_step_loss(ctx.denoiser, ctx.sampler, ctx.samples, micro, ctx.uncond, ctx.clip_range, ctx.kl_coef)


def _log_probs(ctx: LossContext, micro: MicroStep) -> torch.Tensor:
    return micro_step_log_probs(ctx.denoiser, ctx.sampler, ctx.samples, micro, ctx.uncond)


#: the PPO-clip objective on the sampler's step log-probs (DDPO, Flow-GRPO, B2-DiffuRL, SRRL)
OBJECTIVE = Objective("ppo", _loss, _log_probs, needs_final_latents=False)
