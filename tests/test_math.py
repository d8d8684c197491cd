"""Curriculum, history normalisation, selection and the PPO loss on hand-made numbers."""

import pytest
import torch

from srrl.advantages import normalise_with_history, select_samples, shape_advantages, update_history
from srrl.curriculum import stage_plan
from srrl.ppo import ppo_clip_loss


def test_curriculum_published_values():
    plans = [stage_plan(s, 5, 1, 20, 300) for s in range(50)]
    assert [p.resample_num for p in plans[:12]] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert [p.split_step for p in plans[:7]] == [1, 5, 9, 13, 17, 1, 5]
    assert [p.seed for p in plans[:7]] == [300, 301, 302, 303, 304, 300, 301]
    assert plans[-1].resample_num == 9 and plans[-1].split_step == 17
    fixed = stage_plan(7, 5, 1, 20, 300, split_step_override=9, resample_num_override=0)
    assert (fixed.split_step, fixed.resample_num, fixed.seed) == (9, 0, 302)


def test_normalisation_without_history_is_per_prompt_zscore():
    prompts = ["a", "a", "a", "b", "b"]
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 14.0])
    z = normalise_with_history(prompts, r, {}, history_cnt=8)
    torch.testing.assert_close(z[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    s = torch.tensor([10.0, 14.0]).std()
    torch.testing.assert_close(z[3:], torch.tensor([-2.0, 2.0]) / s, atol=1e-6, rtol=0)


def test_normalisation_pools_the_last_history_cnt_stages():
    history = {"a": [[3, [100.0, 100.0]], [4, [0.0, 2.0]], [5, [4.0]]]}
    r = torch.tensor([1.0, 3.0])
    pool = torch.tensor([1.0, 3.0, 0.0, 2.0, 4.0])
    want = (r - pool.mean()) / (pool.std() + 1e-8)
    for window in ("stage", "appearance"):  # stage 6, 2 stages back: 4 and 5; the prompt's last 2 appearances
        z = normalise_with_history(["a", "a"], r, history, 2, stage=6, window=window)
        torch.testing.assert_close(z, want)
        assert update_history(["a", "a"], r, history, 2, 6, window) == {"a": [[5, [4.0]], [6, [1.0, 3.0]]]}
    assert history == {"a": [[3, [100.0, 100.0]], [4, [0.0, 2.0]], [5, [4.0]]]}  # not modified


def test_stage_window_is_keyed_by_stage_not_by_appearance():
    """The minimal case: a prompt seen at stages 0 and 9 with history_cnt 8. The stage window (stages 1..8) holds
    nothing, as in the original code; the appearance window still pools stage 0 (z differs by ~1.9)."""
    history = update_history(["a"] * 3, torch.tensor([0.0, 1.0, 2.0]), {}, 8, stage=0, window="appearance")
    r = torch.tensor([5.0, 6.0, 7.0])
    by_stage = normalise_with_history(["a"] * 3, r, history, 8, stage=9, window="stage")
    torch.testing.assert_close(by_stage, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    by_appearance = normalise_with_history(["a"] * 3, r, history, 8, stage=9, window="appearance")
    pool = torch.tensor([5.0, 6.0, 7.0, 0.0, 1.0, 2.0])
    torch.testing.assert_close(by_appearance, (r - pool.mean()) / (pool.std() + 1e-8))
    assert (by_appearance - by_stage).abs().max() > 1.0
    pruned = update_history(["b"], torch.tensor([1.0]), update_history(["a"], torch.tensor([0.0]), {}, 8, 0), 8, 8)
    assert pruned == {"b": [[8, [1.0]]]}  # stage 0 can no longer be pooled from stage 9 on: dropped


def test_nonfinite_rewards_take_no_part():
    prompts = ["a", "a", "a", "b", "b"]
    r = torch.tensor([1.0, float("nan"), 3.0, float("inf"), 2.0])
    z = normalise_with_history(prompts, r, {}, 8)
    torch.testing.assert_close(z[[0, 2]], torch.tensor([-1.0, 1.0]) / torch.tensor([1.0, 3.0]).std(), atol=1e-6,
                               rtol=0)
    assert torch.isnan(z[[1, 3]]).all() and z[4] == 0
    assert update_history(prompts, r, {}, 8, 0) == {"a": [[0, [1.0, 3.0]]], "b": [[0, [2.0]]]}
    sel = select_samples(torch.tensor([float("nan"), 0.9, -0.8, float("nan"), float("nan")]), 5, 0.5, -0.5)
    assert sel.rows.tolist() == [1, 2]
    from srrl.advantages import select_all

    every = select_all(z)
    assert every.rows.tolist() == [0, 2, 4] and bool(torch.isfinite(every.advantages).all())


def test_history_of_older_runs_is_upgraded():
    from srrl.advantages import upgrade_history

    assert upgrade_history({"a": [[1.0, 2.0], [3.0]]}) == {"a": [[-1, [1.0, 2.0]], [-1, [3.0]]]}
    assert upgrade_history({"a": [[4, [1.0]]]}) == {"a": [[4, [1.0]]]}


def test_equal_scores_give_zero_z_and_no_selection():
    z = normalise_with_history(["p"] * 5, torch.full((5,), 0.7), {}, history_cnt=8)
    assert torch.equal(z, torch.zeros(5))
    sel = select_samples(z, 5, 0.5, -0.5)
    assert sel.rows.numel() == 0 and sel.n_pos == 0 and sel.n_neg == 0


def test_selection_per_group():
    z = torch.tensor([
        0.1, 0.9, -0.2, 0.3, -1.0,   # group 0: pos row 1, neg row 4
        0.6, 0.6, 0.0, 0.0, 0.0,     # group 1: tie -> first argmax (row 5); no negative
        -0.5, -0.4, 0.2, 0.1, 0.0,   # group 2: min -0.5 is not < -0.5; max 0.2 < 0.5 -> nothing
        0.0, 0.0, -0.7, -0.7, 0.4,   # group 3: tie -> first argmin (row 17); no positive
    ])
    sel = select_samples(z, 5, 0.5, -0.5)
    assert sel.rows.tolist() == [1, 4, 5, 17]
    assert (sel.n_pos, sel.n_neg) == (2, 2)
    torch.testing.assert_close(sel.advantages, z[[1, 4, 5, 17]])
    with pytest.raises(ValueError):
        select_samples(torch.zeros(7), 5, 0.5, -0.5)


def test_selection_of_every_positive():
    z = torch.tensor([
        0.1, 0.9, -0.2, 0.5, -1.0,   # group 0: positives rows 1 and 3 (0.5 is at the threshold), neg row 4
        0.6, 0.6, float("nan"), 0.0, 0.0,  # group 1: both tied positives, NaN never picked; no negative
        -0.5, -0.4, 0.2, 0.1, 0.0,   # group 2: nothing
    ])
    sel = select_samples(z, 5, 0.5, -0.5, positives="all")
    assert sel.rows.tolist() == [1, 3, 4, 5, 6]
    assert (sel.n_pos, sel.n_neg) == (4, 1)
    torch.testing.assert_close(sel.advantages, z[[1, 3, 4, 5, 6]])
    assert select_samples(z, 5, 0.5, -0.5).rows.tolist() == [1, 4, 5]  # "best": one positive per group
    with pytest.raises(ValueError, match="select.positives"):
        select_samples(z, 5, 0.5, -0.5, positives="some")


def test_shape_advantages_clips_and_weights():
    z = torch.tensor([7.0, 2.0, 0.0, -1.0, -9.0])
    a = shape_advantages(z, adv_clip_max=5.0, beta1=2.0, beta2=0.5)
    torch.testing.assert_close(a, torch.tensor([10.0, 4.0, 0.0, -0.5, -2.5]))


def test_ppo_loss_on_hand_made_ratios():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5])
    old = torch.zeros(4)
    terms = ppo_clip_loss(ratio.log(), old, adv, clip_range=0.1)
    # per row: max(-A r, -A clip(r)) = [-1.1, -0.5, 1.5, 0.9]
    torch.testing.assert_close(terms.loss, torch.tensor([-1.1, -0.5, 1.5, 0.9]).mean())
    torch.testing.assert_close(terms.clipfrac, torch.tensor(1.0))
    torch.testing.assert_close(terms.approx_kl, 0.5 * (ratio.log() ** 2).mean())


def test_ppo_loss_gradient_at_ratio_one_is_minus_advantage():
    logp = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5])
    terms = ppo_clip_loss(logp, torch.zeros(3), adv, clip_range=0.2)
    terms.loss.backward()
    torch.testing.assert_close(terms.ratio, torch.ones(3))
    torch.testing.assert_close(logp.grad, -adv / 3)


