"""DDPO, GRPO, B2-DiffuRL and SRRL as settings of one trainer.

They differ only in what a stage does with the same sample budget (``sample.batch_size *
sample.num_batches_per_epoch`` prompts x ``split_time`` images):

* ``ddpo`` (Black et al., 2023): every image is an independent trajectory (no fork, no shared prefix, its own
  initial noise); every trajectory is trained on every step with its per-prompt normalised reward as
  advantage (no selection); no reflection.
* ``b2diffurl`` (Hu et al., 2025): branched sampling -- the ``split_time`` images of a prompt share the
  trajectory up to ``split_step`` steps before the end -- with the curriculum's backward-progressive split
  schedule, and only the best / worst child of each group (z thresholds) is trained, on its post-fork steps;
  no reflection.
* ``srrl`` (docs/algorithm.md §2-3): B2-DiffuRL plus the curriculum's reflection rounds (the condition-guided forward
  process) before sampling.
* ``grpo`` (Flow-GRPO, Liu et al., 2025; DanceGRPO, Xue et al., 2025, here on the DDIM sampler): as DDPO, every
  image an independent trajectory trained on every step, but the advantage is the reward normalised within the
  prompt's group of ``split_time`` images, ``(r - mean) / (std + 1e-4)``, with no history.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from srrl.curriculum import StagePlan


@dataclass(frozen=True)
class Algorithm:
    """What a stage does; see the module docstring."""

    name: str
    fork: bool  # branched sampling (shared prefix, fork split_step steps before the end)
    reflect: bool  # run the curriculum's reflection rounds before sampling
    rule: str  # the advantage rule (srrl.advantages.ADVANTAGE_RULES): which rows train, with what advantage


#: The algorithm presets by ``config.algorithm``; a new one is one entry here.
PRESETS: dict[str, Algorithm] = {
    "srrl": Algorithm("srrl", fork=True, reflect=True, rule="best_worst"),
    "b2diffurl": Algorithm("b2diffurl", fork=True, reflect=False, rule="best_worst"),
    "ddpo": Algorithm("ddpo", fork=False, reflect=False, rule="all_normalised"),
    "grpo": Algorithm("grpo", fork=False, reflect=False, rule="group_normalised"),
}
ALGORITHMS: tuple[str, ...] = tuple(PRESETS)


def get_algorithm(name: str) -> Algorithm:
    """The :class:`Algorithm` called ``name`` (one of :data:`ALGORITHMS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown algorithm {name!r}; known algorithms: {', '.join(ALGORITHMS)}")
    return PRESETS[name]


def adapt_plan(plan: StagePlan, algorithm: Algorithm, num_steps: int) -> StagePlan:
    """The curriculum's ``plan`` as ``algorithm`` runs it: no reflection rounds without ``reflect``, and every
    step trained (``split_step = num_steps``) without ``fork``."""
    return replace(
        plan,
        resample_num=plan.resample_num if algorithm.reflect else 0,
        split_step=plan.split_step if algorithm.fork else num_steps,
    )
