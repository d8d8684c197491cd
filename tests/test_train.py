"""End-to-end runs on a tiny random pipeline: the run-directory contract, LoRA export, resume, edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

import srrl.objectives.ppo
import srrl.stage
import srrl.update
from config.stage_process import get_config
from srrl.models import load_lora
from srrl.ppo import ppo_clip_loss
from srrl.trainer import SRRLTrainer, train, warmup_factor
from tests.conftest import fast_config, loader

METRIC_KEYS = {
    "stage", "split_step", "resample_num", "seed", "reward_mean", "reward_std", "n_pos", "n_neg", "loss",
    "approx_kl", "clipfrac", "grad_norm", "optimizer_steps", "nonfinite_steps", "time_sample_s", "time_reward_s",
    "time_train_s", "time_stage_s",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def lora_weights(run_dir: Path, stage: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"stage_{stage:03d}" / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def finished_run(family, family_pipe_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    return train(fast_config(family_pipe_dir, tmp), loader(family))


def test_run_directory_contract(finished_run):
    run = finished_run
    config = json.loads((run / "config.json").read_text())
    assert config["curriculum"]["total_stages"] == 2
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["stage"] for m in metrics] == [0, 1]
    for m in metrics:
        assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
    assert [m["split_step"] for m in metrics] == [2, 3]  # split_left + floor(i * 3 / 2)
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["after_stage"] for e in evals] == [-1, 0, 1]
    assert all(e["n"] == 2 and {"reward_mean", "reward_std"} <= set(e) for e in evals)
    history = json.loads((run / "history.json").read_text())
    assert set(history) <= {"a green ring", "a yellow triangle"} and all(len(v) == 2 for v in history.values())
    assert (run / "images" / "stage_000.png").is_file() and (run / "images" / "stage_001.png").is_file()
    assert (run / "curves.png").is_file()
    ckpt = run / "checkpoints" / "stage_001"
    assert {"pytorch_lora_weights.safetensors", "state.json", "optimizer.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert not list(run.rglob("*.pkl")) and not list(run.rglob("*.tmp"))
    assert any(m["optimizer_steps"] > 0 for m in metrics)


def test_lora_loads_into_stock_pipeline_and_changes_output(finished_run, family, family_pipe_dir):
    def generate(pipe):
        return pipe("a red circle", num_inference_steps=3, guidance_scale=1.0, height=16, width=16,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    pipe_class = StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline
    pipe = pipe_class.from_pretrained(family_pipe_dir)
    before = generate(pipe)
    pipe.load_lora_weights(finished_run / "checkpoints" / "stage_001")
    after = generate(pipe)
    assert (after - before).abs().max() > 1e-4


def test_resume_after_a_crash_equals_uninterrupted_run(family, family_pipe_dir, tmp_path, monkeypatch, finished_run):
    config = fast_config(family_pipe_dir, tmp_path)
    original = srrl.update.ppo_update

    def crash_in_stage_1(*args, **kwargs):
        plan = args[5]
        if plan.stage == 1:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr("srrl.trainer.ppo_update", crash_in_stage_1)
    with pytest.raises(KeyboardInterrupt):
        train(config, loader(family))
    run = Path(config.save_path) / config.exp_name
    assert [m["stage"] for m in read_jsonl(run / "metrics.jsonl")] == [0]
    state = json.loads((run / "checkpoints" / "stage_000" / "state.json").read_text())
    assert 0 < state["lr_scheduler"]["last_epoch"] < config.train.lr_warmup_steps  # resumed mid-warmup
    monkeypatch.setattr("srrl.trainer.ppo_update", original)
    resumed = fast_config(family_pipe_dir, tmp_path, resume_from=str(run))
    assert train(resumed, loader(family)) == run
    got, want = read_jsonl(run / "metrics.jsonl"), read_jsonl(finished_run / "metrics.jsonl")
    assert [m["stage"] for m in got] == [0, 1]
    for a, b in zip(got, want, strict=True):
        for key in ("reward_mean", "n_pos", "n_neg", "loss", "optimizer_steps"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert [e["after_stage"] for e in read_jsonl(run / "eval.jsonl")] == [-1, 0, 1]
    w_resumed, w_full = lora_weights(run, 1), lora_weights(finished_run, 1)
    assert w_resumed.keys() == w_full.keys()
    for key in w_full:
        torch.testing.assert_close(w_resumed[key], w_full[key], atol=1e-5, rtol=0)


def test_last_stage_is_evaluated_off_the_schedule(tiny_pipe_dir, tmp_path):
    """A run whose length is not a multiple of eval.every still ends with a held-out evaluation."""
    config = fast_config(tiny_pipe_dir, tmp_path, **{"curriculum.total_stages": 3, "eval.every": 2})
    run = train(config, loader("sd"))
    assert [e["after_stage"] for e in read_jsonl(run / "eval.jsonl")] == [-1, 1, 2]


def test_empty_selection_skips_the_update(tiny_pipe_dir, tmp_path):
    config = fast_config(tiny_pipe_dir, tmp_path, **{"select.pos_threshold": 50.0, "select.neg_threshold": -50.0,
                                                      "curriculum.total_stages": 1, "eval.every": 0})
    run = train(config)
    (m,) = read_jsonl(run / "metrics.jsonl")
    assert (m["n_pos"], m["n_neg"], m["optimizer_steps"], m["loss"]) == (0, 0, 0, None)


def test_nonfinite_loss_is_skipped_and_counted(tiny_pipe_dir, tmp_path, monkeypatch):
    original = srrl.objectives.ppo.ppo_clip_loss

    def nan_loss(*args, **kwargs):
        terms = original(*args, **kwargs)
        return type(terms)(terms.loss * float("nan"), terms.ratio, terms.approx_kl, terms.clipfrac)

    monkeypatch.setattr("srrl.objectives.ppo.ppo_clip_loss", nan_loss)
    config = fast_config(tiny_pipe_dir, tmp_path, **{"curriculum.total_stages": 1, "eval.every": 0})
    trainer = SRRLTrainer(config)
    before = {k: v.clone() for k, v in trainer.model.denoiser.named_parameters() if v.requires_grad}
    trainer.run()
    (m,) = read_jsonl(trainer.run_dir / "metrics.jsonl")
    assert m["nonfinite_steps"] > 0 and m["optimizer_steps"] == 0
    for k, v in trainer.model.denoiser.named_parameters():
        if v.requires_grad:
            assert torch.equal(v, before[k])


def test_partial_accumulation_is_kept_across_stages_or_flushed(tiny_pipe_dir, tmp_path):
    kept = train(fast_config(tiny_pipe_dir, tmp_path / "a", **{"train.gradient_accumulation_steps": 1000,
                                                              "eval.every": 0}))
    metrics = read_jsonl(kept / "metrics.jsonl")
    assert all(m["optimizer_steps"] == 0 for m in metrics)
    assert metrics[1]["pending_sample_steps"] > metrics[0]["pending_sample_steps"] > 0
    flushed = train(fast_config(tiny_pipe_dir, tmp_path / "b", **{"train.gradient_accumulation_steps": 1000,
                                                                 "train.flush_accumulation_at_stage_end": True,
                                                                 "eval.every": 0}))
    metrics = read_jsonl(flushed / "metrics.jsonl")
    assert all(m["optimizer_steps"] == 1 and m["pending_sample_steps"] == 0 for m in metrics if m["n_pos"] + m["n_neg"])


def test_target_kl_ends_the_update_after_the_first_step_that_moved_the_policy(tiny_pipe_dir, tmp_path):
    """The first optimizer step's micro-steps run at the sampling policy (KL 0); the next window's KL is > 0, so
    with a tiny target the update stops right after the second optimizer step."""
    overrides = {"curriculum.total_stages": 1, "eval.every": 0, "select.pos_threshold": 0.0,
                 "select.neg_threshold": 0.0, "train.num_epochs": 2}
    (free,) = read_jsonl(train(fast_config(tiny_pipe_dir, tmp_path / "a", **overrides)) / "metrics.jsonl")
    stopped_run = train(fast_config(tiny_pipe_dir, tmp_path / "b", **overrides, **{"train.target_kl": 1e-12}))
    (stopped,) = read_jsonl(stopped_run / "metrics.jsonl")
    assert free["optimizer_steps"] > 2 and free["stopped_early"] == 0
    assert stopped["optimizer_steps"] == 2 and stopped["stopped_early"] == 1


def test_trained_rows_leave_out_zero_advantage_and_padding():
    rows, adv, weights = torch.tensor([4, 7, 1, 3]), torch.tensor([0.5, 0.0, -0.0, -1.0]), torch.tensor([0.25] * 4)
    weights[3] = 0.0  # padding
    kept = srrl.update.trained_rows(rows, adv, weights)
    assert kept[0].tolist() == [4] and kept[1].tolist() == [0.5] and kept[2].tolist() == [0.25]
    none_live = srrl.update.trained_rows(rows[1:3], adv[1:3], weights[1:3])  # one row kept: DDP runs every micro-step
    assert none_live[0].tolist() == [7] and none_live[1].tolist() == [0.0]


def record_update(tiny_pipe_dir, run_dir, overrides, monkeypatch) -> tuple[list[list[torch.Tensor]], list[int], dict]:
    """Run one stage; return the accumulated gradients at every optimizer step, the rows of every loss call
    (= UNet training call) and the stage's metrics."""
    rows_seen: list[int] = []

    def counting_loss(log_prob, *args, **kwargs):
        rows_seen.append(log_prob.numel())
        return ppo_clip_loss(log_prob, *args, **kwargs)

    monkeypatch.setattr("srrl.objectives.ppo.ppo_clip_loss", counting_loss)
    trainer = SRRLTrainer(fast_config(tiny_pipe_dir, run_dir, **overrides))
    grads: list[list[torch.Tensor]] = []
    step = trainer._optimizer_step

    def recording_step() -> float:
        grads.append([p.grad.clone() for p in trainer.params if p.grad is not None])
        return step()

    trainer._optimizer_step = recording_step
    trainer.run()
    (metrics,) = read_jsonl(trainer.run_dir / "metrics.jsonl")
    return grads, rows_seen, metrics


