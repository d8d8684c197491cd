"""Per-prompt normalisation with history and positive/negative selection (docs/algorithm.md, steps 3e-3f)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

History = dict[str, list[list]]  # prompt -> [[stage, [scores of that stage]], ...], oldest first (history.json)
HISTORY_WINDOWS = ("stage", "appearance")  # eval.history_window


def pooled_history(entries: list[list], stage: int, history_cnt: int, window: str) -> list[float]:
    """The past scores that stage ``stage`` pools for one prompt whose history is ``entries``.

    ``window="stage"`` (the original code, docs/algorithm.md): the scores of stages ``stage - history_cnt`` ..
    ``stage - 1``, however often the prompt was drawn in them; ``"appearance"``: the prompt's last
    ``history_cnt`` appearances, however long ago. ``history_cnt`` 0 pools nothing.
    """
    if history_cnt <= 0:
        return []
    if window == "stage":
        kept = [e for e in entries if stage - history_cnt <= e[0] < stage]
    else:
        kept = entries[-history_cnt:]
    return [score for _, scores in kept for score in scores]


def normalise_with_history(
    prompts: Sequence[str], rewards: torch.Tensor, history: History, history_cnt: int, stage: int = 0,
    window: str = "stage",
) -> torch.Tensor:
    """z-scores of ``rewards`` [N] per prompt, pooling this stage's finite scores with the prompt's past scores
    (:func:`pooled_history`).

    ``z = (r - mean_p) / (std_p + 1e-8)`` with the unbiased std (``torch.std``) of the pool of prompt ``p``.
    A pool of a single score has std 0 here (not NaN), so its z is 0. A non-finite reward gets z = NaN and takes
    no part in any pool (selection skips it). ``history`` is not modified.
    """
    rewards = rewards.detach().float().cpu()
    finite = torch.isfinite(rewards)
    z = torch.full_like(rewards, float("nan"))
    for prompt in dict.fromkeys(prompts):
        rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt and bool(finite[i])], dtype=torch.long)
        if rows.numel() == 0:
            continue
        past = pooled_history(history.get(prompt, []), stage, history_cnt, window)
        pool = torch.cat([rewards[rows], torch.tensor(past, dtype=torch.float32)])
        std = pool.std() if pool.numel() > 1 else torch.tensor(0.0)
        z[rows] = (rewards[rows] - pool.mean()) / (std + 1e-8)
    return z


def update_history(
    prompts: Sequence[str], rewards: torch.Tensor, history: History, history_cnt: int, stage: int = 0,
    window: str = "stage",
) -> History:
    """A new history with this stage's finite scores appended per prompt, pruned to what later stages can pool:
    stages after ``stage - history_cnt`` (``window="stage"``) or the last ``history_cnt`` appearances."""
    new: History = {p: [[s, list(v)] for s, v in entries] for p, entries in history.items()}
    values = rewards.detach().float().cpu().tolist()
    for prompt in dict.fromkeys(prompts):
        scores = [v for p, v in zip(prompts, values, strict=True) if p == prompt and math.isfinite(v)]
        if scores:
            new.setdefault(prompt, []).append([stage, scores])
    for prompt, entries in new.items():
        if history_cnt <= 0:
            new[prompt] = []
        elif window == "stage":
            new[prompt] = [e for e in entries if e[0] > stage - history_cnt]
        else:
            new[prompt] = entries[-history_cnt:]
    return {p: e for p, e in new.items() if e}


def upgrade_history(history: dict) -> History:
    """A ``history.json`` / checkpoint history in the current format: entries of runs made before the stage
    window (plain score lists, stage unknown) become ``[-1, scores]``, which only the appearance window pools."""
    return {p: [e if len(e) == 2 and isinstance(e[1], list) else [-1, list(e)] for e in entries]
            for p, entries in history.items()}


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
    groups = z.reshape(-1, split_time)  # [G, K]; NaN (a non-finite reward) is never picked
    offsets = torch.arange(groups.shape[0]) * split_time
    nan = torch.isnan(groups)
    max_z, argmax = groups.masked_fill(nan, float("-inf")).max(dim=1)
    min_z, argmin = groups.masked_fill(nan, float("inf")).min(dim=1)
    pos_rows = (offsets + argmax)[max_z >= pos_threshold]
    neg_rows = (offsets + argmin)[min_z < neg_threshold]
    rows = torch.cat([pos_rows, neg_rows]).long()
    rows, _ = rows.sort()
    return Selection(rows=rows, advantages=z[rows], n_pos=int(pos_rows.numel()), n_neg=int(neg_rows.numel()))
