"""The sampler seam: what the core needs of a model family's sampler (docs/algorithm.md §3b-3c).

A sampler is a chain of Gaussian steps ``x_t -> x_prev`` over its timesteps, each with a known mean and standard
deviation, so the policy gradient can score a stored step under the current model, and a deterministic inversion
step that the reflection rounds run back towards noise. The core only iterates over ``timesteps`` and hands them
back unchanged: they may be integers (DDIM) or floats (flow matching), and are never cast. DDIM's is
:class:`srrl.ddim.DDIMSampler`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class StepOutput:
    """One sampler step over a batch of B rows."""

    prev_sample: torch.Tensor  # [B, C, h, w] the next latent (drawn, or the given one)
    log_prob: torch.Tensor  # [B] float32 mean over latent elements of the step's Gaussian log-density of it
    mean: torch.Tensor  # [B, C, h, w] float32 mean of the step's Gaussian
    std: torch.Tensor  # [B, 1, ..., 1] float32 standard deviation (0 for a deterministic step)


class Sampler(Protocol):
    """A model family's sampler. ``set_timesteps`` fixes ``timesteps`` (sampling order, [T]) and
    ``inverse_timesteps`` (inversion order, [T])."""

    timesteps: torch.Tensor
    inverse_timesteps: torch.Tensor

    def set_timesteps(self, num_steps: int, device: torch.device | str) -> None:
        """Set both timestep sequences for ``num_steps`` steps."""

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        eta: float,
        generator: list[torch.Generator] | torch.Generator | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step from ``sample`` [B, C, h, w] at ``timestep`` (0-d or [B]); with ``prev_sample`` given, its
        log-probability instead of a draw. ``eta`` scales the step's noise (0: deterministic)."""

    def inverse_step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One deterministic inversion step (towards noise) from ``sample`` at ``timestep`` (an entry of
        ``inverse_timesteps``)."""

    def forward_process(self, sample: torch.Tensor, noise: torch.Tensor,
                        timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training forward process at per-row ``timestep`` [B] (entries of ``timesteps``): ``(x_t, target)``,
        the clean ``sample`` [B, C, h, w] noised with ``noise`` and the denoiser output that recovers it exactly
        (what pre-training regresses; read by forward-process objectives, :mod:`srrl.objectives`)."""
