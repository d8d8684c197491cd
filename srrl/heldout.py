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
from srrl.stage import generate_eval_images, score_images
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
                                      rows, accelerator.device, progress=accelerator.is_main_process)
    table = check_table(local_prompts, images) if config.eval.verifier else None
    local = table_reward(config.reward.fn, table) if table is not None else None  # the verifier runs once
    if local is None:
        local = score_images(reward_fn, images.to(accelerator.device), local_prompts, config.reward.batch_size,
                             "held-out reward", accelerator.is_main_process)
    rewards = gather_flat(accelerator, local.to(accelerator.device))[: len(rows_prompts)]
    std = rewards.std().item() if rewards.numel() > 1 else 0.0
    record = {"after_stage": after_stage, "reward_mean": rewards.mean().item(), "reward_std": std,
              "reward_stderr": std / math.sqrt(rewards.numel()), "n": rewards.numel()}
    if table is not None:  # shapes-world prompts: exact accuracy per caption family and part
        table = gather_flat(accelerator, table.to(accelerator.device))[: len(rows_prompts)].cpu()
        record["verifier"] = family_summary(rows_prompts, table)
        record["verifier_strict"] = table[:, 0].int().tolist()  # per image: pairs evaluations (strict_gain)
    return record


_NOTED: set[str] = set()  # fallbacks already logged in this process


def eval_dtype(config: ml_collections.ConfigDict, device: torch.device) -> torch.dtype | None:
    """The dtype of the held-out passes' UNet (``eval.dtype``; None: the run's own, the default).

    bfloat16 is used only where the device computes it natively: a CPU with bf16 instructions (AVX-512 BF16 or
    AMX, as oneDNN reports) or a CUDA GPU that supports it. Elsewhere bfloat16 is emulated and many times slower
    than float32 (~14x per image measured on an AVX2-only CPU), so the passes run in the run's dtype instead and
    that is logged once.
    """
    name = config.eval.get("dtype", "")
    if not name:
        return None
    if name == "bfloat16" and not device_has_bf16(device):
        if device.type not in _NOTED:
            _NOTED.add(device.type)
            logger.info("eval.dtype=bfloat16: this %s has no native bfloat16 (no AVX-512 BF16 / AMX on a CPU), so "
                        "the held-out passes run in the run's own dtype", "GPU" if device.type == "cuda" else "CPU")
        return None
    return getattr(torch, name)


def device_has_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private check of torch's; if it is gone, assume emulation
        return False


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
