"""The trust-region probe: does an optimizer step move the log-probs the way the advantages ask?

A policy-gradient step should raise the log-probability of the steps of positively advantaged trajectories and
lower that of negatively advantaged ones. Whether it does depends on the learning rate, the batch and the clip
range, and it can go the wrong way: a step too large for its batch overshoots and lowers the log-probs it was
meant to raise. The probe keeps the log-probs each micro-step computed before an optimizer step (the ones the
loss used), recomputes them without gradients after the step on the same stored steps, and averages the change
separately over rows with ``A > 0`` and rows with ``A < 0``. Logged per stage beside approx-KL and the clip
fraction (``dlogp_pos``, ``dlogp_neg``, their per-step difference ``dlogp_gap``, ``trust_wrong_steps``); a stage
with a wrong-way mean gets a warning. Any move of a step's Gaussian mean lowers the expected log-prob of samples
drawn before it (by the KL), so a small step can lower both means while still separating them: ``dlogp_gap`` > 0
says the step favoured the positives over the negatives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

#: recomputes the per-row log-probs [n] of a remembered micro-step under the current weights (no gradients)
Recompute = Callable[[object], torch.Tensor]


@dataclass
class StepShift:
    """The mean log-prob change of one optimizer step over positively and negatively advantaged rows (None when
    the step had no such rows)."""

    pos: float | None
    neg: float | None

    @property
    def wrong_way(self) -> bool:
        """Positives lowered, or negatives raised, on average."""
        return (self.pos is not None and self.pos < 0) or (self.neg is not None and self.neg > 0)


def log_prob_shift(before: torch.Tensor, after: torch.Tensor, advantages: torch.Tensor) -> StepShift:
    """:class:`StepShift` of rows whose log-probs went from ``before`` to ``after`` (all [n], ``advantages`` [n]);
    rows with ``A == 0`` take no part."""
    delta = (after - before).float()
    pos, neg = advantages > 0, advantages < 0
    return StepShift(float(delta[pos].mean()) if bool(pos.any()) else None,
                     float(delta[neg].mean()) if bool(neg.any()) else None)


@dataclass
class TrustProbe:
    """Remembers the micro-steps of the pending optimizer step and measures each step it takes."""

    pending: list[tuple[object, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    shifts: list[StepShift] = field(default_factory=list)

    def remember(self, micro: object, log_prob: torch.Tensor, advantages: torch.Tensor) -> None:
        """Keep ``micro`` with the log-probs [n] its loss used and the advantages [n] of its rows."""
        self.pending.append((micro, log_prob.detach(), advantages.detach()))

    def after_step(self, recompute: Recompute, taken: bool) -> StepShift | None:
        """Measure the step just taken (nothing when it was skipped) and forget the pending micro-steps."""
        pending, self.pending = self.pending, []
        if not taken or not pending:
            return None
        with torch.no_grad():
            after = torch.cat([recompute(micro) for micro, _, _ in pending])
        shift = log_prob_shift(torch.cat([lp for _, lp, _ in pending]), after, torch.cat([a for _, _, a in pending]))
        self.shifts.append(shift)
        return shift

    def summary(self, stage: int) -> dict[str, float | int | None]:
        """``dlogp_pos`` / ``dlogp_neg`` (means over the stage's steps) and ``trust_wrong_steps``; warns when a mean
        goes the wrong way."""
        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        pos = mean([s.pos for s in self.shifts if s.pos is not None])
        neg = mean([s.neg for s in self.shifts if s.neg is not None])
        gap = mean([s.pos - s.neg for s in self.shifts if s.pos is not None and s.neg is not None])
        wrong = sum(s.wrong_way for s in self.shifts)
        if StepShift(pos, neg).wrong_way:
            logger.warning("stage %d: the update moved log-probs against the advantages (mean change %s for A > 0, "
                           "%s for A < 0; %d of %d steps the wrong way): the step is outside the trust region -- "
                           "lower train.learning_rate or raise the trajectories per optimizer step", stage,
                           _fmt(pos), _fmt(neg), wrong, len(self.shifts))  # fmt: skip
        return {"dlogp_pos": pos, "dlogp_neg": neg, "dlogp_gap": gap, "trust_wrong_steps": wrong}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3g}"
