"""fp16 loss scaling: an overflowing step is skipped through the scaler (the scale halves, training goes on), counted
apart from the non-finite guard, stops the run only when the scale collapses below the floor, and the scaler's
state survives resume. accelerate gives no scaler on the CPU, so a real ``torch.amp.GradScaler("cpu")`` is put
where the trainer takes it from: the accelerator (whose ``backward`` then scales the loss with it)."""

from __future__ import annotations

import math

import pytest
import torch

import srrl.trainer
from srrl.errors import TrainingError
from srrl.optimstep import MIN_LOSS_SCALE
from srrl.trainer import SRRLTrainer
from tests.conftest import fast_config
from tests.test_reliability import strict_records

STAGE = {"eval.every": 0, "select.pos_threshold": 0.0, "select.neg_threshold": 0.0}


def scaled_trainer(monkeypatch, pipe_dir, tmp_path, init_scale: float, **overrides) -> SRRLTrainer:
    """A trainer whose accelerator holds a real CPU GradScaler starting at ``init_scale``."""
    make = srrl.trainer.make_accelerator

    def with_scaler(*args, **kwargs):
        accelerator = make(*args, **kwargs)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        return accelerator

    monkeypatch.setattr(srrl.trainer, "make_accelerator", with_scaler)
    return SRRLTrainer(fast_config(pipe_dir, tmp_path, **{**STAGE, **overrides}))


def set_grads(trainer: SRRLTrainer, overflow: bool) -> None:
    """Gradients as a scaled backward leaves them: ``scale * g`` (g ~ 1e-3), or with one infinite element."""
    scale = float(trainer.scaler.scale(torch.tensor(1.0)))  # as accelerator.backward scales the loss
    for k, p in enumerate(trainer.params):
        p.grad = torch.full_like(p, 1e-3 * scale)
        if overflow and k == 0:
            p.grad.view(-1)[0] = float("inf")
    trainer.acc.micro_steps = 1


def test_fp16_scaler_overflows_halve_the_scale_then_steps_are_taken(tiny_pipe_dir, tmp_path, monkeypatch):
    """Five overflows in a row (more than the guard's three) raise nothing, leave weights and AdamW untouched and
    halve the scale each time; the finite steps after them move the weights and keep everything finite."""
    trainer = scaled_trainer(monkeypatch, tiny_pipe_dir, tmp_path, init_scale=2.0**10)
    before = [p.detach().clone() for p in trainer.params]
    for k in range(5):
        set_grads(trainer, overflow=True)
        assert trainer._optimizer_step() is None
        assert trainer.scaler.get_scale() == 2.0 ** (9 - k)
    assert all(torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True))
    assert not trainer.optimizer.state_dict()["state"]
    for _ in range(3):
        set_grads(trainer, overflow=False)
        norm = trainer._optimizer_step()
        assert norm is not None and math.isfinite(norm)
    assert trainer.scaler.get_scale() == 2.0**5
    assert any(not torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True))
    assert all(bool(torch.isfinite(p).all()) for p in trainer.params)
    for state in trainer.optimizer.state_dict()["state"].values():
        assert all(bool(torch.isfinite(v).all()) for v in state.values())
    counts = trainer.step_guard.counts
    assert (counts.overflows, counts.skipped, counts.consecutive) == (5, 0, 0)


def test_fp16_scale_below_the_floor_stops_the_run_in_one_line(tiny_pipe_dir, tmp_path, monkeypatch):
    trainer = scaled_trainer(monkeypatch, tiny_pipe_dir, tmp_path, init_scale=2 * MIN_LOSS_SCALE)
    set_grads(trainer, overflow=True)
    trainer._optimizer_step()  # 2 -> 1: at the floor, not below it
    set_grads(trainer, overflow=True)
    with pytest.raises(TrainingError, match="below the floor") as err:
        trainer._optimizer_step()
    assert "\n" not in str(err.value)


def poison_first_backwards(trainer: SRRLTrainer, monkeypatch, n: int) -> None:
    """Make the first ``n`` backward calls leave an infinite gradient element (a real fp16 overflow's trace)."""
    backward, calls = trainer.accelerator.backward, []

    def overflowing(loss, **kwargs):
        backward(loss, **kwargs)
        calls.append(1)
        if len(calls) <= n:
            with torch.no_grad():
                trainer.params[0].grad.view(-1)[0] = float("inf")

    monkeypatch.setattr(trainer.accelerator, "backward", overflowing)


def test_fp16_overflow_in_a_stage_is_counted_in_the_metrics(tiny_pipe_dir, tmp_path, monkeypatch):
    """A stage whose first backward overflows: one overflow step, no guard skip, the halved scale in the record,
    finite weights, and the run goes on to its end."""
    trainer = scaled_trainer(monkeypatch, tiny_pipe_dir, tmp_path, init_scale=2.0**8,
                             **{"curriculum.total_stages": 2})
    poison_first_backwards(trainer, monkeypatch, 1)
    trainer.run()
    first, second = strict_records(trainer.run_dir / "metrics.jsonl")
    assert first["overflow_steps"] == 1 and first["skipped_steps"] == 0
    assert first["loss_scale"] == 2.0**7 and first["optimizer_steps"] >= 1
    assert second["overflow_steps"] == 0 and second["loss_scale"] == 2.0**7
    assert all(bool(torch.isfinite(p).all()) for p in trainer.params)


def test_fp16_scaler_state_is_restored_on_resume(tiny_pipe_dir, tmp_path, monkeypatch):
    """The checkpoint keeps the scale that overflows lowered; a resumed run starts from it, not from init_scale."""
    trainer = scaled_trainer(monkeypatch, tiny_pipe_dir, tmp_path, init_scale=2.0**8,
                             **{"curriculum.total_stages": 1})
    poison_first_backwards(trainer, monkeypatch, 2)
    trainer.run()
    saved = trainer.scaler.get_scale()
    assert saved <= 2.0**7
    trainer.lock.release()
    resumed = scaled_trainer(monkeypatch, tiny_pipe_dir, tmp_path, init_scale=2.0**8,
                             **{"curriculum.total_stages": 2, "resume_from": str(trainer.run_dir)})
    assert resumed.start_stage == 1 and resumed.scaler.get_scale() == saved
