"""DDPO, B2-DiffuRL and SRRL (srrl.algorithms) as the trainer runs them on a random testbed pipeline."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import srrl.sampling
import srrl.stage
import srrl.trainer
from shapes.world import SIZE
from srrl.advantages import ADVANTAGE_RULES, select_all
from srrl.algorithms import ALGORITHMS, adapt_plan, get_algorithm
from srrl.curriculum import StagePlan
from srrl.families.sd import load_sd_model
from srrl.sampling import GuidedDenoiser
from srrl.stage import sample_stage
from srrl.validate import ConfigError
from tests.conftest import TESTBED_SPLIT_TIME, TESTBED_STEPS, tiny_testbed_config

CPU = torch.device("cpu")
NUM_STEPS = TESTBED_STEPS
SPLIT_TIME = TESTBED_SPLIT_TIME
ROWS = 2  # prompts per stage (sample.batch_size x num_batches_per_epoch)


@dataclass
class Observed:
    """What one run did, recorded by wrapping the trainer's collaborators."""

    run_dir: Path | None = None
    metrics: list[dict] = field(default_factory=list)
    sampled: list[dict] = field(default_factory=list)  # per stage: plan, fork, traj, images
    reflect_rounds: list[int] = field(default_factory=list)
    invert_calls: int = 0
    selections: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (selector, rows)
    trained: list[tuple[int, int]] = field(default_factory=list)  # (samples, kept steps) per ppo_update


def observe_run(config) -> Observed:
    obs = Observed()
    orig_sample, orig_reflect = srrl.trainer.sample_stage, srrl.stage.reflect
    orig_invert, orig_ppo = srrl.sampling.invert, srrl.trainer.ppo_update
    orig_rules = dict(ADVANTAGE_RULES)

    def sample(*args, **kwargs):
        traj, images = orig_sample(*args, **kwargs)
        obs.sampled.append({"plan": args[3], "fork": kwargs.get("fork", True), "traj": traj, "images": images})
        return traj, images

    def reflect(*args, **kwargs):
        obs.reflect_rounds.append(args[5])
        return orig_reflect(*args, **kwargs)

    def invert(*args, **kwargs):
        obs.invert_calls += 1
        return orig_invert(*args, **kwargs)

    def ppo(*args, **kwargs):
        samples = args[6]
        obs.trained.append(tuple(samples.latents.shape[:2]))
        return orig_ppo(*args, **kwargs)

    def observing(name: str):
        def rule(*args, **kwargs):
            selection, history = orig_rules[name](*args, **kwargs)
            obs.selections.append((name, selection.rows))
            return selection, history

        return rule

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(srrl.trainer, "sample_stage", sample)
        mp.setattr(srrl.stage, "reflect", reflect)
        mp.setattr(srrl.sampling, "invert", invert)
        mp.setattr(srrl.trainer, "ppo_update", ppo)
        for name in orig_rules:
            mp.setitem(ADVANTAGE_RULES, name, observing(name))
        obs.run_dir = srrl.trainer.train(config)
    obs.metrics = [json.loads(line) for line in (obs.run_dir / "metrics.jsonl").read_text().splitlines()]
    return obs


@pytest.fixture(scope="module")
def runs(testbed_pipe_dir, tmp_path_factory):
    """algorithm -> Observed, each run once on first use."""
    cache: dict[str, Observed] = {}

    def get(algorithm: str) -> Observed:
        if algorithm not in cache:
            tmp = tmp_path_factory.mktemp(algorithm)
            cache[algorithm] = observe_run(tiny_testbed_config(testbed_pipe_dir, tmp, algorithm))
        return cache[algorithm]

    return get


def first_latents(obs: Observed, stage: int) -> torch.Tensor:
    return obs.sampled[stage]["traj"].latents[:, 0]  # [N, C, h, w]: x_t before the first kept step


def expected_unet_calls(m: dict) -> int:
    """Sampling (one doubled-batch call per step, plus denoise + invert per reflection round) and training
    (one call per micro-batch of train.batch_size=2 and kept step, one epoch)."""
    sampling = NUM_STEPS * (1 + 2 * m["resample_num"])
    training = math.ceil((m["n_pos"] + m["n_neg"]) / 2) * m["split_step"]
    return sampling + training


