"""bench/gradient_snr.py: the policy-gradient signal diagnostic, on a random testbed pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli.wiring import trainer_for
from tests.conftest import TESTBED_SPLIT_TIME, load_script, tiny_testbed_config

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    return load_script(ROOT / "bench" / "gradient_snr.py")


def test_mean_cos_by_hand():
    snr = load_bench()
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([3.0, 3.0])
    expected = (0.0 + 2**-0.5 + 2**-0.5) / 3
    assert snr.mean_cos([a, b, c]) == pytest.approx(expected)


def test_window_gradient_is_linear_in_the_advantages_and_zero_without_them(testbed_pipe_dir, tmp_path):
    snr = load_bench()
    config = tiny_testbed_config(testbed_pipe_dir, tmp_path, "grpo", **{"curriculum.total_stages": 1})
    trainer = trainer_for(config)
    try:
        traj, adv, _ = snr.sample_batch(trainer, config, 0, shared_noise=True)
        assert adv.numel() == 2 * TESTBED_SPLIT_TIME
        x = traj.latents[:, 0].reshape(2, TESTBED_SPLIT_TIME, -1)
        assert all(torch.equal(x[g, 0], x[g, k]) for g in range(2) for k in range(TESTBED_SPLIT_TIME))
        adv = torch.linspace(-1.0, 1.0, adv.numel())  # every row trained
        g1 = snr.window_gradient(trainer, traj, adv, range(0, 3), 4)
        g2 = snr.window_gradient(trainer, traj, 2 * adv, range(0, 3), 4)
        assert g1.norm() > 0 and torch.allclose(g2, 2 * g1, rtol=1e-4, atol=1e-10)
        assert snr.window_gradient(trainer, traj, torch.zeros_like(adv), range(0, 3), 4).norm() == 0
        result = snr.measure(trainer, config, [range(0, 2), range(2, 4)], 2, shared_noise=False)
        assert set(result["windows"]) == {"0:2", "2:4"} and result["trajectories_per_batch"] == adv.numel()
        assert result["windows"]["0:2"]["mean_cos"] < 0.9999  # batches drawn from different seeds
        assert all(-1 <= w["mean_cos"] <= 1 and w["norm"] > 0 for w in result["windows"].values()), result
    finally:
        trainer.lock.release()
