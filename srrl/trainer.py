"""The SRRL run: all stages of the curriculum in one process, models resident, state in the run directory."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import ml_collections
import torch
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from rewards.rewards import build_reward, known_rewards, prompt_check
from srrl import rundir, runlock
from srrl.advantages import ADVANTAGE_RULES, History, Selection, StageScores
from srrl.algorithms import adapt_plan, get_algorithm
from srrl.checkpoint import Checkpoint, newest_intact
from srrl.curriculum import StagePlan, stage_plan
from srrl.distributed import WEIGHT_DTYPES, gather_flat, local_rows, make_accelerator, select_trajectories
from srrl.ema import OLD_POLICY_FILE, OldPolicy, averaged_weights, load_ema, make_ema, save_ema
from srrl.errors import TrainingError
from srrl.families import ModelLoader, get_family
from srrl.faults import failpoint
from srrl.heldout import Verifier, describe_strict_change, evaluate_heldout
from srrl.models import merged_lora, save_lora, set_lora_state
from srrl.objectives import get_objective
from srrl.optimstep import GuardedStep
from srrl.profiling import timed
from srrl.runconfig import resume_changes, upgrade_config
from srrl.sampling import GuidedDenoiser, first_kept_steps
from srrl.stage import choose_prompts, sample_stage, score_images
from srrl.trackers import StageLogger
from srrl.update import Accumulation, UpdateStats, ppo_update
from srrl.validate import ConfigError, load_prompt_entries, prompt_metadata, validate_config

logger = logging.getLogger(__name__)


def claim_run_dir(config: ml_collections.ConfigDict) -> runlock.RunLock:
    """Own the run directory: ``resume_from`` when resuming, else ``<save_path>/<exp_name>`` (or the first free
    ``<exp_name>_K``); see :mod:`srrl.runlock`."""
    if config.resume_from:
        return runlock.claim_existing(Path(config.resume_from))
    return runlock.claim_fresh(Path(config.save_path), config.exp_name)


class SRRLTrainer:
    """Loads everything once, claims the run directory, then runs (or resumes) the stages of ``config.curriculum``.

    Hand-ins of the entry wiring (``cli.wiring``): ``load_model``, a loader in place of ``config.family``'s (default:
    the family's own, :mod:`srrl.families`), and ``verifier``, the
    held-out verifier that ``eval.verifier`` needs (the shapes world's; the core imports no testbed code)."""

    def __init__(self, config: ml_collections.ConfigDict, load_model: ModelLoader | None = None,
                 verifier: Verifier | None = None) -> None:
        upgrade_config(config)  # fields that configs made before them lack, filled once
        validate_config(config, known_rewards, prompt_check(config.reward.fn),
                        verifier.check_prompt if verifier is not None else None)
        load_model = load_model or get_family(config.family).load
        self.config, self.verifier = config, verifier
        self.algorithm = get_algorithm(config.algorithm)
        train_entries = [{"prompt": config.prompt}] if config.prompt else load_prompt_entries(config.prompt_file,
                                                                                                 "prompt_file")
        eval_entries = load_prompt_entries(config.eval.prompt_file, "eval.prompt_file") if config.eval.every else []
        self.prompts = [e["prompt"] for e in train_entries]
        self.eval_prompts = [e["prompt"] for e in eval_entries]
        tracker = None if config.logging.tracker == "none" else config.logging.tracker
        self.accelerator = make_accelerator(config.mixed_precision, tracker)
        world = self.accelerator.num_processes
        rows = config.sample.batch_size * config.sample.num_batches_per_epoch
        if rows % world:
            raise ConfigError(f"sample.num_batches_per_epoch={config.sample.num_batches_per_epoch} x sample.batch_size="
                              f"{config.sample.batch_size} rows do not split over {world} processes; expected a "
                              f"multiple of {world}")
        self.device = self.accelerator.device
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        set_seed(config.seed)  # only LoRA initialisation draws from the global RNG
        self.model = load_model(config, self.device, WEIGHT_DTYPES[config.mixed_precision])
        self.reward_fn = build_reward(config.reward.fn, self.device, config.reward,
                                      prompt_metadata(train_entries, eval_entries))
        self.params = [p for p in self.model.denoiser.parameters() if p.requires_grad]
        t = config.train
        optimizer = torch.optim.AdamW(
            self.params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
        )
        # stepped once per optimizer step on this process (not prepared: accelerate would step it once per process)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_factor,
                                                                                   t.lr_warmup_steps))
        if t.gradient_checkpointing:
            self.model.denoiser.enable_gradient_checkpointing()
        self.network, self.optimizer = self.accelerator.prepare(self.model.denoiser, optimizer)
        self.ema = make_ema(self.params, t.ema_decay)  # the average that held-out evaluations score (srrl.ema)
        needs_old = get_objective(t.objective).needs_old_policy  # nft: theta_old samples and is contrasted with
        self.old_policy = OldPolicy(self.params, t.nft_old_decay_rate, t.nft_old_decay_cap) if needs_old else None
        self.denoiser = GuidedDenoiser(torch.compile(self.network) if config.compile_denoiser else self.network,
                                       config.sample.max_micro_batch, self.model.embedded_guidance)
        self.merge_lora = config.sample.merge_lora
        self.acc = Accumulation()
        self.history: History = {}
        self.metrics: list[dict] = []
        self.evals: list[dict] = []
        self.start_stage = 0
        # the guarded step (srrl.optimstep) with accelerate's fp16 loss scaler (None in other precisions)
        self.step_guard = GuardedStep(self.optimizer, self.params, lambda params, norm: self.accelerator.clip_grad_norm_(
            params, norm), self.accelerator.scaler)
        self.lock = claim_run_dir(config) if self.accelerator.is_main_process else None  # after every load
        self.run_dir = Path(broadcast_object_list([str(self.lock.run_dir) if self.lock else ""])[0])
        try:
            if config.resume_from:
                self._resume()
            elif self.accelerator.is_main_process:
                rundir.write_json(self.run_dir / "config.json", json.loads(config.to_json_best_effort()))
        except BaseException:  # a refused resume lets go of the directory at once, not when collected
            if self.lock is not None:
                self.lock.release()
            raise
        self.accelerator.wait_for_everyone()
        self.log = StageLogger(self.accelerator, config, self.run_dir)

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 loss scaler the optimizer step uses (the one ``accelerator.backward`` scales with), or None."""
        return self.step_guard.scaler

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
        if last_done >= 0 and self.eval_due(last_done) and last_done not in done:
            self.evaluate(last_done)
        bar = tqdm(range(self.start_stage, cfg.curriculum.total_stages), desc="stages",
                   disable=not self.accelerator.is_main_process)
        try:
            for stage in bar:
                self.run_stage(self.plan(stage))
                if self.eval_due(stage):
                    self.evaluate(stage)
        finally:
            bar.close()
            self.log.finish()
            if self.lock is not None:
                self.lock.release()
        return self.run_dir

    def eval_due(self, stage: int) -> bool:
        """Whether the held-out evaluation runs after ``stage``: every ``eval.every`` stages and after the last."""
        every, last = self.config.eval.every, self.config.curriculum.total_stages - 1
        return bool(every) and ((stage + 1) % every == 0 or stage == last)

    def run_stage(self, plan: StagePlan) -> dict:
        """Sample (with reflection), score, normalise, select, train and checkpoint one stage."""
        cfg, acc = self.config, self.accelerator
        t0, c0 = time.perf_counter(), time.process_time()
        calls0, rows0 = self.denoiser.calls, self.denoiser.rows
        self.step_guard.counts.skipped = self.step_guard.counts.overflows = 0
        total_rows = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
        prompts = choose_prompts(self.prompts, total_rows, plan.seed, bool(cfg.prompt_random_choose))
        rows = local_rows(total_rows, acc.num_processes, acc.process_index)
        self.network.eval()
        policy = self.old_policy.swapped() if self.old_policy else nullcontext()
        with acc.autocast(), policy, merged_lora(self.network, self.merge_lora):
            traj, images = sample_stage(self.model, self.denoiser, cfg, plan, [prompts[r] for r in rows], rows,
                                        self.device, fork=self.algorithm.fork or cfg.sample.same_latent,
                                        progress=acc.is_main_process)
        failpoint("after_sampling", plan.stage)
        sampling_rows = self.denoiser.rows - rows0
        t1, c1 = time.perf_counter(), time.process_time()
        with timed("reward"):
            local_rewards = score_images(self.reward_fn, images.to(self.device), traj.prompts, cfg.reward.batch_size,
                                         f"reward stage {plan.stage}", acc.is_main_process)
        rewards = gather_flat(acc, local_rewards)  # [total_rows * split_time], global row order
        all_prompts = [p for p in prompts for _ in range(cfg.split_time)]
        t2, c2 = time.perf_counter(), time.process_time()
        selection = self._select(plan.stage, all_prompts, rewards)
        if selection.rows.numel() == 0:
            logger.warning("stage %d: no group passed the thresholds; update skipped", plan.stage)
            stats = UpdateStats().summary()
        else:
            selected = select_trajectories(acc, traj, selection.rows, rows[0] * cfg.split_time)
            if get_objective(cfg.train.objective).needs_final_latents:  # the sampled x_0: the last step's output
                selected = replace(selected, final_latents=selected.next_latents[:, -1])
            samples = first_kept_steps(selected, cfg.train.timestep_window)
            stats = ppo_update(acc, self.denoiser, self.model.sampler, self.model.prompt_encoder.negative(), cfg, plan,
                               samples, selection.advantages, self.acc, self._optimizer_step,
                               self.old_policy.swapped if self.old_policy else None).summary()
        if cfg.train.flush_accumulation_at_stage_end and self.acc.micro_steps:
            norm = self._optimizer_step()
            if norm is not None:
                stats["grad_norm"], stats["optimizer_steps"] = norm, stats["optimizer_steps"] + 1
        if self.old_policy is not None:
            self.old_policy.update(plan.stage)
        t3, c3 = time.perf_counter(), time.process_time()
        finite = rewards[torch.isfinite(rewards)]
        record = {
            "stage": plan.stage, "split_step": plan.split_step, "resample_num": plan.resample_num, "seed": plan.seed,
            "reward_mean": finite.mean().item() if finite.numel() else None,
            "reward_std": finite.std().item() if finite.numel() > 1 else 0.0,
            "nonfinite_rewards": rewards.numel() - finite.numel(), "skipped_steps": self.step_guard.counts.skipped,
            "overflow_steps": self.step_guard.counts.overflows, "loss_scale": self.step_guard.loss_scale(),
            "n_pos": selection.n_pos, "n_neg": selection.n_neg, **stats,
            "pending_sample_steps": self.acc.sample_steps, "unet_calls": self.denoiser.calls - calls0,  # the run directory's metric names
            "unet_rows": self.denoiser.rows - rows0, "unet_rows_sampling": sampling_rows,
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
        failpoint("after_metrics", plan.stage)
        if acc.is_main_process:
            logger.info("%s", stage_summary(record, cfg.curriculum.total_stages))
        return record

    def _select(self, stage: int, prompts: list[str], rewards: torch.Tensor) -> Selection:
        """The trained rows and their advantages by the algorithm's advantage rule (which also updates the
        history); a non-finite reward is logged with its prompt and takes no part (never stored, never selected)."""
        bad = [p for p, r in zip(prompts, rewards.tolist(), strict=True) if not math.isfinite(r)]
        if bad and self.accelerator.is_main_process:
            logger.warning("stage %d: %d non-finite rewards left out (prompts: %s)", stage, len(bad),
                           "; ".join(sorted(set(bad))[:5]))
        rule = ADVANTAGE_RULES[self.algorithm.rule]
        selection, self.history = rule(StageScores(prompts, rewards, self.config.split_time, stage), self.history,
                                       self.config)
        return selection

    def evaluate(self, after_stage: int) -> dict:
        """Held-out evaluation (:func:`srrl.heldout.evaluate_heldout`), appended to ``eval.jsonl`` and logged."""
        cfg = self.config
        eager = GuidedDenoiser(self.network, cfg.sample.max_micro_batch, self.model.embedded_guidance)  # the module itself, also under compile_denoiser
        with averaged_weights(self.ema, self.params):
            record = evaluate_heldout(self.accelerator, self.model, eager, self.reward_fn, cfg, self.eval_prompts,
                                      after_stage, self.verifier)
        self.evals = [e for e in self.evals if e["after_stage"] < after_stage] + [record]
        self.log.evaluation(record, self.evals, self.metrics)
        logger.info("held-out reward after stage %d: %.4f ± %.4f (n=%d)", after_stage, record["reward_mean"],
                    record["reward_stderr"], record["n"])
        if cfg.eval.verifier and len(self.evals) > 1:
            logger.info("%s", describe_strict_change(self.evals[0], record, f"after stage {after_stage}"))
        return record

    # ----------------------------------------------------------------------------------- optimisation
    def _optimizer_step(self) -> float | None:
        """Average the accumulated gradient over its micro-steps, take the guarded step (:mod:`srrl.optimstep`:
        clip, loss scaler, non-finite guard), reset the accumulation; the learning-rate schedule and the weight
        average advance only with a step taken. Returns the gradient norm, or None for a step not taken."""
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(max(self.acc.micro_steps, 1))
        norm = self.step_guard(self.config.train.max_grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.acc.reset()
        if norm is not None:
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.step(self.params)
        return norm

    # ------------------------------------------------------------------------------ checkpoint / resume
    def _checkpoint(self, stage: int, record: dict) -> None:
        denoiser = self.accelerator.unwrap_model(self.network)
        if not all(bool(torch.isfinite(p).all()) for p in self.params):  # never reached after _optimizer_step
            raise TrainingError(f"stage {stage}: non-finite LoRA weights; no checkpoint written")
        acc_grads = {n: p.grad for n, p in denoiser.named_parameters() if p.requires_grad and p.grad is not None}
        if self.accelerator.num_processes > 1 and acc_grads:  # pending local grads -> their mean on every rank
            for grad in acc_grads.values():
                grad.copy_(self.accelerator.reduce(grad, "mean"))
        opt_tensors, opt_meta = rundir.optimizer_to_flat(self.optimizer.state_dict())
        scaler = self.scaler.state_dict() if self.scaler is not None else None

        def fill(tmp: Path) -> None:
            save_lora(self.model.pipeline_class, denoiser, tmp)
            failpoint("checkpoint_half_written", stage)
            rundir.tensors_to_safetensors(tmp / "optimizer.safetensors", opt_tensors)
            rundir.tensors_to_safetensors(tmp / "accumulated_grads.safetensors", acc_grads)
            ema = save_ema(self.ema, self.params, self.model.pipeline_class, denoiser, tmp) if self.ema else None
            if self.old_policy is not None:
                rundir.tensors_to_safetensors(tmp / OLD_POLICY_FILE, self.old_policy.state())
            rundir.write_json(tmp / "state.json", {
                "stage": stage, "record": record, "optimizer": opt_meta, "scaler": scaler, "history": self.history,
                "lr_scheduler": self.lr_scheduler.state_dict(), "consecutive_skips": self.step_guard.counts.consecutive,
                "accumulation": {"sample_steps": self.acc.sample_steps, "micro_steps": self.acc.micro_steps},
                "ema": ema,
            })

        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            try:
                rundir.write_checkpoint(self.run_dir, stage, fill, self.config.train.num_checkpoint_limit)
            except OSError as err:
                raise TrainingError(f"cannot write the checkpoint of stage {stage} in {self.run_dir} "
                                    f"({err.strerror or err}); the previous checkpoints are intact -- free disk "
                                    "space and resume with --config.resume_from") from None
        self.accelerator.wait_for_everyone()

    def _resume(self) -> None:
        """Continue the run in ``resume_from`` from its newest intact checkpoint (after checking the config)."""
        recorded = rundir.read_json(self.run_dir / "config.json", "run config")
        requested = json.loads(self.config.to_json_best_effort())
        changes = resume_changes(requested, recorded)
        if changes and self.accelerator.is_main_process:
            logger.warning("resume: settings changed from the run's config.json: %s", "; ".join(changes))
        if self.accelerator.is_main_process:
            for path in rundir.remove_stale_temporaries(self.run_dir):
                logger.info("resume: removed %s, left by an interrupted write", path)
            rundir.write_json(self.run_dir / "config.json", requested)
        self.metrics = rundir.read_jsonl(self.run_dir / "metrics.jsonl")
        self.evals = rundir.read_jsonl(self.run_dir / "eval.jsonl")
        ckpt = newest_intact(self.run_dir, self.accelerator.unwrap_model(self.network), self.optimizer)
        if ckpt is None:
            logger.info("resume: no intact checkpoint in %s; starting from stage 0", self.run_dir)
            self.metrics, self.evals = [], [e for e in self.evals if e["after_stage"] == -1]
            return
        self._apply(ckpt)
        self.metrics = [m for m in self.metrics if m["stage"] < ckpt.stage] + [ckpt.state["record"]]
        self.evals = [e for e in self.evals if e["after_stage"] <= ckpt.stage]
        self.start_stage = ckpt.stage + 1
        logger.info("resumed %s from %s: continuing with stage %d", self.run_dir, ckpt.path.name, self.start_stage)

    def _apply(self, ckpt: Checkpoint) -> None:
        """Put the checked checkpoint ``ckpt`` into the denoiser, optimizer, scheduler, scaler and counters."""
        denoiser = self.accelerator.unwrap_model(self.network)
        if self.ema is not None:  # the average first; load_ema leaves the weights as it found them
            if ckpt.ema is None:
                raise ConfigError(f"resume: {ckpt.path} holds no weight average; train.ema_decay must stay 0 for "
                                  "this run")
            load_ema(self.ema, self.params, denoiser, ckpt.ema, ckpt.state["ema"])
        if self.old_policy is not None:  # nft's sampling policy, before the LoRA
            if not (ckpt.path / OLD_POLICY_FILE).is_file():
                raise ConfigError(f"resume: {ckpt.path} holds no sampling policy ({OLD_POLICY_FILE}); it was not an "
                                  "nft run, so train.objective must stay as it was")
            self.old_policy.load(rundir.load_tensors(ckpt.path / OLD_POLICY_FILE, "checkpoint file", True),
                                 ckpt.path / OLD_POLICY_FILE)
        set_lora_state(denoiser, ckpt.lora)
        self.optimizer.load_state_dict(ckpt.optimizer)
        if "lr_scheduler" in ckpt.state:  # absent from checkpoints made before train.lr_warmup_steps existed
            self.lr_scheduler.load_state_dict(ckpt.state["lr_scheduler"])
        if ckpt.state.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(ckpt.state["scaler"])
        for name, p in denoiser.named_parameters():
            if name in ckpt.grads:
                p.grad = ckpt.grads[name].to(device=p.device, dtype=p.dtype)
        self.acc = Accumulation(**ckpt.state["accumulation"])
        self.step_guard.counts.consecutive = ckpt.state.get("consecutive_skips", 0)
        self.history = ckpt.history


def stage_summary(record: dict, total_stages: int) -> str:
    """The one-line summary of a finished stage (its ``metrics.jsonl`` record)."""
    def num(key: str, fmt: str) -> str:
        value = record.get(key)
        return format(value, fmt) if isinstance(value, int | float) else "-"

    extra = "".join(f", {record[k]} {k.replace('_', ' ')}" for k in ("nonfinite_rewards", "skipped_steps",
                                                                   "overflow_steps")
                    if record.get(k))
    return (f"stage {record['stage']} ({record['stage'] + 1}/{total_stages}) done: reward {num('reward_mean', '.4f')} ± "
            f"{num('reward_std', '.4f')}, {record['n_pos']} positives / {record['n_neg']} negatives, "
            f"{record['optimizer_steps']} optimizer steps, approx-KL {num('approx_kl', '.2g')}, clip fraction "
            f"{num('clipfrac', '.2f')}{extra}; {record['time_stage_s']:.1f} s (sample {record['time_sample_s']:.1f}, "
            f"reward {record['time_reward_s']:.1f}, train {record['time_train_s']:.1f})")


def warmup_factor(warmup_steps: int, steps_done: int) -> float:
    """Learning-rate multiplier of the optimizer step after ``steps_done`` steps: ``(steps_done + 1) /
    warmup_steps`` during the warmup, then 1 (always 1 for ``warmup_steps`` 0)."""
    return min(1.0, (steps_done + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def train(config: ml_collections.ConfigDict, load_model: ModelLoader | None = None,
          verifier: Verifier | None = None) -> Path:
    """Validate ``config``, run every stage, return the run directory (hand-ins as :class:`SRRLTrainer`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return SRRLTrainer(config, load_model, verifier).run()