# ---------------------------------------------------------------------------------------- DDPO
def test_ddpo_independent_trajectories_all_trained_no_reflection(runs):
    obs = runs("ddpo")
    assert [m["stage"] for m in obs.metrics] == [0, 1]
    n = ROWS * SPLIT_TIME
    for stage, m in enumerate(obs.metrics):
        assert m["split_step"] == NUM_STEPS and m["resample_num"] == 0
        assert m["n_pos"] + m["n_neg"] == n
        assert m["unet_calls"] == expected_unet_calls(m)
        s = obs.sampled[stage]
        assert s["fork"] is False and s["plan"].split_step == NUM_STEPS and s["plan"].resample_num == 0
        traj = s["traj"]
        assert traj.latents.shape[:2] == (n, NUM_STEPS) and traj.timesteps.numel() == NUM_STEPS
        assert len(traj.prompts) == n and traj.prompts[0] == traj.prompts[1] == traj.prompts[2]
        x0 = first_latents(obs, stage)  # the initial noise of every image: all different
        for i in range(n):
            for j in range(i + 1, n):
                assert not torch.allclose(x0[i], x0[j]), (stage, i, j)
    assert obs.reflect_rounds == [0, 0] and obs.invert_calls == 0
    assert [name for name, _ in obs.selections] == ["all_normalised"] * 2
    assert all(rows.tolist() == list(range(n)) for _, rows in obs.selections)
    assert obs.trained == [(n, NUM_STEPS)] * 2  # every trajectory, every step


