"""The PPO update of a stage (docs/algorithm.md §3g): one loop over a plan of micro-steps, an accumulation that
decides when the optimizer steps, and the clipped loss of :mod:`srrl.ppo` on the log-probs the sampler recomputes.

A micro-step is ``k`` kept steps of a micro-batch of selected trajectories in one denoiser call (``k`` at most
``train.timesteps_per_call``, never across an optimizer step), so the gradient equals that of one step per call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from srrl.conditioning import Conditioning
from srrl.curriculum import StagePlan
from srrl.distributed import all_true, strided_share
from srrl.objectives import LossContext, get_objective
from srrl.ppo import PPOTerms
from srrl.profiling import timed
from srrl.sampler import Sampler
from srrl.sampling import GuidedDenoiser, Trajectories
from srrl.trust import TrustProbe

logger = logging.getLogger(__name__)


@dataclass
class Accumulation:
    """Gradient accumulation that may span stages (docs/algorithm.md §7.11): pending sample-steps and micro-steps,
    and the decision when the optimizer steps (once ``target`` sample-steps are pending)."""

    sample_steps: int = 0  # sample x kept-step terms accumulated since the last optimizer step
    micro_steps: int = 0  # backward calls since the last optimizer step

    def steps_in_call(self, per_step: int, target: int, remaining: int, max_steps: int) -> int:
        """How many of the ``remaining`` kept steps go into the next denoiser call: at most ``max_steps``, and never
        past the step that completes the accumulation (each step adds ``per_step`` sample-steps)."""
        return steps_in_call(self.sample_steps, per_step, target, remaining, max_steps)

    def completes(self, steps: int, per_step: int, target: int) -> bool:
        """Whether ``steps`` more kept steps of ``per_step`` sample-steps each reach ``target`` (step now)."""
        return self.sample_steps + steps * per_step >= target

    def add(self, steps: int, per_step: int) -> None:
        """Count one backward call over ``steps`` kept steps of ``per_step`` sample-steps each."""
        self.sample_steps += steps * per_step
        self.micro_steps += steps

    def reset(self) -> None:
        """After an optimizer step (taken or skipped): nothing pending."""
        self.sample_steps = self.micro_steps = 0


def steps_in_call(pending: int, per_step: int, target: int, remaining: int, max_steps: int) -> int:
    """Kept steps of the next denoiser call: at most ``max_steps`` and ``remaining``, and no more than completes an
    accumulation (``pending`` sample-steps so far, each step adds ``per_step``; the optimizer steps at ``target``)."""
    k = 1
    while k < min(max_steps, remaining) and pending + k * per_step < target:
        k += 1
    return k


@dataclass
class UpdateStats:
    """Diagnostics of one stage's update."""

    losses: list[float] = field(default_factory=list)
    approx_kls: list[float] = field(default_factory=list)
    clipfracs: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)  # KL anchor terms (train.kl_coef > 0)
    optimizer_steps: int = 0
    nonfinite_steps: int = 0
    stopped_early: bool = False  # the update stopped at train.target_kl
    trust: dict = field(default_factory=dict)  # the trust-region probe's summary (train.trust_probe), else empty

    def record(self, terms: PPOTerms, steps: int) -> None:
        """Append the diagnostics of a micro-step over ``steps`` kept steps (its loss per kept step)."""
        self.losses.append(terms.loss.item() / steps)
        self.approx_kls.append(terms.approx_kl.item())
        self.clipfracs.append(terms.clipfrac.item())
        self.ratios.append(terms.ratio.mean().item())
        if terms.kl is not None:
            self.kls.append(terms.kl.item())

    def summary(self) -> dict[str, float | int | None]:
        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        return {
            "loss": mean(self.losses),
            "approx_kl": mean(self.approx_kls),
            "clipfrac": mean(self.clipfracs),
            "ratio_mean": mean(self.ratios),
            "grad_norm": mean(self.grad_norms),
            "kl": mean(self.kls),
            "optimizer_steps": self.optimizer_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "stopped_early": int(self.stopped_early),
            **self.trust,
        }


