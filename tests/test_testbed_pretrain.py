"""Testbed pre-training (testbed/pretrain.py): interrupted and resumed from its state, it ends bit for bit where
an uninterrupted run ends; snapshots hand over the EMA weights and leave the run unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shapes.world import sample_batch
from testbed.model import build_testbed_parts
from testbed.pretrain import PretrainOptions, pretrain_denoiser

OPTS = PretrainOptions(steps=4, batch_size=4, warmup=2, save_every=2, snapshot_every=2, log_every=100)


class Interrupted(Exception):
    """Stands in for a kill between two saves."""


def run(tmp: Path, state: Path, fail_at: int | None = None, snapshots: list | None = None) -> list[torch.Tensor]:
    """Pre-train a fresh testbed pipeline with :data:`OPTS`; the scene sampler raises on call ``fail_at``."""
    pipe = build_testbed_parts(tmp / "parts", seed=0)
    calls = []

    def scenes(n, rng):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise Interrupted
        return sample_batch(n, rng)

    def keep(step, unet, text_encoder):
        if snapshots is not None:
            snapshots.append((step, next(unet.parameters()).detach().clone()))

    pretrain_denoiser(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, scenes, OPTS, state, keep)
    return [p.detach().clone() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters()]


def test_pretraining_resumes_bit_for_bit(tmp_path):
    straight = run(tmp_path, tmp_path / "a")
    with pytest.raises(Interrupted):
        run(tmp_path, tmp_path / "b", fail_at=4)  # steps 1-3 ran, the state of step 2 is on disk
    resumed = run(tmp_path, tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(straight, resumed, strict=True))


def test_snapshots_are_the_ema_weights_and_a_changed_option_is_refused(tmp_path):
    shots: list = []
    final = run(tmp_path, tmp_path / "a", snapshots=shots)
    assert [s for s, _ in shots] == [2, 4]
    assert torch.equal(shots[-1][1], final[0])  # the run ends with the EMA weights, as the last snapshot saw them
    other = PretrainOptions(**{**OPTS.__dict__, "lr": 1e-4})
    pipe = build_testbed_parts(tmp_path / "parts", seed=0)
    with pytest.raises(ValueError, match="other options"):
        pretrain_denoiser(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, sample_batch, other,
                          tmp_path / "a")