def assert_same_gradients(steps_a: list[list[torch.Tensor]], steps_b: list[list[torch.Tensor]]) -> None:
    """Equal accumulated gradients at every optimizer step, up to the float noise of different batch sizes."""
    assert len(steps_a) == len(steps_b) > 1
    assert any(bool(g.abs().max() > 0) for step in steps_b for g in step)
    for step_a, step_b in zip(steps_a, steps_b, strict=True):
        scale = max(float(g.abs().max()) for g in step_b)
        for g_a, g_b in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(g_a, g_b, atol=1e-4 * scale, rtol=1e-3)


def test_skipping_zero_advantage_rows_leaves_the_update_unchanged(tiny_pipe_dir, tmp_path, monkeypatch):
    """With beta2=0 the negatives have advantage 0: training without their forward passes accumulates the same
    gradients (compared at every optimizer step) as training with them, on fewer UNet rows."""
    overrides = {"curriculum.total_stages": 1, "eval.every": 0, "train.beta2": 0.0, "select.pos_threshold": 0.0,
                 "select.neg_threshold": 0.0, "train.gradient_accumulation_steps": 2}
    grads_skip, rows_skip, _ = record_update(tiny_pipe_dir, tmp_path / "skip", overrides, monkeypatch)
    monkeypatch.setattr("srrl.update.trained_rows", lambda rows, adv, weights: (rows, adv, weights))
    grads_full, rows_full, metrics = record_update(tiny_pipe_dir, tmp_path / "full", overrides, monkeypatch)
    assert metrics["n_neg"] > 0 and metrics["optimizer_steps"] == len(grads_full)
    assert sum(rows_skip) < sum(rows_full)
    assert_same_gradients(grads_skip, grads_full)


