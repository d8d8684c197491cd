"""The clipped policy-gradient objective of docs/algorithm.md §3g."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PPOTerms:
    """The loss and the diagnostics of one micro-step."""

    loss: torch.Tensor  # scalar, differentiable
    ratio: torch.Tensor  # [B], detached
    approx_kl: torch.Tensor  # scalar, detached: 0.5 * mean((log p - log p_old)^2)
    clipfrac: torch.Tensor  # scalar, detached: fraction of rows with |ratio - 1| > clip_range


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    row_weights: torch.Tensor | None = None,
) -> PPOTerms:
    """``mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`` with ``ratio = exp(log_prob - old_log_prob)``.

    All inputs have shape [B]; ``advantages`` are already shaped (:func:`srrl.advantages.shape_advantages`). With
    ``row_weights`` [B] the loss is the weighted *sum* instead of the mean (used to exclude padding rows and to
    make the DDP average of per-process losses the mean over all real rows).
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_row = torch.maximum(unclipped, clipped)
    loss = per_row.mean() if row_weights is None else (per_row * row_weights).sum()
    with torch.no_grad():
        approx_kl = 0.5 * (log_ratio**2).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return PPOTerms(loss=loss, ratio=ratio.detach(), approx_kl=approx_kl, clipfrac=clipfrac)
