"""The guarded optimizer step: clip, step AdamW, and keep non-finite values out of the weights.

Two different events look alike here and are handled apart:

* **Loss-scale overflow** (fp16 with a dynamic loss scaler, ``torch.amp.GradScaler``): an inf/NaN gradient norm
  is the scaler's normal working. The step goes *through the scaler*: ``scaler.step`` skips it and
  ``scaler.update`` halves the scale, so the next step sees smaller scaled gradients. Such steps are counted as
  ``overflow_steps`` and never stop a run by themselves; only a scale that collapses below
  :data:`MIN_LOSS_SCALE` does (a loss that overflows at any scale is no overflow of the scale).
* **Non-finite guard** (every precision): without a scaler a non-finite gradient norm, and with or without one a
  non-finite weight after a finite step, put the weights and AdamW state back as they were; after
  :data:`MAX_SKIPPED_STEPS` such steps in a row the run stops.

With a scaler the gradients are unscaled here (``scaler.unscale_``) and clipped with torch's
``clip_grad_norm_``, the same as accelerate does for single-process and DDP runs (DDP gradients are already
reduced); without one the clip is the accelerator's own (DeepSpeed, FSDP).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass

import torch

from srrl.errors import TrainingError

logger = logging.getLogger(__name__)

MAX_SKIPPED_STEPS = 3  # consecutive non-finite optimizer steps (the guard, not overflows) that stop the run
#: The loss scale below which fp16 training stops: 16 halvings from accelerate's initial 2^16 without one
#: finite step in between. Gradients that overflow even at scale 1 are non-finite in themselves.
MIN_LOSS_SCALE = 1.0

#: (parameters, max_norm) -> total gradient norm
ClipFn = Callable[[Sequence[torch.nn.Parameter], float], torch.Tensor | float]


@dataclass
class StepCounts:
    """Counters of :class:`GuardedStep`: per stage (reset by the trainer) and across stages (``consecutive``)."""

    skipped: int = 0  # steps undone by the non-finite guard in this stage
    overflows: int = 0  # steps skipped by the loss scaler in this stage
    consecutive: int = 0  # guard skips in a row, across stages (saved in checkpoints)


class GuardedStep:
    """One optimizer step over ``params`` with the guard and, when ``scaler`` is set, the loss scaler.

    ``optimizer`` is the (accelerate-prepared) optimizer; ``clip`` the accelerator's ``clip_grad_norm_`` (used
    without a scaler). ``scaler`` is the ``GradScaler`` that also scales the loss in ``accelerator.backward``."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], clip: ClipFn,
                 scaler: torch.amp.GradScaler | None) -> None:
        self.optimizer, self.params, self.clip, self.scaler = optimizer, params, clip, scaler
        self.counts = StepCounts()

    @property
    def inner(self) -> torch.optim.Optimizer:
        """The torch optimizer under accelerate's wrapper (the one the scaler keys its state on)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def loss_scale(self) -> float | None:
        """The scaler's current scale, or None without a scaler."""
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def __call__(self, max_norm: float) -> float | None:
        """Clip and step; returns the gradient norm, or None when the step was not taken (overflow or guard)."""
        if self.scaler is None:
            norm = float(self.clip(self.params, max_norm))
        else:
            self.scaler.unscale_(self.inner)
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(norm):
            if self.scaler is not None:
                return self._overflow(norm)
            return self._guard(f"gradient norm {norm}")
        before = [p.detach().clone() for p in self.params]
        state = deepcopy(self.inner.state_dict())
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.inner)
            self.scaler.update()
        if all(bool(torch.isfinite(p).all()) for p in self.params):
            self.counts.consecutive = 0
            return norm
        with torch.no_grad():
            for p, value in zip(self.params, before, strict=True):
                p.copy_(value)
        self.inner.load_state_dict(state)
        return self._guard("non-finite LoRA weights after the step")

    def _overflow(self, norm: float) -> None:
        """Skip the step through the scaler (its ``step`` sees the inf and does nothing; ``update`` backs off)."""
        scale = self.scaler.get_scale()
        self.scaler.step(self.inner)
        self.scaler.update()
        self.counts.overflows += 1
        new_scale = self.scaler.get_scale()
        logger.info("loss-scale overflow (gradient norm %s): step skipped, scale %g -> %g", norm, scale, new_scale)
        if new_scale < MIN_LOSS_SCALE:
            raise TrainingError(f"fp16 loss scale fell to {new_scale:g}, below the floor {MIN_LOSS_SCALE:g}: the "
                                "gradients overflow at any scale -- lower train.learning_rate, check the reward, or "
                                "use mixed_precision='bf16' or 'no'")
        return None

    def _guard(self, cause: str) -> None:
        """Count a step undone by the non-finite guard; stop after :data:`MAX_SKIPPED_STEPS` in a row."""
        self.counts.skipped += 1
        self.counts.consecutive += 1
        logger.warning("optimizer step skipped (%s); weights and optimizer state kept as before it", cause)
        if self.counts.consecutive >= MAX_SKIPPED_STEPS:
            raise TrainingError(f"{MAX_SKIPPED_STEPS} optimizer steps in a row were non-finite ({cause}); the run "
                                "stopped with its last finite checkpoint -- lower train.learning_rate, check the "
                                "reward, or use mixed_precision='no'")
        return None
