"""Prompt conditioning: what the UNet takes besides latents and timestep.

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
    """Batched UNet conditioning; every tensor has the batch on dim 0."""

    encoder_hidden_states: torch.Tensor  # [B, L, D]
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. SDXL text_embeds [B, P], time_ids [B, 6]

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """``fn`` applied to every tensor (each keeps the batch on dim 0)."""
        return Conditioning(fn(self.encoder_hidden_states), {k: fn(v) for k, v in self.added_cond.items()})

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


class SDXLPromptEncoder:
    """SDXL: penultimate hidden states of both text encoders concatenated; the second encoder's pooled
    projection and ``add_time_ids`` (original size, crop top-left, target size) as added conditioning.

    The negative is the empty prompt's conditioning, or zeros where ``force_zeros_for_empty_prompt`` says so.
    """

    def __init__(
        self,
        tokenizers: Sequence,
        text_encoders: Sequence,
        resolution: int,
        force_zeros_for_empty_prompt: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.force_zeros = force_zeros_for_empty_prompt
        self.device = device
        self.dtype = dtype
        size = (resolution, resolution)
        self.time_ids = torch.tensor([[*size, 0, 0, *size]], device=device, dtype=dtype)  # [1, 6]
        self._negative: Conditioning | None = None

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # [B, L, D_i]
            pooled = out[0]  # the last encoder's pooled projection [B, P]
        return Conditioning(
            torch.cat(hidden, dim=-1).to(self.dtype),  # [B, L, D_1 + D_2]
            {"text_embeds": pooled.to(self.dtype), "time_ids": self.time_ids.expand(len(prompts), -1)},
        )

    def negative(self) -> Conditioning:
        if self._negative is None:
            empty = self.encode([""])
            if self.force_zeros:
                empty = Conditioning(torch.zeros_like(empty.encoder_hidden_states),
                                     {"text_embeds": torch.zeros_like(empty.added_cond["text_embeds"]),
                                      "time_ids": empty.added_cond["time_ids"]})
            self._negative = empty
        return self._negative
