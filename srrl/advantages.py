"""From a stage's rewards to the trained rows and their advantages (docs/algorithm.md, steps 3e-3g).

An *advantage rule* maps a stage's scores (:class:`StageScores`), the normalisation history and the config to
the trained rows with their advantages (:class:`Selection`) and the new history. Rules are registered by name in
:data:`ADVANTAGE_RULES`; an algorithm preset (``srrl/algorithms.py``) names the rule it uses. A new rule is one
function plus ``@register_rule("name")``. The pieces the built-in rules share live here too: per-prompt
normalisation with history (3e), best/worst selection (3f) and advantage shaping (3g).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ml_collections
import torch

History = dict[str, list[list]]  # prompt -> [[stage, [scores of that stage]], ...], oldest first (history.json)
HISTORY_WINDOWS = ("stage", "appearance")  # select.history_window
POSITIVES = ("best", "all")  # select.positives: the best child of a group past the threshold, or every such child


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
    advantages: torch.Tensor  # [M] float, the z of each chosen row (a rule returns them shaped: A)
    n_pos: int
    n_neg: int


def select_samples(z: torch.Tensor, split_time: int, pos_threshold: float, neg_threshold: float,
                   positives: str = "best") -> Selection:
    """Pick the positives and at most one negative per group of ``split_time`` siblings.

    ``z`` [G * split_time] holds the siblings of each fork contiguously. In each group the argmin is kept if
    ``min z < neg_threshold`` (ties: the first index). ``positives="best"`` (the original) keeps the argmax if
    ``max z >= pos_threshold`` (ties: the first index); ``"all"`` keeps every sibling with ``z >= pos_threshold``.
    No row is both (validation keeps ``pos_threshold >= neg_threshold``).
    """
    if z.numel() % split_time:
        raise ValueError(f"{z.numel()} scores do not split into groups of split_time={split_time}")
    if positives not in POSITIVES:
        raise ValueError(f"select.positives is {positives!r}; allowed: {', '.join(POSITIVES)}")
    groups = z.reshape(-1, split_time)  # [G, K]; NaN (a non-finite reward) is never picked
    offsets = torch.arange(groups.shape[0]) * split_time
    nan = torch.isnan(groups)
    max_z, argmax = groups.masked_fill(nan, float("-inf")).max(dim=1)
    min_z, argmin = groups.masked_fill(nan, float("inf")).min(dim=1)
    if positives == "best":
        pos_rows = (offsets + argmax)[max_z >= pos_threshold]
    else:
        pos_rows = torch.nonzero(~nan.flatten() & (z >= pos_threshold)).flatten()  # [P], NaN >= t is False
    neg_rows = (offsets + argmin)[min_z < neg_threshold]
    rows = torch.cat([pos_rows, neg_rows]).long()
    rows, _ = rows.sort()
    return Selection(rows=rows, advantages=z[rows], n_pos=int(pos_rows.numel()), n_neg=int(neg_rows.numel()))


def select_all(z: torch.Tensor) -> Selection:
    """Every trajectory with a finite score, with its normalised score ``z`` [N] as advantage (DDPO)."""
    rows = torch.nonzero(~torch.isnan(z)).flatten()
    kept = z[rows]
    return Selection(rows=rows, advantages=kept.clone(), n_pos=int((kept > 0).sum()), n_neg=int((kept <= 0).sum()))


def shape_advantages(z: torch.Tensor, adv_clip_max: float, beta1: float, beta2: float) -> torch.Tensor:
    """``A = clip(z, -adv_clip_max, adv_clip_max) * (beta1 if z > 0 else beta2)``, elementwise."""
    clipped = z.clamp(-adv_clip_max, adv_clip_max)
    return clipped * torch.where(z > 0, torch.full_like(z, beta1), torch.full_like(z, beta2))


# ------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class StageScores:
    """What a stage's advantage rule sees."""

    prompts: list[str]  # [N] the prompt of each image, global row order, the group_size siblings contiguous
    rewards: torch.Tensor  # [N] float32 rewards (may hold non-finite values, which no rule may train)
    group_size: int  # images per prompt row (split_time): the siblings of a fork, or DDPO's independent images
    stage: int


