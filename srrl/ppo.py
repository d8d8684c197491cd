"""The clipped policy-gradient objective of docs/algorithm.md §3g."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class PPOTerms:
    """The loss and the diagnostics of one micro-step."""

    loss: torch.Tensor  # scalar, differentiable
    ratio: torch.Tensor  # [B], detached
    approx_kl: torch.Tensor  # scalar, detached: 0.5 * mean((log p - log p_old)^2)
    clipfrac: torch.Tensor  # scalar, detached: fraction of rows with |ratio - 1| > clip_range
    kl: torch.Tensor | None = None  # scalar, detached: mean KL anchor term of the rows (train.kl_coef > 0), else None
    log_prob: torch.Tensor | None = None  # [B], detached: the log-probs the loss used (for srrl.trust), if set


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


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per row of [B, ...], averaged over elements like the log-prob:
    ``mean((mean - mean_ref)^2) / (2 std^2)`` ([B]; ``std`` [B, 1, ..., 1]); 0 for rows with ``std == 0``."""
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    per_element = (mean - mean_ref.detach()) ** 2 / (2 * safe_std**2)
    kl = per_element.mean(dim=tuple(range(1, mean.ndim)))
    return torch.where(std.reshape(-1) > 0, kl, torch.zeros_like(kl))


def with_kl_anchor(terms: PPOTerms, kl: torch.Tensor, kl_coef: float, row_weights: torch.Tensor) -> PPOTerms:
    """``terms`` with ``kl_coef`` times the KL rows ``kl`` [B] added to the loss, weighted as the loss is (a weighted
    sum over ``row_weights`` [B])."""
    loss = terms.loss + kl_coef * (kl * row_weights).sum()
    return replace(terms, loss=loss, kl=kl.detach().mean())
