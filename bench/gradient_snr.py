"""How much of a policy-gradient step is signal? ``python bench/gradient_snr.py [--preset testbed] [overrides]``.

Samples ``--batches`` independent stages of GRPO trajectories (no fork, the preset's sampler) from the current
policy, scores them, normalises the rewards within each prompt's group, and computes for each batch and each
window of denoising steps the gradient of the PPO surrogate at ratio 1, ``-sum_i A_i * mean_t log p_i,t`` (the
loss the first micro-steps of a stage see), with respect to the LoRA weights. The mean cosine between the
gradients of independent batches estimates the share of signal in one batch's gradient: with a per-batch
gradient ``mu + noise``, ``E cos = |mu|^2 / (|mu|^2 + tr(Var) / n)``, so the batch that would reach a cosine of
one half is ``n * (1 / cos - 1)`` trajectories. A window whose cosine is near 0 carries no usable signal about
the reward at that batch size. Writes JSON (``--out``) and prints one line per window.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.wiring import trainer_for  # noqa: E402
from config.stage_process import get_config  # noqa: E402
from srrl.advantages import ADVANTAGE_RULES, StageScores  # noqa: E402
from srrl.objectives.ppo import micro_step_log_probs  # noqa: E402
from srrl.runconfig import set_fields  # noqa: E402
from srrl.stage import choose_prompts, sample_stage, score_images  # noqa: E402
from srrl.update import MicroStep  # noqa: E402

logger = logging.getLogger("gradient_snr")


def window_gradient(trainer, traj, advantages: torch.Tensor, steps: range, rows_per_call: int) -> torch.Tensor:
    """The flat gradient [P] of ``-sum_i A_i * mean_{t in steps} log p_i,t`` over the rows of ``traj``."""
    params = trainer.params
    for p in params:
        p.grad = None
    denoiser, sampler, uncond = trainer.denoiser, trainer.model.sampler, trainer.model.prompt_encoder.negative()
    live = torch.nonzero(advantages != 0).flatten()
    for start in range(0, live.numel(), rows_per_call):
        rows = live[start : start + rows_per_call]
        for s in steps:  # step s of every row, re-scored as the training loss re-scores it
            micro = MicroStep(rows, advantages[rows], torch.ones(rows.numel()), torch.full((rows.numel(), 1), s),
                              rows.numel(), 0)
            log_prob = micro_step_log_probs(denoiser, sampler, traj, micro, uncond)  # [b]
            (-(advantages[rows] * log_prob).sum() / len(steps)).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def sample_batch(trainer, config, stage: int, shared_noise: bool):
    """One stage's trajectories, rewards and group-normalised advantages (no update): independent trajectories,
    or with ``shared_noise`` the siblings of a group forked at the first step (same x_T, different step noise)."""
    plan = replace(trainer.plan(0), stage=stage, seed=config.seed + stage)  # a fresh seed per batch
    rows = config.sample.batch_size * config.sample.num_batches_per_epoch
    prompts = choose_prompts(trainer.prompts, rows, plan.seed, True)
    trainer.network.eval()
    traj, images = sample_stage(trainer.model, trainer.denoiser, config, plan, prompts, list(range(rows)),
                                trainer.device, fork=shared_noise)
    rewards = score_images(trainer.reward_fn, images, traj.prompts, config.reward.batch_size, "reward")
    all_prompts = [p for p in prompts for _ in range(config.split_time)]
    selection, _ = ADVANTAGE_RULES["group_normalised"](StageScores(all_prompts, rewards, config.split_time, stage),
                                                      {}, config)
    advantages = torch.zeros(rewards.numel())
    advantages[selection.rows] = selection.advantages
    return traj, advantages, rewards


def mean_cos(grads: list[torch.Tensor]) -> float:
    """The mean cosine over all pairs of ``grads`` (each [P]; at least two)."""
    pairs = list(itertools.combinations(grads, 2))
    cos = sum(float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in pairs) / len(pairs)
    return min(1.0, max(-1.0, cos))


def measure(trainer, config, windows: list[range], batches: int, shared_noise: bool) -> dict:
    """Per window of steps: the mean cosine between ``batches`` independent batches' gradients, the mean norm,
    and the batch that would reach a cosine of one half."""
    grads: dict[str, list[torch.Tensor]] = {f"{w.start}:{w.stop}": [] for w in windows}
    for b in range(batches):
        traj, adv, rewards = sample_batch(trainer, config, b, shared_noise)
        logger.warning("batch %d: reward %.3f, %d of %d rows with A != 0", b, float(rewards.mean()),
                       int((adv != 0).sum()), adv.numel())
        for w in windows:
            grads[f"{w.start}:{w.stop}"].append(window_gradient(trainer, traj, adv, w, 32))
    n = traj.latents.shape[0]
    result: dict = {"trajectories_per_batch": n, "shared_noise": shared_noise, "windows": {}}
    for key, gs in grads.items():
        c = mean_cos(gs)
        result["windows"][key] = {"mean_cos": c, "norm": float(torch.stack([g.norm() for g in gs]).mean()),
                                  "batch_for_cos_half": n * (1 / c - 1) if c > 0 else None}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="testbed")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--windows", default="0:3,3:6,6:9,9:10,0:9,0:10")
    parser.add_argument("--out", default="gradient_snr.json")
    parser.add_argument("--shared_noise", action="store_true", help="siblings share x_T (fork at the first step)")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. lora_rank=8)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = get_config(args.preset)
    set_fields(config, args.overrides)
    config.algorithm, config.eval.every, config.logging.tracker = "grpo", 0, "none"
    config.save_path, config.exp_name, config.logging.log_images = "/tmp/gradient_snr_runs", "probe", False
    trainer = trainer_for(config)
    windows = [range(*map(int, w.split(":"))) for w in args.windows.split(",")]
    result = measure(trainer, config, windows, args.batches, args.shared_noise)
    for key, w in result["windows"].items():
        print(f"steps {key}: mean cos {w['mean_cos']:+.4f} between {args.batches} batches of "  # noqa: T201
              f"{result['trajectories_per_batch']}; batch for cos 0.5: {w['batch_for_cos_half']}")
    Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    trainer.lock.release()


if __name__ == "__main__":
    main()
