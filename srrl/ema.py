"""An exponential moving average of the LoRA weights (``train.ema_decay``), for held-out evaluation.

After every optimizer step that is taken, ``shadow <- d * shadow + (1 - d) * weights`` with the constant
``d = train.ema_decay``, except at the first step, which copies the weights (so the average never holds the
untrained start): an average over about the last ``1 / (1 - d)`` optimizer steps. diffusers' own warm-up
``min(d, (1 + k) / (10 + k))`` is not used: it would govern every run of a few hundred steps whatever ``d`` says.
The policy that samples and trains is never the average: only the held-out evaluation
(and the ``ema/`` LoRA of each checkpoint) uses it, so a run with the average trains exactly what the same run
without it trains. The arithmetic is :class:`diffusers.training_utils.EMAModel`'s; this module adds the swap
around an evaluation and the checkpoint form (a stock LoRA directory, :func:`srrl.models.save_lora`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from srrl.errors import LoadError
from srrl.models import save_lora, set_lora_state

EMA_DIR = "ema"  # the average's LoRA inside a checkpoint directory
OLD_POLICY_FILE = "old_policy.safetensors"  # nft's sampling policy inside a checkpoint directory

__all__ = ["EMA_DIR", "OLD_POLICY_FILE", "OldPolicy", "averaged_weights", "load_ema", "make_ema", "save_ema"]


def make_ema(params: list[torch.nn.Parameter], decay: float) -> EMAModel | None:
    """The average of ``params`` (their current values as its start), or None when ``decay`` is 0 (off)."""
    if decay <= 0:
        return None
    return EMAModel(params, decay=decay, min_decay=decay, foreach=False)  # min_decay: no warm-up


@contextmanager
def averaged_weights(ema: EMAModel | None, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Inside the block ``params`` hold the average; on exit their own values come back bit for bit (no-op for
    ``ema`` None)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def save_ema(ema: EMAModel, params: list[torch.nn.Parameter], pipeline_class: type, denoiser: torch.nn.Module,
             checkpoint_dir: Path) -> dict:
    """Write the average as a LoRA directory ``checkpoint_dir/ema`` (loadable like the checkpoint's own LoRA);
    returns what ``state.json`` keeps of it (the step count that sets the next decay)."""
    with averaged_weights(ema, params):
        save_lora(pipeline_class, denoiser, Path(checkpoint_dir) / EMA_DIR)
    return {"optimization_step": ema.optimization_step}


def load_ema(ema: EMAModel, params: list[torch.nn.Parameter], denoiser: torch.nn.Module,
             averaged: dict[str, torch.Tensor], state: dict) -> None:
    """Put the average saved by :func:`save_ema` (``averaged``: its LoRA as :func:`srrl.models.read_lora` read
    and checked it; ``state``: what ``state.json`` kept) into ``ema``; ``params`` keep their values."""
    own = [p.detach().clone() for p in params]
    set_lora_state(denoiser, averaged)
    ema.shadow_params = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, value in zip(params, own, strict=True):
            p.copy_(value)
    ema.optimization_step = int(state["optimization_step"])


class OldPolicy:
    """DiffusionNFT's sampling policy ``theta_old`` (docs/algorithm.md §3k): a copy of the LoRA weights that samples
    the stages and that the ``nft`` loss contrasts with, softly updated after each stage's update,
    ``theta_old <- eta theta_old + (1 - eta) theta`` with ``eta = min(rate * (stage + 1), cap)`` (the official
    code's default schedule, ``rate`` 0.001 and ``cap`` 0.5, one update per epoch; here an epoch is a stage)."""

    def __init__(self, params: list[torch.nn.Parameter], rate: float, cap: float) -> None:
        self.params, self.rate, self.cap = params, rate, cap
        self.weights = [p.detach().clone() for p in params]

    def decay(self, stage: int) -> float:
        return min(self.rate * (stage + 1), self.cap)

    @torch.no_grad()
    def update(self, stage: int) -> None:
        eta = self.decay(stage)
        for old, p in zip(self.weights, self.params, strict=True):
            old.mul_(eta).add_(p.detach(), alpha=1 - eta)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the parameters hold ``theta_old``; on exit their own values come back bit for bit."""
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, old in zip(self.params, self.weights, strict=True):
                p.copy_(old)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, own, strict=True):
                    p.copy_(value)

    def state(self) -> dict[str, torch.Tensor]:
        """The weights by parameter position (a checkpoint's ``old_policy.safetensors``)."""
        return {str(i): w.detach().cpu().contiguous() for i, w in enumerate(self.weights)}

    def load(self, tensors: dict[str, torch.Tensor], path: Path | str = "old_policy.safetensors") -> None:
        """Put weights saved by :meth:`state` back; a one-line LoadError if they do not fit the parameters or are
        not finite (nothing is changed then)."""
        names = [str(i) for i in range(len(self.weights))]
        if sorted(tensors) != sorted(names) or any(tensors[n].shape != w.shape for n, w in zip(names, self.weights,
                                                                                             strict=True)):
            raise LoadError(f"{path}: the saved sampling policy does not fit this run's LoRA parameters; check "
                            "lora_rank and lora_target_modules")
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            raise LoadError(f"{path} holds non-finite values; use an earlier checkpoint")
        for i, w in enumerate(self.weights):
            w.copy_(tensors[str(i)].to(device=w.device, dtype=w.dtype))