def trained_rows(
    rows: torch.Tensor, advantages: torch.Tensor, row_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows [b] of a micro-batch worth a forward pass, with their advantages and loss weights [b'].

    A row whose shaped advantage or loss weight is exactly 0 (every negative under ``train.beta2=0``; padding of a
    process's share) adds exactly 0 to the loss and its gradient, so it is left out; the weights of the others
    keep their normalisation over all rows, so the update is unchanged. One row is always kept so that every
    process runs every micro-step (DDP).
    """
    live = (advantages != 0) & (row_weights != 0)
    if not bool(live.any()):
        live[0] = True
    return rows[live], advantages[live], row_weights[live]


@dataclass(frozen=True)
class MicroStep:
    """``steps`` kept steps of the rows of one micro-batch, trained in one denoiser call."""

    rows: torch.Tensor  # [b] ids of the trained samples
    advantages: torch.Tensor  # [b] their shaped advantages
    weights: torch.Tensor  # [b] their loss weights (normalised over the micro-batch's real rows on all processes)
    step_index: torch.Tensor  # [b, steps] the kept steps of each row in this call
    global_real: int  # real rows of the micro-batch over all processes: sample-steps per kept step
    done: int  # micro-steps of the stage's update after this one


@dataclass(frozen=True)
class UpdatePlan:
    """What fixes a stage's micro-steps: the shuffles' seed, the shares over processes and the call sizes."""

    epochs: int
    batch_size: int  # rows per micro-batch and process
    steps_per_call: int  # most kept steps in one denoiser call
    target: int  # sample-steps per optimizer step
    world: int
    rank: int

    def total(self, n_rows: int, n_steps: int) -> int:
        """Micro-steps of the whole update (one per kept step of every micro-batch of every epoch)."""
        per_rank = -(-n_rows // self.world)
        return self.epochs * -(-per_rank // self.batch_size) * n_steps


def micro_steps(plan: UpdatePlan, advantages: torch.Tensor, n_steps: int, generator: torch.Generator,
                acc: Accumulation) -> Iterator[MicroStep]:
    """The micro-steps of the update over samples with ``advantages`` [M] and ``n_steps`` kept steps each.

    Every epoch shuffles the samples and, per sample, the order of its kept steps (both from ``generator``: the
    same on every process, replayed exactly on resume); each process takes a strided share of the shuffled samples.
    The size of each call is decided when it is reached, from the accumulation pending at that point.
    """
    n_rows, done = advantages.numel(), 0
    for _ in range(plan.epochs):
        perm = torch.randperm(n_rows, generator=generator)
        step_orders = torch.stack([torch.randperm(n_steps, generator=generator) for _ in range(n_rows)])  # [M, S]
        share, weight = strided_share(perm, plan.world, plan.rank)
        for start in range(0, share.numel(), plan.batch_size):
            rows = share[start : start + plan.batch_size]
            # real rows of this micro-batch over all processes: perm positions [start*world, (start+b)*world)
            global_real = min((start + len(rows)) * plan.world, n_rows) - start * plan.world
            row_weights = weight[start : start + len(rows)] * plan.world / global_real
            rows, adv, row_weights = trained_rows(rows, advantages[rows], row_weights)
            j = 0
            while j < n_steps:
                k = acc.steps_in_call(global_real, plan.target, n_steps - j, plan.steps_per_call)
                done += k
                yield MicroStep(rows, adv, row_weights, step_orders[rows, j : j + k], global_real, done)
                j += k


def ppo_update(
    accelerator,
    denoiser: GuidedDenoiser,
    sampler: Sampler,
    uncond: Conditioning,
    config,
    plan: StagePlan,
    samples: Trajectories,
    advantages: torch.Tensor,
    acc: Accumulation,
    optimizer_step: Callable[[], float | None],
    old_policy: Callable | None = None,
) -> UpdateStats:
    """Epochs of ``train.objective`` (PPO-clip on the sampler's log-probs by default) over the selected
    trajectories ``samples`` [M] with their shaped ``advantages`` [M]. ``old_policy``: a context manager factory
    inside which the network holds the sampling policy's weights (objectives that contrast with it: ``nft``).

    ``denoiser`` holds the one (prepared) denoiser network; ``optimizer_step`` clips, steps and returns the gradient norm
    (None when it skipped a non-finite step). A micro-step whose loss is non-finite on any process is skipped
    (counted in ``nonfinite_steps``). With ``train.target_kl`` > 0 the update ends after the first optimizer step
    whose micro-steps had a mean approx-KL above it (on any process), as in common PPO implementations.
    """
    t_cfg, stats, network = config.train, UpdateStats(), denoiser.network
    n_steps = samples.timesteps.numel()
    update = UpdatePlan(t_cfg.num_epochs, t_cfg.batch_size, t_cfg.timesteps_per_call,
                        t_cfg.gradient_accumulation_steps * n_steps, accelerator.num_processes,
                        accelerator.process_index)
    total = update.total(advantages.numel(), n_steps)
    stage_seed = config.seed * 100_003 + plan.stage  # the update's shuffles and any noise its objective draws
    generator = torch.Generator().manual_seed(stage_seed)
    window_start = 0  # first entry of stats.approx_kls since the last optimizer step
    probe = TrustProbe() if t_cfg.trust_probe else None
    objective = get_objective(t_cfg.objective)
    ctx = LossContext(denoiser, sampler, samples, uncond, t_cfg.clip_range, t_cfg.kl_coef, noise_seed=stage_seed,
                      old_policy=old_policy, nft_beta=t_cfg.nft_beta, nft_adv_clip=t_cfg.nft_adv_clip)

    def recompute(micro: MicroStep) -> torch.Tensor:
        with accelerator.autocast():
            return objective.log_probs(ctx, micro)
    network.train()
    bar = tqdm(total=total, desc=f"train stage {plan.stage}", leave=False, disable=not accelerator.is_main_process)
    for micro in micro_steps(update, advantages, n_steps, generator, acc):
        k = micro.step_index.shape[1]
        bar.update(k)
        sync = acc.completes(k, micro.global_real, update.target) or (
            t_cfg.flush_accumulation_at_stage_end and micro.done == total)
        with accelerator.no_sync(network) if not sync else nullcontext():
            with accelerator.autocast():
                terms = objective.loss(ctx, micro)
            finite = all_true(accelerator, bool(torch.isfinite(terms.loss)))
            if finite:
                with timed("backward"):
                    accelerator.backward(terms.loss)
        if not finite:
            stats.nonfinite_steps += k
            continue
        acc.add(k, micro.global_real)
        stats.record(terms, k)
        if probe is not None:
            probe.remember(micro, terms.log_prob, micro.advantages.to(terms.log_prob.device).repeat_interleave(k))
        if sync:
            norm = optimizer_step()  # None: skipped as non-finite (weights unchanged)
            if norm is not None:
                stats.grad_norms.append(norm)
                stats.optimizer_steps += 1
            if probe is not None:
                probe.after_step(recompute, taken=norm is not None)
            window, window_start = stats.approx_kls[window_start:], len(stats.approx_kls)
            stats.stopped_early = kl_exceeded(accelerator, window, t_cfg.target_kl)
            if stats.stopped_early:
                break
    bar.close()
    if probe is not None:
        stats.trust = probe.summary(plan.stage)
    if stats.stopped_early:
        logger.info("stage %d: approx-KL above train.target_kl=%g; update stopped after %d optimizer steps",
                    plan.stage, t_cfg.target_kl, stats.optimizer_steps)
    return stats


def kl_exceeded(accelerator, approx_kls: list[float], target_kl: float) -> bool:
    """Whether the mean of ``approx_kls`` exceeds ``target_kl`` (> 0) on any process; False when it is off."""
    if target_kl <= 0:
        return False
    local_ok = not approx_kls or sum(approx_kls) / len(approx_kls) <= target_kl
    return not all_true(accelerator, local_ok)
