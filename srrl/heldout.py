"""Held-out evaluation: fixed-seed images of the held-out prompts, scored by the reward and, where the entry wiring
hands in a :class:`Verifier` (the shapes world's), by an exact verifier (the trainer's evaluations before, during and
after training), and the one-line report of a paired change of strict accuracy (also used by ``evaluate.py``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ml_collections
import torch

from srrl.distributed import gather_flat, local_rows
from srrl.errors import ConfigError
from srrl.models import DiffusionModel, inference_denoiser
from srrl.sampling import GuidedDenoiser
from srrl.stage import generate_eval_images, score_images

logger = logging.getLogger(__name__)


class Verifier(Protocol):
    """An exact verifier of held-out prompts, handed in by the entry wiring (``eval.verifier``; the shapes world's
    is ``testbed.verifier.ShapesVerifier``). Its table has one row per image and one column per part (1/0, NaN where
    a part does not apply); column 0 is the strict outcome (every part right)."""

    parts: tuple[str, ...]

    def check_prompt(self, prompt: str) -> None:
        """Raise ValueError for a prompt the verifier cannot read."""

    def table(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        """Outcomes [N, len(parts)] of ``images`` [N, 3, H, W] against ``prompts`` [N]."""

    def reward(self, reward_name: str, table: torch.Tensor) -> torch.Tensor | None:
        """The reward ``reward_name`` [N] read from a table, or None when it is not a verifier reward."""

    def summary(self, prompts: list[str], table: torch.Tensor) -> dict[str, dict[str, float]]:
        """Per prompt group and ``"all"``: ``n``, and each part's mean and ``<part>_stderr``."""


def evaluate_heldout(
    accelerator,
    model: DiffusionModel,
    denoiser: GuidedDenoiser,
    reward_fn: Callable[[torch.Tensor, list[str]], torch.Tensor],
    config: ml_collections.ConfigDict,
    prompts: Sequence[str],
    after_stage: int,
    verifier: Verifier | None = None,
) -> dict:
    """The ``eval.jsonl`` record of ``eval.num_images_per_prompt`` images per held-out prompt.

    Image ``r`` (prompt-major) draws its noise from ``eval.seed`` and ``r`` alone, so two evaluations with the same
    settings score the same noise (a paired comparison) on any number of processes; each process generates a
    contiguous share. Sampler: ``eval.eta`` (0, deterministic DDIM, by default); LoRA merged for the pass when
    ``sample.merge_lora``, denoiser in ``eval.dtype`` when set (:func:`srrl.models.inference_denoiser`). With
    ``eval.verifier`` the handed-in ``verifier`` runs once, and a verifier reward (``shapes_verify``,
    ``shapes_partial``) is read from its table.
    """
    if config.eval.verifier and verifier is None:  # before any image is generated
        raise ConfigError("eval.verifier=True: no verifier was handed in (cli.wiring.VERIFIER is the shapes world's)")
    rows_prompts = [p for p in prompts for _ in range(config.eval.num_images_per_prompt)]
    world = accelerator.num_processes
    padded = list(range(len(rows_prompts))) + [len(rows_prompts) - 1] * (-len(rows_prompts) % world)  # equal shares
    rows = [padded[i] for i in local_rows(len(padded), world, accelerator.process_index)]
    local_prompts = [rows_prompts[r] for r in rows]
    denoiser.network.eval()
    merge = config.sample.merge_lora
    with accelerator.autocast(), inference_denoiser(denoiser.network, merge, eval_dtype(config, accelerator.device)) as network:
        images = generate_eval_images(model, GuidedDenoiser(network, denoiser.max_micro_batch, denoiser.embedded_guidance), config, local_prompts,
                                      rows, accelerator.device, progress=accelerator.is_main_process)
    table = verifier.table(local_prompts, images) if config.eval.verifier else None
    local = verifier.reward(config.reward.fn, table) if config.eval.verifier else None  # the verifier runs once
    if local is None:
        local = score_images(reward_fn, images.to(accelerator.device), local_prompts, config.reward.batch_size,
                             "held-out reward", accelerator.is_main_process)
    rewards = gather_flat(accelerator, local.to(accelerator.device))[: len(rows_prompts)]
    std = rewards.std().item() if rewards.numel() > 1 else 0.0
    record = {"after_stage": after_stage, "reward_mean": rewards.mean().item(), "reward_std": std,
              "reward_stderr": std / math.sqrt(rewards.numel()), "n": rewards.numel()}
    if table is not None:  # shapes-world prompts: exact accuracy per caption family and part
        table = gather_flat(accelerator, table.to(accelerator.device))[: len(rows_prompts)].cpu()
        record["verifier"] = verifier.summary(rows_prompts, table)
        record["verifier_strict"] = table[:, 0].int().tolist()  # per image: pairs evaluations (strict_gain)
    return record


_NOTED: set[str] = set()  # fallbacks already logged in this process


def eval_dtype(config: ml_collections.ConfigDict, device: torch.device) -> torch.dtype | None:
    """The dtype of the held-out passes' denoiser (``eval.dtype``; None: the run's own, the default).

    bfloat16 is used only where the device computes it natively: a CPU with bf16 instructions (AVX-512 BF16 or
    AMX, as oneDNN reports) or a CUDA GPU that supports it. Elsewhere bfloat16 is emulated and many times slower
    than float32 (~14x per image measured on an AVX2-only CPU), so the passes run in the run's dtype instead and
    that is logged once.
    """
    name = config.eval.dtype
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


@dataclass(frozen=True)
class StrictGain:
    """Change of held-out strict accuracy between two evaluations of the same fixed-seed images."""

    delta: float  # after - before (fraction)
    stderr: float  # standard error of ``delta``
    gained: int  # images wrong before and right after (-1 where per-image outcomes are not known)
    lost: int  # images right before and wrong after (-1 where per-image outcomes are not known)

    @property
    def paired(self) -> bool:
        """Whether ``stderr`` is that of the paired difference (per-image outcomes known)."""
        return self.gained >= 0

    @property
    def in_se(self) -> float:
        """``delta`` in standard errors (0 if the standard error is 0)."""
        return self.delta / self.stderr if self.stderr > 0 else 0.0


def strict_gain(before: dict[str, Any], after: dict[str, Any]) -> StrictGain:
    """Change of strict accuracy between two ``eval.jsonl`` records (``"verifier"``: a :func:`family_summary`;
    ``"verifier_strict"``: the strict outcome, 0/1, of every image).

    Both evaluations score the same images' noise (fixed seeds), so the outcomes are paired: with per-image
    outcomes ``a``, ``b`` [N] the standard error is that of the mean of ``d = b - a`` (``std(d) / sqrt(N)``; the
    discordant images carry it). Records without per-image outcomes (runs made before they were stored) fall back
    to independent samples, ``sqrt(se_before**2 + se_after**2)``.
    """
    a, b = before.get("verifier_strict"), after.get("verifier_strict")
    if a is not None and b is not None and len(a) == len(b) > 1:
        x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        d = y - x  # [N] in {-1, 0, 1}
        return StrictGain(float(d.mean()), float(d.std() / len(a) ** 0.5), int((d > 0).sum()), int((d < 0).sum()))
    sa, sb = before["verifier"]["all"], after["verifier"]["all"]
    stderr = (sa["strict_stderr"] ** 2 + sb["strict_stderr"] ** 2) ** 0.5
    return StrictGain(sb["strict"] - sa["strict"], stderr, -1, -1)
