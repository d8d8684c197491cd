"""Prompt conditioning: what the UNet takes besides latents and timestep.

The core never looks inside a :class:`Conditioning`; it only batches, indexes and repeats it. Each model
family supplies a :class:`PromptEncoder` that turns prompts into one (SD v1.x: CLIP hidden states;
SDXL adds pooled embeddings and size ids in ``added_cond``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Conditioning:
    """Batched UNet conditioning; every tensor has the batch on dim 0."""

    encoder_hidden_states: torch.Tensor  # [B, L, D]
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. SDXL text_embeds [B, P], time_ids [B, 6]

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def _map(self, fn) -> Conditioning:
        return Conditioning(fn(self.encoder_hidden_states), {k: fn(v) for k, v in self.added_cond.items()})

    def index(self, rows: torch.Tensor | slice) -> Conditioning:
        """The rows ``rows`` (a slice or a 1-D index tensor)."""
        return self._map(lambda t: t[rows])

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each row repeated ``repeats`` times in place (row i -> rows i*repeats .. i*repeats+repeats-1)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def expand_to(self, batch: int) -> Conditioning:
        """A single-row conditioning broadcast to ``batch`` rows."""
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def unet_kwargs(self) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` for this conditioning."""
        kwargs: dict = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond:
            kwargs["added_cond_kwargs"] = self.added_cond
        return kwargs

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch."""
        first = parts[0]
        return Conditioning(
            torch.cat([p.encoder_hidden_states for p in parts]),
            {k: torch.cat([p.added_cond[k] for p in parts]) for k in first.added_cond},
        )


class PromptEncoder(Protocol):
    """Turns prompts into UNet conditioning; one implementation per model family."""

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Conditioning of ``prompts`` (one row each), on the model's device and dtype."""
        ...

    def negative(self) -> Conditioning:
        """The single-row unconditional (negative) conditioning used for classifier-free guidance."""
        ...


class CLIPPromptEncoder:
    """SD v1.x/v2.x: the last hidden state of one CLIP text encoder; empty prompt as the negative."""

    def __init__(self, tokenizer, text_encoder, device: torch.device, dtype: torch.dtype) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.dtype = dtype
        self._negative: Conditioning | None = None

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        hidden = self.text_encoder(ids)[0]  # [B, L, D]
        return Conditioning(hidden.to(self.dtype))

    def negative(self) -> Conditioning:
        if self._negative is None:
            self._negative = self.encode([""])
        return self._negative
