"""What an objective of the update sees (docs/algorithm.md §3g, §3i): the stage's selected trajectories, the
denoiser and sampler, and the settings of the loss. An objective is a pair of functions of a micro-step: its
loss (with diagnostics) and the per-row quantity the trust probe follows (a log-prob, or its stand-in)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from srrl.conditioning import Conditioning
from srrl.ppo import PPOTerms
from srrl.sampler import Sampler
from srrl.sampling import GuidedDenoiser, Trajectories

if TYPE_CHECKING:  # the update imports this module; the micro-step is only an annotation here
    from srrl.update import MicroStep


@dataclass(frozen=True)
class LossContext:
    """The fixed inputs of every micro-step loss of one stage's update."""

    denoiser: GuidedDenoiser
    sampler: Sampler
    samples: Trajectories  # the selected trajectories [M] (``final_latents`` set when the objective needs them)
    uncond: Conditioning  # the single-row unconditional conditioning (CFG)
    clip_range: float  # train.clip_range
    kl_coef: float  # train.kl_coef: weight of the anchor to the base model (LoRA off); 0: off
    noise_seed: int  # seeds any noise an objective draws (the same on every process and on resume)
    old_policy: Callable[[], AbstractContextManager] | None = None  # inside: the sampling policy's weights (nft)
    nft_beta: float = 1.0  # train.nft_beta
    nft_adv_clip: float = 5.0  # train.nft_adv_clip


@dataclass(frozen=True)
class Objective:
    """A training objective: ``loss(ctx, micro)`` -> :class:`PPOTerms` (a weighted sum over the micro-step's rows
    and steps) and ``log_probs(ctx, micro)`` -> [b*k] the per-row quantity whose change the trust probe reports."""

    name: str
    loss: Callable[[LossContext, MicroStep], PPOTerms]
    log_probs: Callable[[LossContext, MicroStep], torch.Tensor]
    needs_final_latents: bool  # reads the sampled images' final latents (forward-process objectives)
    needs_old_policy: bool = False  # keeps the sampling policy's weights apart from the trained ones (nft)
