"""Prompt conditioning: what the denoiser takes besides latents and timestep.

The core never looks inside a :class:`Conditioning`; it only batches, indexes and repeats it. Each model
family supplies a :class:`PromptEncoder` that turns prompts into one (SD v1.x: CLIP hidden states;
SDXL adds pooled embeddings and size ids in ``added_cond``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Conditioning:
    """Batched denoiser conditioning; every tensor has the batch on dim 0."""

    encoder_hidden_states: torch.Tensor  # [B, L, D]
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. SDXL text_embeds [B, P], time_ids [B, 6]
    nested: bool = True  # True: ``added_cond`` goes in as ``added_cond_kwargs`` (UNets); False: as keywords (SD3)

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """``fn`` applied to every tensor (each keeps the batch on dim 0)."""
        return Conditioning(fn(self.encoder_hidden_states), {k: fn(v) for k, v in self.added_cond.items()}, self.nested)

    def index(self, rows: torch.Tensor | slice) -> Conditioning:
        """The rows ``rows`` (a slice or a 1-D index tensor)."""
        return self.map(lambda t: t[rows])

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each row repeated ``repeats`` times in place (row i -> rows i*repeats .. i*repeats+repeats-1)."""
        return self.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def expand_to(self, batch: int) -> Conditioning:
        """A single-row conditioning broadcast to ``batch`` rows."""
        return self.map(lambda t: t.expand(batch, *t.shape[1:]))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        return self.map(lambda t: t.to(device=device, dtype=dtype))

    def denoiser_kwargs(self) -> dict:
        """Keyword arguments of the denoiser's forward besides the latents and ``timestep``: the states as
        ``encoder_hidden_states``, and ``added_cond`` either as ``added_cond_kwargs`` (``nested``: the SD and SDXL
        UNets) or as keywords of their own (a transformer's ``pooled_projections``)."""
        kwargs: dict = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond and self.nested:
            kwargs["added_cond_kwargs"] = self.added_cond
        elif self.added_cond:
            kwargs.update(self.added_cond)
        return kwargs

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch."""
        first = parts[0]
        return Conditioning(
            torch.cat([p.encoder_hidden_states for p in parts]),
            {k: torch.cat([p.added_cond[k] for p in parts]) for k in first.added_cond},
            first.nested,
        )


class EmptyPromptNegative:
    """Base of the prompt encoders whose negative is the empty prompt's conditioning (the stock pipelines'),
    encoded once on first use; a family with another negative overrides :meth:`empty_negative`."""

    def __init__(self) -> None:
        self._negative: Conditioning | None = None

    def encode(self, prompts: Sequence[str]) -> Conditioning:  # pragma: no cover - each family defines it
        raise NotImplementedError

    def empty_negative(self) -> Conditioning:
        """The single-row negative conditioning (default: the empty prompt's)."""
        return self.encode([""])

    def negative(self) -> Conditioning:
        if self._negative is None:
            self._negative = self.empty_negative()
        return self._negative


class PromptEncoder(Protocol):
    """Turns prompts into denoiser conditioning; one implementation per model family."""

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Conditioning of ``prompts`` (one row each), on the model's device and dtype."""
        ...

    def negative(self) -> Conditioning:
        """The single-row unconditional (negative) conditioning used for classifier-free guidance."""
        ...