# ----------------------------------------------------------------------------------- B2-DiffuRL
def check_forked_and_selected(obs: Observed) -> None:
    n = ROWS * SPLIT_TIME
    for stage, m in enumerate(obs.metrics):
        assert m["split_step"] == 1  # stage_cnt=1: the curriculum's split_left at every stage
        assert m["unet_calls"] == expected_unet_calls(m)
        assert m["n_pos"] <= ROWS and m["n_neg"] <= ROWS and m["n_pos"] + m["n_neg"] < n
        s = obs.sampled[stage]
        assert s["fork"] is True
        traj = s["traj"]
        assert traj.latents.shape[:2] == (n, 1) and traj.timesteps.numel() == 1
        x = first_latents(obs, stage).reshape(ROWS, SPLIT_TIME, -1)
        for g in range(ROWS):  # siblings share the prefix up to the fork, exactly
            assert all(torch.equal(x[g, 0], x[g, k]) for k in range(1, SPLIT_TIME))
        assert not torch.allclose(x[0, 0], x[1, 0])
        finals = traj.final_latents.reshape(ROWS, SPLIT_TIME, -1)
        assert not torch.allclose(finals[0, 0], finals[0, 1])  # and differ after it
    assert [name for name, _ in obs.selections] == ["best_worst"] * 2
    for (_, rows), m in zip(obs.selections, obs.metrics, strict=True):
        groups = (rows // SPLIT_TIME).tolist()
        assert all(groups.count(g) <= 2 for g in set(groups)) and len(rows) == m["n_pos"] + m["n_neg"]
    selected = [len(rows) for _, rows in obs.selections if len(rows)]
    assert [t[0] for t in obs.trained] == selected and all(t[1] == 1 for t in obs.trained)
    assert sum(selected) > 0  # the graded reward makes the thresholds pass somewhere


def test_b2diffurl_forks_selects_and_never_reflects(runs):
    obs = runs("b2diffurl")
    check_forked_and_selected(obs)
    assert [m["resample_num"] for m in obs.metrics] == [0, 0]
    assert [s["plan"].resample_num for s in obs.sampled] == [0, 0]
    assert all(r == 0 for r in obs.reflect_rounds) and obs.invert_calls == 0


# ---------------------------------------------------------------------------------------- SRRL
def test_srrl_forks_selects_and_reflects_at_stage_one(runs):
    obs = runs("srrl")
    check_forked_and_selected(obs)
    assert [m["resample_num"] for m in obs.metrics] == [0, 1]
    assert obs.reflect_rounds == [0, 1]
    assert obs.invert_calls == 1  # one round: one inversion


def test_same_sample_budget_for_every_algorithm(runs):
    shapes = {a: [tuple(s["images"].shape) for s in runs(a).sampled] for a in ALGORITHMS}
    expected = [(ROWS * SPLIT_TIME, 3, SIZE, SIZE)] * 2
    assert all(v == expected for v in shapes.values()), shapes
    for a in ALGORITHMS:
        obs = runs(a)
        assert [len(s["traj"].prompts) for s in obs.sampled] == [ROWS * SPLIT_TIME] * 2
        config = json.loads((obs.run_dir / "config.json").read_text())
        assert config["algorithm"] == a


# ------------------------------------------------------------------------------ train.timestep_window
def test_timestep_window_trains_only_the_first_kept_steps(testbed_pipe_dir, tmp_path):
    window = 2
    obs = observe_run(tiny_testbed_config(testbed_pipe_dir, tmp_path, "grpo", **{"train.timestep_window": window}))
    n = ROWS * SPLIT_TIME
    assert obs.trained == [(n, window)] * 2  # every trajectory, only the first two of its four steps
    for m in obs.metrics:
        assert m["split_step"] == NUM_STEPS
        sampling = NUM_STEPS * (1 + 2 * m["resample_num"])
        assert m["unet_calls"] == sampling + math.ceil((m["n_pos"] + m["n_neg"]) / 2) * window


def test_same_latent_shares_x_T_within_a_group_without_a_fork(testbed_pipe_dir, tmp_path):
    obs = observe_run(tiny_testbed_config(testbed_pipe_dir, tmp_path, "grpo", **{"sample.same_latent": True}))
    n = ROWS * SPLIT_TIME
    assert obs.trained == [(n, NUM_STEPS)] * 2  # every trajectory, every step, as grpo without it
    for stage in range(2):
        s = obs.sampled[stage]
        assert s["fork"] is True and s["plan"].split_step == NUM_STEPS
        x = first_latents(obs, stage).reshape(ROWS, SPLIT_TIME, -1)
        assert all(torch.equal(x[g, 0], x[g, k]) for g in range(ROWS) for k in range(1, SPLIT_TIME))
        assert not torch.equal(x[0, 0], x[1, 0])
        finals = s["traj"].final_latents.reshape(ROWS, SPLIT_TIME, -1)
        assert not torch.allclose(finals[0, 0], finals[0, 1])  # the step noise differs from the first step on
    assert [name for name, _ in obs.selections] == ["group_normalised"] * 2


def test_first_kept_steps_slices_every_per_step_tensor():
    traj = srrl.sampling.Trajectories(
        prompts=["a"] * 2, cond=None, timesteps=torch.tensor([999, 749, 499, 249]),
        latents=torch.randn(2, 4, 3, 2, 2), next_latents=torch.randn(2, 4, 3, 2, 2), log_probs=torch.randn(2, 4),
        final_latents=None, eta=1.0, guidance_scale=4.0, group_size=1)
    cut = srrl.sampling.first_kept_steps(traj, 3)
    assert cut.timesteps.tolist() == [999, 749, 499]
    assert torch.equal(cut.latents, traj.latents[:, :3]) and torch.equal(cut.next_latents, traj.next_latents[:, :3])
    assert torch.equal(cut.log_probs, traj.log_probs[:, :3]) and cut.eta == 1.0 and cut.group_size == 1
    assert srrl.sampling.first_kept_steps(traj, 0) is traj and srrl.sampling.first_kept_steps(traj, 4) is traj
    assert srrl.sampling.first_kept_steps(traj, -1).timesteps.tolist() == [999, 749, 499]  # all but the last
    assert srrl.sampling.first_kept_steps(traj, -9).timesteps.tolist() == [999]  # never fewer than one


# ------------------------------------------------------------------------------ sample_stage fork=False
def test_sample_stage_without_fork_is_batching_independent(testbed_pipe_dir, tmp_path):
    config = tiny_testbed_config(testbed_pipe_dir, tmp_path, "ddpo")
    model = load_sd_model(config, CPU, torch.float32)
    plan = StagePlan(stage=0, resample_num=0, split_step=NUM_STEPS, seed=3)
    both, images = sample_stage(model, GuidedDenoiser(model.denoiser, 64), config, plan,
                                ["a red circle", "a blue square"], [0, 1], CPU, fork=False)
    second, _ = sample_stage(model, GuidedDenoiser(model.denoiser, 64), config, plan, ["a blue square"], [1], CPU,
                             fork=False)
    assert images.shape == (6, 3, SIZE, SIZE)
    assert both.prompts == ["a red circle"] * 3 + ["a blue square"] * 3
    torch.testing.assert_close(both.latents[3:], second.latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both.final_latents[3:], second.final_latents, atol=1e-4, rtol=1e-4)
    forked, _ = sample_stage(model, GuidedDenoiser(model.denoiser, 64), config, plan, ["a red circle"], [0], CPU,
                             fork=True)
    assert all(torch.equal(forked.latents[0, 0], forked.latents[k, 0]) for k in range(3))
    assert not any(torch.equal(both.latents[0, 0], both.latents[k, 0]) for k in range(1, 3))


# ------------------------------------------------------------------------------------ config checks
@pytest.mark.parametrize("overrides, field", [
    ({"algorithm": "nope"}, "algorithm"),
    ({"algorithm": "b2diffurl", "resample_num": 2}, "resample_num"),
    ({"algorithm": "ddpo", "resample_num": 1}, "resample_num"),
])  # fmt: skip
def test_bad_algorithm_settings_fail_before_the_run_directory(testbed_pipe_dir, tmp_path, overrides, field):
    config = tiny_testbed_config(testbed_pipe_dir, tmp_path, "srrl", resample_num=overrides.get("resample_num", -1))
    config.algorithm = overrides["algorithm"]

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for an invalid config")

    with pytest.raises(ConfigError, match=field) as err:
        srrl.trainer.train(config, no_model)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("algorithm, resample_num", [("srrl", 2), ("b2diffurl", 0), ("ddpo", -1)])
def test_allowed_resample_settings_validate(testbed_pipe_dir, tmp_path, algorithm, resample_num):
    from rewards.rewards import known_rewards
    from srrl.validate import validate_config

    validate_config(tiny_testbed_config(testbed_pipe_dir, tmp_path, algorithm, resample_num=resample_num),
                    known_rewards)


# ----------------------------------------------------------------------------------------- units
def test_get_algorithm_flags():
    assert ALGORITHMS == ("srrl", "b2diffurl", "ddpo", "grpo")
    flags = {a: (get_algorithm(a).fork, get_algorithm(a).rule, get_algorithm(a).reflect) for a in ALGORITHMS}
    assert flags == {"srrl": (True, "best_worst", True), "b2diffurl": (True, "best_worst", False),
                     "ddpo": (False, "all_normalised", False), "grpo": (False, "group_normalised", False)}
    assert all(get_algorithm(a).rule in ADVANTAGE_RULES for a in ALGORITHMS)
    assert all(get_algorithm(a).name == a for a in ALGORITHMS)
    with pytest.raises(ValueError, match="'nope'.*srrl, b2diffurl, ddpo, grpo"):
        get_algorithm("nope")


def test_adapt_plan():
    plan = StagePlan(stage=7, resample_num=2, split_step=5, seed=11)
    assert adapt_plan(plan, get_algorithm("srrl"), 20) == plan
    assert adapt_plan(plan, get_algorithm("b2diffurl"), 20) == StagePlan(7, 0, 5, 11)
    assert adapt_plan(plan, get_algorithm("ddpo"), 20) == StagePlan(7, 0, 20, 11)
    assert plan == StagePlan(7, 2, 5, 11)  # not modified


def test_trainer_plans_follow_the_algorithm(testbed_pipe_dir, tmp_path):
    """SRRLTrainer.plan = curriculum + adapt_plan (checked without building a trainer)."""
    for algorithm, expected in [("srrl", [(0, 1), (1, 1), (2, 1)]), ("b2diffurl", [(0, 1)] * 3),
                                ("ddpo", [(0, NUM_STEPS)] * 3)]:
        config = tiny_testbed_config(testbed_pipe_dir, tmp_path, algorithm)
        fake = type("T", (), {"config": config, "algorithm": get_algorithm(algorithm)})()
        plans = [srrl.trainer.SRRLTrainer.plan(fake, s) for s in range(3)]
        assert [(p.resample_num, p.split_step) for p in plans] == expected, algorithm


def test_select_all():
    z = torch.tensor([0.5, -0.2, 0.0, 1.5, -1.0])
    sel = select_all(z)
    assert sel.rows.tolist() == [0, 1, 2, 3, 4] and sel.rows.dtype == torch.long
    assert torch.equal(sel.advantages, z)
    assert sel.n_pos == 2 and sel.n_neg == 3  # z == 0 counts as negative, like select_samples
    sel.advantages[0] = 9.0
    assert z[0] == 0.5  # a copy
    empty = select_all(torch.zeros(0))
    assert empty.rows.numel() == 0 and empty.n_pos == empty.n_neg == 0
