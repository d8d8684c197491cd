"""The stage curriculum of docs/algorithm.md §2: reflection rounds, split step and seed of every stage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StagePlan:
    """What one stage runs with."""

    stage: int  # 0-based stage index s
    resample_num: int  # reflection rounds chained before sampling
    split_step: int  # denoising steps after the fork (the trained steps)
    seed: int  # seed of the stage's prompts and noise


def stage_plan(
    stage: int,
    stage_cnt: int,
    split_left: int,
    split_right: int,
    base_seed: int,
    split_step_override: int = 0,
    resample_num_override: int = -1,
) -> StagePlan:
    """The plan of stage ``stage``.

    ``i = s mod stage_cnt``; ``resample_num = s div stage_cnt``;
    ``split_step = split_left + floor(i * (split_right - split_left + 1) / stage_cnt)``; ``seed = base_seed + i``.
    A positive ``split_step_override`` / non-negative ``resample_num_override`` replaces the curriculum's value.
    """
    if stage < 0 or stage_cnt < 1:
        raise ValueError(f"stage must be >= 0 and stage_cnt >= 1, got stage={stage}, stage_cnt={stage_cnt}")
    i = stage % stage_cnt
    resample_num = stage // stage_cnt
    split_step = split_left + (i * (split_right - split_left + 1)) // stage_cnt
    if split_step_override > 0:
        split_step = split_step_override
    if resample_num_override >= 0:
        resample_num = resample_num_override
    return StagePlan(stage=stage, resample_num=resample_num, split_step=split_step, seed=base_seed + i)