def test_steps_in_call_end_at_optimizer_steps():
    assert srrl.update.steps_in_call(pending=0, per_step=4, target=12, remaining=10, max_steps=10) == 3
    assert srrl.update.steps_in_call(pending=8, per_step=4, target=12, remaining=10, max_steps=10) == 1
    assert srrl.update.steps_in_call(pending=0, per_step=4, target=100, remaining=5, max_steps=10) == 5
    assert srrl.update.steps_in_call(pending=0, per_step=4, target=100, remaining=5, max_steps=2) == 2
    assert srrl.update.steps_in_call(pending=0, per_step=4, target=100, remaining=5, max_steps=1) == 1


def test_several_timesteps_per_call_leave_the_update_unchanged(tiny_pipe_dir, tmp_path, monkeypatch):
    """``train.timesteps_per_call`` packs kept steps of a micro-batch into one UNet call without crossing an
    optimizer step: same gradients at every optimizer step as one step per call, in fewer, larger calls."""
    overrides = {"curriculum.total_stages": 1, "eval.every": 0, "select.pos_threshold": 0.0, "select.neg_threshold": 0.0,
                 "train.gradient_accumulation_steps": 1, "train.batch_size": 2, "split_step": 4}
    grads_one, rows_one, metrics = record_update(tiny_pipe_dir, tmp_path / "one", overrides, monkeypatch)
    grads_packed, rows_packed, packed = record_update(tiny_pipe_dir, tmp_path / "packed",
                                                      {**overrides, "train.timesteps_per_call": 8}, monkeypatch)
    assert metrics["optimizer_steps"] == packed["optimizer_steps"] == len(grads_one)
    assert sum(rows_one) == sum(rows_packed) and len(rows_packed) < len(rows_one) and max(rows_packed) > 2
    assert_same_gradients(grads_packed, grads_one)


