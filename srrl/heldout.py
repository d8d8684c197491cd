"""Held-out evaluation: fixed-seed images of the held-out prompts, scored by the reward and, for shapes-world
prompts, the exact verifier (the trainer's evaluations before, during and after training), and the one-line report
of a paired change of strict accuracy (also used by ``evaluate.py``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import ml_collections
import torch

from srrl.distributed import gather_flat, local_rows
from srrl.models import DiffusionModel, inference_unet
from srrl.sampling import GuidedDenoiser
from srrl.stage import generate_eval_images
from srrl.testbed.report import check_table, family_summary, strict_gain, table_reward

logger = logging.getLogger(__name__)


def evaluate_heldout(
    accelerator,
    model: DiffusionModel,
    denoiser: GuidedDenoiser,
    reward_fn: Callable[[torch.Tensor, list[str]], torch.Tensor],
    config: ml_collections.ConfigDict,
    prompts: Sequence[str],
    after_stage: int,
) -> dict:
    """The ``eval.jsonl`` record of ``eval.num_images_per_prompt`` images per held-out prompt.

    Image ``r`` (prompt-major) draws its noise from ``eval.seed`` and ``r`` alone, so two evaluations with the same
    settings score the same noise (a paired comparison) on any number of processes; each process generates a
    contiguous share. Sampler: ``eval.eta`` (0, deterministic DDIM, by default); LoRA merged for the pass when
    ``sample.merge_lora``, UNet in ``eval.dtype`` when set (:func:`srrl.models.inference_unet`). With
    ``eval.verifier`` the verifier runs once: a verifier reward (``shapes_verify``, ``shapes_partial``) is read
    from its table.
    """
    rows_prompts = [p for p in prompts for _ in range(config.eval.num_images_per_prompt)]
    world = accelerator.num_processes
    padded = list(range(len(rows_prompts))) + [len(rows_prompts) - 1] * (-len(rows_prompts) % world)  # equal shares
    rows = [padded[i] for i in local_rows(len(padded), world, accelerator.process_index)]
    local_prompts = [rows_prompts[r] for r in rows]
    denoiser.unet.eval()
    merge = config.sample.get("merge_lora", False)
    with accelerator.autocast(), inference_unet(denoiser.unet, merge, eval_dtype(config, accelerator.device)) as unet:
        images = generate_eval_images(model, GuidedDenoiser(unet, denoiser.max_micro_batch), config, local_prompts,
                                      rows, accelerator.device)
    table = check_table(local_prompts, images) if config.eval.verifier else None
    local = table_reward(config.reward.fn, table) if table is not None else None  # the verifier runs once
    if local is None:
        local = reward_fn(images.to(accelerator.device), local_prompts).float()
    rewards = gather_flat(accelerator, local.to(accelerator.device))[: len(rows_prompts)]
    std = rewards.std().item() if rewards.numel() > 1 else 0.0
    record = {"after_stage": after_stage, "reward_mean": rewards.mean().item(), "reward_std": std,
              "reward_stderr": std / math.sqrt(rewards.numel()), "n": rewards.numel()}
    if table is not None:  # shapes-world prompts: exact accuracy per caption family and part
        table = gather_flat(accelerator, table.to(accelerator.device))[: len(rows_prompts)].cpu()
        record["verifier"] = family_summary(rows_prompts, table)
        record["verifier_strict"] = table[:, 0].int().tolist()  # per image: pairs evaluations (strict_gain)
    return record


def eval_dtype(config: ml_collections.ConfigDict, device: torch.device) -> torch.dtype | None:
    """The dtype of the held-out passes' UNet (``eval.dtype``; None: the run's own, the default). Warns when
    bfloat16 is asked of a CPU without bf16 instructions, where it is slower than float32."""
    name = config.eval.get("dtype", "")
    if not name:
        return None
    if device.type == "cpu" and name == "bfloat16" and not _cpu_has_bf16():
        logger.warning("eval.dtype bfloat16: this CPU has no bf16 instructions, so the held-out passes may be "
                       "slower than in float32; set --config.eval.dtype=float32 (or '') to use float32")
    return getattr(torch, name)


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private check of torch's; if it is gone, assume the CPU has them
        return True


def describe_strict_change(first: dict, record: dict, label: str, first_label: str = "before training") -> str:
    """One line: held-out strict accuracy of ``record`` (``label``) against the evaluation ``first``
    (``first_label``) and their difference in standard errors (paired when both hold per-image outcomes)."""
    before, now = first["verifier"]["all"], record["verifier"]["all"]
    gain = strict_gain(first, record)
    how = (f"of the paired difference ({gain.gained} images gained, {gain.lost} lost)" if gain.paired
           else "of the difference (independent samples: no per-image outcomes in the first evaluation)")
    return (f"held-out strict accuracy {label}: {100 * now['strict']:.1f}% ± {100 * now['strict_stderr']:.1f} "
            f"({first_label} {100 * before['strict']:.1f}% ± {100 * before['strict_stderr']:.1f}); change "
            f"{100 * gain.delta:+.1f} ± {100 * gain.stderr:.1f} points = {gain.in_se:+.2f} standard errors {how}")