AdvantageRule = Callable[[StageScores, History, ml_collections.ConfigDict], tuple[Selection, History]]
ADVANTAGE_RULES: dict[str, AdvantageRule] = {}


def register_rule(name: str) -> Callable[[AdvantageRule], AdvantageRule]:
    """Decorator: register an advantage rule under ``name`` (``Algorithm.rule``)."""
    def add(rule: AdvantageRule) -> AdvantageRule:
        if name in ADVANTAGE_RULES:
            raise ValueError(f"advantage rule {name!r} is already registered")
        ADVANTAGE_RULES[name] = rule
        return rule

    return add


def _normalised(scores: StageScores, history: History, config: ml_collections.ConfigDict
                ) -> tuple[torch.Tensor, History]:
    """z of every image against its prompt's pool, and the history with this stage's scores added."""
    sel = config.select
    z = normalise_with_history(scores.prompts, scores.rewards, history, sel.history_cnt, scores.stage,
                               sel.history_window)
    return z, update_history(scores.prompts, scores.rewards, history, sel.history_cnt, scores.stage,
                             sel.history_window)


def _shaped(selection: Selection, config: ml_collections.ConfigDict) -> Selection:
    t = config.train
    advantages = shape_advantages(selection.advantages, t.adv_clip_max, t.beta1, t.beta2)
    return Selection(selection.rows, advantages, selection.n_pos, selection.n_neg)


@register_rule("best_worst")
def best_worst(scores: StageScores, history: History, config: ml_collections.ConfigDict) -> tuple[Selection, History]:
    """SRRL and B2-DiffuRL: history-normalised z, the best (or, with ``select.positives="all"``, every) sibling of
    each group past ``select.pos_threshold`` and the worst one below ``select.neg_threshold``, shaped advantages."""
    z, history = _normalised(scores, history, config)
    sel = config.select
    selection = select_samples(z, scores.group_size, sel.pos_threshold, sel.neg_threshold, sel.positives)
    return _shaped(selection, config), history


@register_rule("all_normalised")
def all_normalised(scores: StageScores, history: History, config: ml_collections.ConfigDict
                   ) -> tuple[Selection, History]:
    """DDPO: every image with a finite reward, its history-normalised z as the (shaped) advantage."""
    z, history = _normalised(scores, history, config)
    return _shaped(select_all(z), config), history


GROUP_EPS = 1e-4  # added to a group's standard deviation (Flow-GRPO's value)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = GROUP_EPS) -> torch.Tensor:
    """``(r - mean_g) / (std_g + eps)`` per group of ``group_size`` contiguous rewards [G * K] (population std over
    the group's finite rewards); NaN where a reward is non-finite. A group of equal rewards gets 0 everywhere."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.double().reshape(-1, group_size)  # [G, K]
    finite = torch.isfinite(groups)
    values = torch.where(finite, groups, torch.zeros_like(groups))
    count = finite.sum(dim=1, keepdim=True).clamp(min=1)
    mean = values.sum(dim=1, keepdim=True) / count
    std = (((values - mean) ** 2 * finite).sum(dim=1, keepdim=True) / count).sqrt()
    adv = (groups - mean) / (std + eps)
    return torch.where(finite, adv, torch.full_like(adv, float("nan"))).flatten().float()


@register_rule("group_normalised")
def group_normalised(scores: StageScores, history: History, config: ml_collections.ConfigDict
                     ) -> tuple[Selection, History]:
    """GRPO (Flow-GRPO / DanceGRPO on the DDIM sampler): every image with a finite reward, its advantage the reward
    normalised within its prompt's group of ``group_size`` independent images (no history), then shaped."""
    return _shaped(select_all(group_advantages(scores.rewards, scores.group_size)), config), history