def test_warmup_factor():
    assert [warmup_factor(4, n) for n in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == warmup_factor(0, 7) == 1.0


def test_learning_rate_warms_up_over_optimizer_steps(tiny_pipe_dir, tmp_path):
    config = fast_config(tiny_pipe_dir, tmp_path, **{"eval.every": 0, "train.lr_warmup_steps": 5})
    trainer = SRRLTrainer(config)
    rates: list[float] = []
    step = trainer._optimizer_step

    def recording_step() -> float:
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        return step()

    trainer._optimizer_step = recording_step
    trainer.run()
    assert len(rates) > 5
    assert rates == pytest.approx([1e-2 * min(1.0, (k + 1) / 5) for k in range(len(rates))])


def test_lora_on_resnet_convs_trains_saves_and_reloads(tiny_pipe_dir, tmp_path):
    """``lora_target_modules`` reaches peft: conv LoRA is trained, exported and loaded back into the UNet (here
    with the UNet in channels-last layout, which the saved file and diffusers' loader must not notice)."""
    config = fast_config(tiny_pipe_dir, tmp_path, **{"lora_target_modules": "to_q,conv1,conv2",
                                                      "curriculum.total_stages": 1, "eval.every": 0,
                                                      "channels_last": True})
    trainer = SRRLTrainer(config)
    conv_lora = [p for n, p in trainer.model.denoiser.named_parameters() if ".conv1.lora_A" in n]
    assert conv_lora[0].is_contiguous(memory_format=torch.channels_last) and not conv_lora[0].is_contiguous()
    trained = {n for n, p in trainer.model.denoiser.named_parameters() if p.requires_grad}
    assert any(".conv1.lora_A" in n for n in trained) and any(".to_q.lora_A" in n for n in trained)
    assert not any(".to_k." in n for n in trained)
    run = trainer.run()
    saved = lora_weights(run, 0)
    assert any("conv2" in k for k in saved)
    fresh = SRRLTrainer(fast_config(tiny_pipe_dir, tmp_path / "b", **{"lora_target_modules": "to_q,conv1,conv2"}))
    load_lora(fresh.model.denoiser, run / "checkpoints" / "stage_000")
    for name, param in trainer.model.denoiser.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(dict(fresh.model.denoiser.named_parameters())[name], param)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pipe.load_lora_weights(run / "checkpoints" / "stage_000")  # diffusers' own loader: every adapter, exactly
    loaded = {n.replace(".default_0", ""): p for n, p in pipe.unet.named_parameters() if ".lora_" in n}
    mine = {n.replace(".default", ""): p for n, p in trainer.model.denoiser.named_parameters() if ".lora_" in n}
    assert set(loaded) == set(mine)
    for name, param in mine.items():
        torch.testing.assert_close(loaded[name], param)


def test_lora_target_matching_nothing_is_one_clear_line(tiny_pipe_dir, tmp_path):
    with pytest.raises(RuntimeError, match="lora_target_modules='no_such_layer' matches no module") as info:
        SRRLTrainer(fast_config(tiny_pipe_dir, tmp_path, **{"lora_target_modules": "no_such_layer"}))
    assert "\n" not in str(info.value) and not (tmp_path / "runs").exists()


def test_tiny_sd_raises_held_out_brightness(tmp_path):
    """The embedded pre-trained tiny model: a short SRRL run raises the held-out brightness reward."""
    config = fast_config(Path("unused"), tmp_path)
    defaults = get_config("tiny_sd")
    config.pretrained.model = defaults.pretrained.model
    config.prompt_file, config.eval.prompt_file = defaults.prompt_file, defaults.eval.prompt_file
    config.sample = defaults.sample
    config.train = defaults.train
    config.select.pos_threshold, config.select.neg_threshold = 0.5, -0.5
    config.split_time = 5
    config.curriculum.total_stages = config.curriculum.stage_cnt = config.eval.every = 4
    config.curriculum.split_left, config.curriculum.split_right = 1, 4
    config.eval.num_images_per_prompt = 8
    run = train(config)
    before, after = read_jsonl(run / "eval.jsonl")
    se = (before["reward_stderr"] ** 2 + after["reward_stderr"] ** 2) ** 0.5
    assert after["reward_mean"] > before["reward_mean"] + 1.5 * se, (before, after)


def test_every_positive_is_trained_with_select_positives_all(tiny_pipe_dir, tmp_path):
    """A threshold every finite z passes: "best" trains one child per group, "all" every child of every group."""
    overrides = {"curriculum.total_stages": 1, "eval.every": 0, "select.pos_threshold": -50.0,
                 "select.neg_threshold": -50.0, "train.beta2": 0.0}
    (best,) = read_jsonl(train(fast_config(tiny_pipe_dir, tmp_path / "a", **overrides)) / "metrics.jsonl")
    every_run = train(fast_config(tiny_pipe_dir, tmp_path / "b", **overrides, **{"select.positives": "all"}))
    (every,) = read_jsonl(every_run / "metrics.jsonl")
    groups = 2 * 2  # sample.batch_size x sample.num_batches_per_epoch of fast_config
    assert (best["n_pos"], best["n_neg"]) == (groups, 0)
    assert (every["n_pos"], every["n_neg"]) == (groups * 3, 0)  # split_time 3 children per group
