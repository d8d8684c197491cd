"""Advantage-weighted matching (AWM; Xue et al. 2025, arXiv 2509.25050): the pre-training loss of the model's own
samples, weighted by their advantages (docs/algorithm.md §3i).

Each selected image's final latent ``x0`` is noised afresh by the family's forward process at the timesteps of
its kept steps (``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`` for DDIM, ``(1 - s) x0 + s noise`` for flow
matching), and the denoiser's output *as the policy sampled it* (CFG at the trajectories' scale) is regressed on
the target that recovers ``x0``:

    loss = sum_rows w_i * A_i * mean_elements((f_theta(x_t, t, c_i) - target)^2)

Regressing the conditional output alone, and then sampling it with CFG again, compounds the guidance: on the
testbed that made shapes larger and speckled within a few stages (docs/testbed_tuning.md, sixteenth round).

A positive advantage lowers the matching error of its image (raises its ELBO), a negative one raises it. No
sampler log-prob enters, so the loss does not depend on how small the sampler's noise is at a step, and any
sampler the family has may draw the images. The per-row ``-error`` stands in for the log-prob in the trust probe
(it is the log-likelihood bound up to constants and weighting). With ``train.kl_coef`` > 0 the squared distance
of the output from the base model's (LoRA off) is added, as Flow-Factory's "v-based" KL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from srrl.models import lora_disabled
from srrl.objectives.base import LossContext, Objective
from srrl.ppo import PPOTerms, with_kl_anchor

if TYPE_CHECKING:
    from srrl.update import MicroStep


def matching_inputs(ctx: LossContext, micro: MicroStep) -> tuple[torch.Tensor, torch.Tensor, object, torch.Tensor]:
    """The forward-process inputs of ``micro``'s rows x kept steps (row-major [b*k]): ``(x_t, t, cond, target)``.

    The noise is drawn on the CPU from a generator keyed by ``ctx.noise_seed``, the micro-step's position in the
    update and its first row, so a recompute of the same micro-step (trust probe, resume) sees the same noise."""
    samples = ctx.samples
    device = samples.final_latents.device
    k = micro.step_index.shape[1]
    rows = micro.rows.to(device)
    x0 = samples.final_latents[rows.repeat_interleave(k)]  # [b*k, C, h, w]
    t = samples.timesteps[micro.step_index.to(device).reshape(-1)]  # [b*k]
    key = (ctx.noise_seed * 1_000_003 + micro.done) * 100_003 + int(micro.rows[0])
    generator = torch.Generator().manual_seed(key % (2**63 - 1))
    noise = torch.randn(x0.shape, generator=generator).to(device)
    x_t, target = ctx.sampler.forward_process(x0, noise, t)
    cond = samples.cond.index(rows).repeat_interleave(k)
    return x_t.to(x0.dtype), t, cond, target


def matching_error(ctx: LossContext, micro: MicroStep) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Per-row mean squared error [b*k] (float32) of the guided denoiser output (the trajectories' CFG scale)
    against the forward-process target, the output itself and the inputs ``(x_t, t, cond)``."""
    x_t, t, cond, target = matching_inputs(ctx, micro)
    pred = ctx.denoiser(x_t, t, cond, ctx.uncond, ctx.samples.guidance_scale)
    err = ((pred.float() - target) ** 2).mean(dim=tuple(range(1, pred.ndim)))
    return err, pred, (x_t, t, cond)


def awm_loss(ctx: LossContext, micro: MicroStep) -> PPOTerms:
    """``sum(w * A * err)`` over ``micro``'s rows x kept steps, with the optional output-space anchor."""
    k = micro.step_index.shape[1]
    err, pred, (x_t, t, cond) = matching_error(ctx, micro)
    weights = micro.weights.to(err.device).repeat_interleave(k)
    adv = micro.advantages.to(err.device).repeat_interleave(k)
    zero = torch.zeros((), device=err.device)
    terms = PPOTerms(loss=(adv * err * weights).sum(), ratio=torch.ones_like(err), approx_kl=zero, clipfrac=zero,
                     log_prob=-err.detach())
    if ctx.kl_coef <= 0:
        return terms
    with torch.no_grad(), lora_disabled(ctx.denoiser.network):
        ref = ctx.denoiser(x_t, t, cond, ctx.uncond, ctx.samples.guidance_scale)
    kl = ((pred.float() - ref.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))
    return with_kl_anchor(terms, kl, ctx.kl_coef, weights)


def awm_log_probs(ctx: LossContext, micro: MicroStep) -> torch.Tensor:
    """``-err`` [b*k] of ``micro`` under the current weights: the quantity the loss moves."""
    return -matching_error(ctx, micro)[0]


#: advantage-weighted matching on the forward process
OBJECTIVE = Objective("awm", awm_loss, awm_log_probs, needs_final_latents=True)
