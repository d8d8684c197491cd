"""Per-prompt normalisation with history (SPEC §3e) and positive/negative selection (SPEC §3f)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

History = dict[str, list[list[float]]]  # prompt -> one list of scores per past stage, oldest first


def normalise_with_history(
    prompts: Sequence[str], rewards: torch.Tensor, history: History, history_cnt: int
) -> torch.Tensor:
    """z-scores of ``rewards`` [N] per prompt, pooling this stage's scores with the last ``history_cnt`` stages.

    ``z = (r - mean_p) / (std_p + 1e-8)`` with the unbiased std (``torch.std``) of the pool of prompt ``p``.
    A pool of a single score has std 0 here (not NaN), so its z is 0. ``history`` is not modified.
    """
    rewards = rewards.detach().float().cpu()
    z = torch.zeros_like(rewards)
    for prompt in dict.fromkeys(prompts):
        rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        past = [score for stage_scores in history.get(prompt, [])[-history_cnt:] for score in stage_scores]
        pool = torch.cat([rewards[rows], torch.tensor(past, dtype=torch.float32)]) if history_cnt > 0 else rewards[rows]
        std = pool.std() if pool.numel() > 1 else torch.tensor(0.0)
        z[rows] = (rewards[rows] - pool.mean()) / (std + 1e-8)
    return z


def update_history(prompts: Sequence[str], rewards: torch.Tensor, history: History, history_cnt: int) -> History:
    """A new history with this stage's scores appended per prompt, keeping each prompt's last ``history_cnt`` stages."""
    new: History = {p: [list(s) for s in stages] for p, stages in history.items()}
    values = rewards.detach().float().cpu().tolist()
    for prompt in dict.fromkeys(prompts):
        scores = [v for p, v in zip(prompts, values, strict=True) if p == prompt]
        new.setdefault(prompt, []).append(scores)
        new[prompt] = new[prompt][-history_cnt:] if history_cnt > 0 else []
    return {p: s for p, s in new.items() if s}


@dataclass(frozen=True)
class Selection:
    """Rows chosen for training and their normalised score."""

    rows: torch.Tensor  # [M] long, indices into the stage's trajectories
    advantages: torch.Tensor  # [M] float, the z of each chosen row
    n_pos: int
    n_neg: int


def select_samples(z: torch.Tensor, split_time: int, pos_threshold: float, neg_threshold: float) -> Selection:
    """Pick at most one positive and one negative per group of ``split_time`` siblings.

    ``z`` [G * split_time] holds the siblings of each fork contiguously. In each group the argmax is kept if
    ``max z >= pos_threshold`` and the argmin if ``min z < neg_threshold`` (ties: the first index).
    """
    if z.numel() % split_time:
        raise ValueError(f"{z.numel()} scores do not split into groups of split_time={split_time}")
    groups = z.reshape(-1, split_time)  # [G, K]
    offsets = torch.arange(groups.shape[0]) * split_time
    max_z, argmax = groups.max(dim=1)
    min_z, argmin = groups.min(dim=1)
    pos_rows = (offsets + argmax)[max_z >= pos_threshold]
    neg_rows = (offsets + argmin)[min_z < neg_threshold]
    rows = torch.cat([pos_rows, neg_rows]).long()
    rows, _ = rows.sort()
    return Selection(rows=rows, advantages=z[rows], n_pos=int(pos_rows.numel()), n_neg=int(neg_rows.numel()))
