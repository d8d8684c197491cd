"""The trust-region probe (srrl/trust.py): hand-made log-prob changes, the wrong-way warning, and a stage run with
the probe on that trains exactly as without it and logs its figures."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from srrl.trainer import SRRLTrainer
from srrl.trust import StepShift, TrustProbe, log_prob_shift
from tests.conftest import fast_config
from tests.test_reliability import strict_records


def test_log_prob_shift_splits_rows_by_the_sign_of_the_advantage():
    before = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    after = torch.tensor([0.5, 1.5, 1.0, 3.0, 9.0])
    adv = torch.tensor([2.0, 1.0, -1.0, -3.0, 0.0])  # the A == 0 row moves most and takes no part
    shift = log_prob_shift(before, after, adv)
    assert shift.pos == pytest.approx(0.5) and shift.neg == pytest.approx(-0.5)
    assert not shift.wrong_way
    assert StepShift(-0.1, None).wrong_way and StepShift(None, 0.2).wrong_way and not StepShift(None, None).wrong_way


def test_probe_measures_taken_steps_only_and_warns_when_the_stage_goes_the_wrong_way(caplog):
    probe = TrustProbe()
    moves = {"a": torch.tensor([-0.2, -0.2]), "b": torch.tensor([0.1, 0.3])}  # after-step log-probs per micro-step
    probe.remember("a", torch.zeros(2), torch.tensor([1.0, 1.0]))
    probe.remember("b", torch.zeros(2), torch.tensor([-1.0, -1.0]))
    shift = probe.after_step(lambda micro: moves[micro], taken=True)
    assert shift.pos == pytest.approx(-0.2) and shift.neg == pytest.approx(0.2) and shift.wrong_way
    assert not probe.pending
    probe.remember("a", torch.zeros(2), torch.tensor([1.0, 1.0]))
    assert probe.after_step(lambda micro: 1 / 0, taken=False) is None  # a skipped step is not recomputed
    with caplog.at_level(logging.WARNING, logger="srrl.trust"):
        summary = probe.summary(stage=3)
    assert summary == {"dlogp_pos": pytest.approx(-0.2), "dlogp_neg": pytest.approx(0.2),
                       "dlogp_gap": pytest.approx(-0.4), "trust_wrong_steps": 1}
    assert "stage 3" in caplog.text and "against the advantages" in caplog.text


def test_probe_in_a_stage_logs_its_figures_and_leaves_training_unchanged(tiny_pipe_dir, tmp_path):
    """One stage with and without the probe: the same LoRA weights bit for bit; with it, the stage record holds
    finite log-prob changes for the positives and negatives it trained."""
    weights, records = [], []
    for probe in (False, True):
        config = fast_config(tiny_pipe_dir, tmp_path / str(probe), **{
            "curriculum.total_stages": 1, "eval.every": 0, "select.pos_threshold": 0.0,
            "select.neg_threshold": 0.0, "train.trust_probe": probe})  # fmt: skip
        trainer = SRRLTrainer(config)
        trainer.run()
        weights.append([p.detach().clone() for p in trainer.params])
        (record,) = strict_records(trainer.run_dir / "metrics.jsonl")
        records.append(record)
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    assert "dlogp_pos" not in records[0]
    with_probe = records[1]
    assert with_probe["optimizer_steps"] >= 1
    assert math.isfinite(with_probe["dlogp_pos"]) and math.isfinite(with_probe["dlogp_neg"])
    assert with_probe["dlogp_gap"] is None or math.isfinite(with_probe["dlogp_gap"])
    assert 0 <= with_probe["trust_wrong_steps"] <= with_probe["optimizer_steps"]
