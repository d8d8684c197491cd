"""The SRRL run: all stages of the curriculum in one process, models resident, state in the run directory."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import ml_collections
import torch
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from rewards.rewards import build_reward, known_rewards
from srrl import rundir
from srrl.advantages import normalise_with_history, select_samples, update_history
from srrl.algorithms import adapt_plan, get_algorithm, select_all
from srrl.curriculum import StagePlan, stage_plan
from srrl.distributed import WEIGHT_DTYPES, gather_flat, local_rows, make_accelerator, select_trajectories
from srrl.heldout import describe_strict_change, evaluate_heldout
from srrl.models import DiffusionModel, load_lora, load_sd_model, merged_lora, save_lora
from srrl.profiling import timed
from srrl.sampling import GuidedDenoiser
from srrl.stage import (
    Accumulation,
    UpdateStats,
    choose_prompts,
    ppo_update,
    sample_stage,
)
from srrl.trackers import StageLogger
from srrl.validate import ConfigError, load_prompt_file, validate_config

logger = logging.getLogger(__name__)

ModelLoader = Callable[[ml_collections.ConfigDict, torch.device, torch.dtype], DiffusionModel]


def resolve_run_dir(config: ml_collections.ConfigDict) -> Path:
    """The run directory: ``resume_from`` when resuming, else ``<save_path>/<exp_name>`` (suffixed if taken)."""
    if config.resume_from:
        return Path(config.resume_from)
    base = Path(config.save_path) / config.exp_name
    run_dir, k = base, 0
    while run_dir.exists() and any(run_dir.iterdir()):
        k += 1
        run_dir = base.with_name(f"{base.name}_{k}")
    return run_dir


class SRRLTrainer:
    """Loads everything once, then runs (or resumes) the stages of ``config.curriculum``."""

    def __init__(self, config: ml_collections.ConfigDict, load_model: ModelLoader = load_sd_model) -> None:
        validate_config(config, known_rewards)
        self.config = config
        self.algorithm = get_algorithm(config.algorithm)
        self.prompts = [config.prompt] if config.prompt else load_prompt_file(config.prompt_file, "prompt_file")
        self.eval_prompts = load_prompt_file(config.eval.prompt_file, "eval.prompt_file") if config.eval.every else []
        tracker = None if config.logging.tracker == "none" else config.logging.tracker
        self.accelerator = make_accelerator(config.mixed_precision, tracker)
        world = self.accelerator.num_processes
        rows = config.sample.batch_size * config.sample.num_batches_per_epoch
        if rows % world:
            raise ConfigError(f"sample.num_batches_per_epoch={config.sample.num_batches_per_epoch} x sample.batch_size="
                              f"{config.sample.batch_size} rows do not split over {world} processes; expected a "
                              f"multiple of {world}")
        self.run_dir = Path(broadcast_object_list([str(resolve_run_dir(config))])[0])
        self.device = self.accelerator.device
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        set_seed(config.seed)  # only LoRA initialisation draws from the global RNG
        self.model = load_model(config, self.device, WEIGHT_DTYPES[config.mixed_precision])
        self.reward_fn = build_reward(config.reward.fn, self.device, config.reward)
        params = [p for p in self.model.unet.parameters() if p.requires_grad]
        t = config.train
        optimizer = torch.optim.AdamW(
            params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
        )
        # stepped once per optimizer step on this process (not prepared: accelerate would step it once per process)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_factor,
                                                                                   t.get("lr_warmup_steps", 0)))
        self.unet, self.optimizer = self.accelerator.prepare(self.model.unet, optimizer)
        self.params = params
        self.denoiser = GuidedDenoiser(self.unet, config.sample.max_micro_batch)
        self.merge_lora = config.sample.get("merge_lora", False)  # absent from configs made before the field
        self.acc = Accumulation()
        self.history: dict[str, list[list[float]]] = {}
        self.metrics: list[dict] = []
        self.evals: list[dict] = []
        self.start_stage = 0
        if config.resume_from:
            self._resume()
        elif self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            rundir.write_json(self.run_dir / "config.json", json.loads(config.to_json_best_effort()))
        self.accelerator.wait_for_everyone()
        self.log = StageLogger(self.accelerator, config, self.run_dir)

    # ----------------------------------------------------------------------------------------------- run
    def plan(self, stage: int) -> StagePlan:
        c = self.config.curriculum
        plan = stage_plan(stage, c.stage_cnt, c.split_left, c.split_right, self.config.seed,
                          self.config.split_step, self.config.resample_num)
        return adapt_plan(plan, self.algorithm, self.config.sample.num_steps)

    def run(self) -> Path:
        """Run the remaining stages; returns the run directory."""
        cfg = self.config
        done = {e["after_stage"] for e in self.evals}
        if cfg.eval.every and -1 not in done:
            self.evaluate(-1)
        last_done = self.start_stage - 1  # a resumed run may have stopped between a checkpoint and its evaluation
        if cfg.eval.every and last_done >= 0 and (last_done + 1) % cfg.eval.every == 0 and last_done not in done:
            self.evaluate(last_done)
        bar = tqdm(range(self.start_stage, cfg.curriculum.total_stages), desc="stages",
                   disable=not self.accelerator.is_main_process)
        for stage in bar:
            record = self.run_stage(self.plan(stage))
            bar.set_postfix(reward=f"{record['reward_mean']:.4f}")
            if cfg.eval.every and (stage + 1) % cfg.eval.every == 0:
                self.evaluate(stage)
        self.log.finish()
        return self.run_dir

    def run_stage(self, plan: StagePlan) -> dict:
        """Sample (with reflection), score, normalise, select, train and checkpoint one stage."""
        cfg, acc = self.config, self.accelerator
        t0, c0 = time.perf_counter(), time.process_time()
        calls0 = self.denoiser.calls
        total_rows = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
        prompts = choose_prompts(self.prompts, total_rows, plan.seed, bool(cfg.prompt_random_choose))
        rows = local_rows(total_rows, acc.num_processes, acc.process_index)
        self.unet.eval()
        with acc.autocast(), merged_lora(self.unet, self.merge_lora):
            traj, images = sample_stage(self.model, self.denoiser, cfg, plan, [prompts[r] for r in rows], rows,
                                        self.device, fork=self.algorithm.fork)
        t1, c1 = time.perf_counter(), time.process_time()
        with timed("reward"):
            local_rewards = self.reward_fn(images.to(self.device), traj.prompts).float()
        rewards = gather_flat(acc, local_rewards)  # [total_rows * split_time], global row order
        all_prompts = [p for p in prompts for _ in range(cfg.split_time)]
        t2, c2 = time.perf_counter(), time.process_time()
        z = normalise_with_history(all_prompts, rewards, self.history, cfg.eval.history_cnt)
        self.history = update_history(all_prompts, rewards, self.history, cfg.eval.history_cnt)
        if self.algorithm.select:
            selection = select_samples(z, cfg.split_time, cfg.eval.pos_threshold, cfg.eval.neg_threshold)
        else:
            selection = select_all(z)
        if selection.rows.numel() == 0:
            logger.warning("stage %d: no group passed the thresholds; update skipped", plan.stage)
            stats = UpdateStats().summary()
        else:
            samples = select_trajectories(acc, traj, selection.rows, rows[0] * cfg.split_time)
            stats = ppo_update(acc, self.unet, self.denoiser, self.model, cfg, plan, samples, selection.advantages,
                               self.acc, self._optimizer_step).summary()
        if cfg.train.flush_accumulation_at_stage_end and self.acc.micro_steps:
            stats["grad_norm"] = self._optimizer_step()
            stats["optimizer_steps"] += 1
        t3, c3 = time.perf_counter(), time.process_time()
        record = {
            "stage": plan.stage, "split_step": plan.split_step, "resample_num": plan.resample_num, "seed": plan.seed,
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "n_pos": selection.n_pos, "n_neg": selection.n_neg, **stats,
            "pending_sample_steps": self.acc.sample_steps, "unet_calls": self.denoiser.calls - calls0,
            "num_processes": acc.num_processes,
            "time_sample_s": t1 - t0, "time_reward_s": t2 - t1, "time_train_s": t3 - t2,
            "cpu_sample_s": c1 - c0, "cpu_reward_s": c2 - c1, "cpu_train_s": c3 - c2,
        }
        record["time_stage_s"] = time.perf_counter() - t0
        record["cpu_stage_s"] = time.process_time() - c0
        last = plan.stage == cfg.curriculum.total_stages - 1
        if (plan.stage + 1) % cfg.train.save_interval == 0 or last:
            self._checkpoint(plan.stage, record)
        self.metrics = [m for m in self.metrics if m["stage"] < plan.stage] + [record]
        labels = [f"{r:.3f} {p}" for r, p in zip(local_rewards.tolist(), traj.prompts, strict=True)]
        self.log.stage(record, self.metrics, self.evals, images, labels, cfg.split_time, self.history)
        return record

    def evaluate(self, after_stage: int) -> dict:
        """Held-out evaluation (:func:`srrl.heldout.evaluate_heldout`), appended to ``eval.jsonl`` and logged."""
        cfg = self.config
        record = evaluate_heldout(self.accelerator, self.model, self.denoiser, self.reward_fn, cfg, self.eval_prompts,
                                  after_stage)
        self.evals = [e for e in self.evals if e["after_stage"] < after_stage] + [record]
        self.log.evaluation(record, self.evals, self.metrics)
        logger.info("held-out reward after stage %d: %.4f ± %.4f (n=%d)", after_stage, record["reward_mean"],
                    record["reward_stderr"], record["n"])
        if cfg.eval.verifier and len(self.evals) > 1:
            logger.info("%s", describe_strict_change(self.evals[0], record, f"after stage {after_stage}"))
        return record

    # ----------------------------------------------------------------------------------- optimisation
    def _optimizer_step(self) -> float:
        """Average the accumulated gradient over its micro-steps, clip, step AdamW, reset the accumulation."""
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(max(self.acc.micro_steps, 1))
        norm = self.accelerator.clip_grad_norm_(self.params, self.config.train.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.acc.sample_steps = self.acc.micro_steps = 0
        return float(norm)

    # ------------------------------------------------------------------------------ checkpoint / resume
    def _checkpoint(self, stage: int, record: dict) -> None:
        acc_grads = {n: p.grad for n, p in self.accelerator.unwrap_model(self.unet).named_parameters()
                     if p.requires_grad and p.grad is not None}
        if self.accelerator.num_processes > 1 and acc_grads:  # pending local grads -> their mean on every rank
            for grad in acc_grads.values():
                grad.copy_(self.accelerator.reduce(grad, "mean"))
        opt_tensors, opt_meta = rundir.optimizer_to_flat(self.optimizer.state_dict())
        scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None

        def fill(tmp: Path) -> None:
            save_lora(self.model.pipeline_class, self.accelerator.unwrap_model(self.unet), tmp)
            rundir.tensors_to_safetensors(tmp / "optimizer.safetensors", opt_tensors)
            rundir.tensors_to_safetensors(tmp / "accumulated_grads.safetensors", acc_grads)
            rundir.write_json(tmp / "state.json", {
                "stage": stage, "record": record, "optimizer": opt_meta, "scaler": scaler, "history": self.history,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "accumulation": {"sample_steps": self.acc.sample_steps, "micro_steps": self.acc.micro_steps},
            })

        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            rundir.write_checkpoint(self.run_dir, stage, fill, self.config.train.num_checkpoint_limit)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> None:
        checkpoints = rundir.list_checkpoints(self.run_dir)
        self.metrics = rundir.read_jsonl(self.run_dir / "metrics.jsonl")
        self.evals = rundir.read_jsonl(self.run_dir / "eval.jsonl")
        if not checkpoints:
            logger.info("resume: no checkpoint in %s; starting from stage 0", self.run_dir)
            self.metrics, self.evals = [], [e for e in self.evals if e["after_stage"] == -1]
            return
        ckpt = checkpoints[-1]
        state = json.loads((ckpt / "state.json").read_text())
        stage = state["stage"]
        load_lora(self.accelerator.unwrap_model(self.unet), ckpt)
        opt_tensors = rundir.load_tensors(ckpt / "optimizer.safetensors")
        self.optimizer.load_state_dict(rundir.optimizer_from_flat(opt_tensors, state["optimizer"]))
        if "lr_scheduler" in state:  # absent from checkpoints made before train.lr_warmup_steps existed
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        grads = rundir.load_tensors(ckpt / "accumulated_grads.safetensors")
        for name, p in self.accelerator.unwrap_model(self.unet).named_parameters():
            if name in grads:
                p.grad = grads[name].to(device=p.device, dtype=p.dtype)
        self.acc = Accumulation(**state["accumulation"])
        self.history = state["history"]
        self.metrics = [m for m in self.metrics if m["stage"] < stage] + [state["record"]]
        self.evals = [e for e in self.evals if e["after_stage"] <= stage]
        self.start_stage = stage + 1
        logger.info("resumed %s from %s: continuing with stage %d", self.run_dir, ckpt.name, self.start_stage)


def warmup_factor(warmup_steps: int, steps_done: int) -> float:
    """Learning-rate multiplier of the optimizer step after ``steps_done`` steps: ``(steps_done + 1) /
    warmup_steps`` during the warmup, then 1 (always 1 for ``warmup_steps`` 0)."""
    return min(1.0, (steps_done + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def train(config: ml_collections.ConfigDict, load_model: ModelLoader = load_sd_model) -> Path:
    """Validate ``config``, run every stage, return the run directory."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return SRRLTrainer(config, load_model).run()