def test_advantage_rules_are_a_registry_and_shape_what_they_select():
    from config.stage_process import get_config
    from srrl.advantages import ADVANTAGE_RULES, StageScores, register_rule

    config = get_config("tiny_sd")
    config.train.beta2, config.train.adv_clip_max = 0.5, 1.0
    scores = StageScores(["a"] * 3 + ["b"] * 3, torch.tensor([0.0, 1.0, 5.0, 2.0, 2.0, 2.5]), 3, stage=0)
    selection, history = ADVANTAGE_RULES["best_worst"](scores, {}, config)
    z = normalise_with_history(scores.prompts, scores.rewards, {}, 8)
    assert selection.rows.tolist() == select_samples(z, 3, 0.5, -0.5).rows.tolist()
    torch.testing.assert_close(selection.advantages, shape_advantages(z[selection.rows], 1.0, 1.0, 0.5))
    assert history == update_history(scores.prompts, scores.rewards, {}, 8, 0)
    every, _ = ADVANTAGE_RULES["all_normalised"](scores, {}, config)
    assert every.rows.tolist() == list(range(6))

    @register_rule("test_only_first")
    def first(scores, history, config):
        return Selection_of_first(scores), history

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_rule("test_only_first")(first)
    finally:
        del ADVANTAGE_RULES["test_only_first"]


def Selection_of_first(scores):  # noqa: N802 -- a tiny rule body for the registry test
    from srrl.advantages import Selection

    return Selection(torch.tensor([0]), scores.rewards[:1], 1, 0)
